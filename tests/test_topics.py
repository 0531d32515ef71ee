"""The topic hand-off (gateway/topics.py) on the real broker: a finished task's topics go only once no
live worker lists it, and not within DELETE_GRACE_S of the last heartbeat that did."""

from __future__ import annotations

import time

from confluent_kafka import Producer

from posemesh.gateway import topics as topics_module
from posemesh.gateway.store import TaskStore
from posemesh.gateway.topics import DELETE_GRACE_S, LIVENESS_S, TopicManager
from posemesh.mesh import kafka
from tests.conftest import make_settings


def test_topics_go_only_after_the_last_listing_heartbeat_plus_the_grace(broker, tmp_path):
    settings = make_settings(broker, tmp_path)
    kafka.ensure_shared_topics(settings)
    producer = Producer(kafka.producer_config(settings, "topics-test"))
    manager = TopicManager(settings, producer, TaskStore(tmp_path / "tasks.db"))
    manager.started -= LIVENESS_S  # every live worker has been heard from
    task_id = f"{time.time_ns():x}aaaaaaaaaaaaaaaa"[:32]
    manager.create(task_id)
    manager.orphans[task_id] = time.time()  # a task whose topics are due for deletion

    manager.heartbeat("w1", time.time(), [task_id])
    assert manager.sweep() == [], "a live worker lists it"
    manager.heartbeat("w1", time.time(), [])  # the worker let go of it
    assert manager.sweep() == [], "within the grace after the last heartbeat that listed it"
    assert task_id in kafka.list_task_topics(manager.admin)

    time.sleep(DELETE_GRACE_S + 0.1)
    assert manager.sweep() == [task_id]
    assert task_id not in kafka.list_task_topics(manager.admin)


def test_a_silent_worker_stops_holding_topics_after_the_liveness_window(broker, tmp_path, monkeypatch):
    settings = make_settings(broker, tmp_path)
    manager = TopicManager(settings, Producer(kafka.producer_config(settings, "topics-test")),
                           TaskStore(tmp_path / "tasks.db"))
    monkeypatch.setattr(topics_module, "DELETE_GRACE_S", 0.0)
    manager.heartbeat("dead", time.time() - LIVENESS_S - 1, ["sometask0000"])  # last heard long ago
    manager.heartbeat("alive", time.time(), ["othertask000"])
    assert manager.read_by_live_worker() == {"othertask000"}
