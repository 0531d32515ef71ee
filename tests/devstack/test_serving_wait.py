"""`Stack.start()`'s wait for its workers to serve, taken alone: its control ports are answered here by stand-in
StageService servers (pure logic of the wait; tests/test_stack.py and tests/test_failures.py run the real workers)."""
from __future__ import annotations

import subprocess
import time
from concurrent import futures

import grpc
import pytest

from posemesh.devstack.processes import free_port
from posemesh.devstack.stack import Service, Stack, StackConfig
from posemesh.v1 import stage_service_pb2 as spb
from posemesh.v1 import stage_service_pb2_grpc as spb_grpc


class StandIn(spb_grpc.StageServiceServicer):
    """Says `problem` until `serving_at` (monotonic), then nothing."""

    def __init__(self, problem: str, serving_at: float = float("inf")):
        self.problem, self.serving_at = problem, serving_at

    def GetStatus(self, request, context):
        return spb.GetStatusResponse(problem="" if time.monotonic() >= self.serving_at else self.problem)


@pytest.fixture
def stack(tmp_path):
    """A stack that started nothing, to which each test adds its workers."""
    stack = Stack(StackConfig(run_dir=tmp_path, rtsp_port=-1))
    servers, procs = [], []

    def add(name: str, servicer: StandIn | None, command=("sleep", "60")) -> None:
        port = free_port()
        if servicer is not None:
            server = grpc.server(futures.ThreadPoolExecutor(2))
            spb_grpc.add_StageServiceServicer_to_server(servicer, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            server.start()
            servers.append(server)
        proc = subprocess.Popen(list(command))
        procs.append(proc)
        stack.services.append(Service(name, list(command), {}, lambda: True, stack.logs / f"{name}.log", proc=proc))
        stack.control_ports[name] = port

    stack.add = add
    yield stack
    for server in servers:
        server.stop(0)
    for proc in procs:
        proc.kill()
        proc.wait()


def test_the_wait_ends_once_every_worker_has_served(stack):
    t0 = time.monotonic()
    stack.add("detect-0", StandIn("joining consumer group posemesh.detect", t0 + 0.5))
    stack.add("track-0", StandIn(""))
    stack._wait_for_workers_serving(timeout=30)
    assert 0.5 <= time.monotonic() - t0 < 10


def test_a_worker_that_never_serves_fails_the_start_naming_it_its_problem_and_its_log(stack):
    stack.add("detect-0", StandIn(""))
    stack.add("pose-0", StandIn("joining consumer group posemesh.pose"))
    stack.add("track-0", None)  # listens nowhere: its port is refused
    with pytest.raises(TimeoutError) as raised:
        stack._wait_for_workers_serving(timeout=1.5)
    said = str(raised.value)
    assert "detect-0" not in said
    assert f"pose-0 (joining consumer group posemesh.pose, see {stack.logs / 'pose-0.log'})" in said
    assert "track-0 (no answer: UNAVAILABLE" in said


def test_a_worker_that_exits_while_starting_fails_the_start_at_once(stack):
    stack.add("detect-0", StandIn("joining consumer group posemesh.detect"))
    stack.add("pose-0", None, command=("sh", "-c", "exit 3"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"pose-0 exited with 3 while starting"):
        stack._wait_for_workers_serving(timeout=30)
    assert time.monotonic() - t0 < 10
