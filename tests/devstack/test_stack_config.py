"""What a stack hands its processes, decided before any of them starts (pure configuration, no process)."""
from __future__ import annotations

import pytest

from posemesh.devstack.stack import Stack, StackConfig


@pytest.fixture(autouse=True)
def no_timeouts_in_the_environment(monkeypatch):
    monkeypatch.delenv("POSEMESH_KAFKA_SESSION_TIMEOUT_MS", raising=False)
    monkeypatch.delenv("POSEMESH_KAFKA_HEARTBEAT_MS", raising=False)


def timeouts(stack: Stack) -> tuple[str, str]:
    return stack.env["POSEMESH_KAFKA_SESSION_TIMEOUT_MS"], stack.env["POSEMESH_KAFKA_HEARTBEAT_MS"]


def test_the_local_broker_gets_the_short_session_its_joins_wait_on(tmp_path):
    assert timeouts(Stack(StackConfig(run_dir=tmp_path, rtsp_port=-1))) == ("2000", "200")


def test_an_external_kafka_gets_a_session_apache_kafka_accepts(tmp_path):
    # Apache Kafka refuses a JoinGroup whose session timeout is under group.min.session.timeout.ms (6 s).
    stack = Stack(StackConfig(run_dir=tmp_path, kafka="kafka.example:9092", rtsp_port=-1))
    assert timeouts(stack) == ("10000", "1000")


def test_a_session_timeout_asked_for_wins_over_the_default_and_the_environment_over_both(tmp_path, monkeypatch):
    config = StackConfig(run_dir=tmp_path, kafka="127.0.0.1:9092", kafka_session_timeout_ms=2000, rtsp_port=-1)
    assert timeouts(Stack(config)) == ("2000", "200")
    monkeypatch.setenv("POSEMESH_KAFKA_SESSION_TIMEOUT_MS", "30000")
    assert timeouts(Stack(config)) == ("30000", "3000")
