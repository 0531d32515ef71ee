"""The TaskService API in process: the real servicer behind the real interceptors, on a real grpc.aio server
on a free port, with a real task store (SQLite in tmp_path, and, for the tests that take `api`, also a
database of a real PostgreSQL server), called through a real channel.

For unit tests of API logic (auth, limits, validation, error mapping): what needs Kafka, Triton or a camera
(starting a task, live views) is left out, and a test that reaches it fails saying so. The gateway's wiring
with the broker is tested by tests/test_gateway.py against the real parts.

Why not pytest-grpc (0.8.0, tried with grpcio 1.81.1): its server is the synchronous `grpc.server`, which
calls TaskService's coroutine methods without awaiting them ("Failed to serialize response!") and cannot
run grpc.aio interceptors (its serving thread dies; the call hangs to its deadline); its fake in-process
server bypasses interceptors altogether. pytest-grpc-aio (0.3.0) does serve grpc.aio, but only to async
tests (it needs pytest-asyncio besides), guesses its port by binding and closing a socket instead of using
the one the server reports, and like pytest-grpc imports private grpc names at plugin load, so a grpcio
upgrade could stop every test run from starting. This fixture is the few lines of it that these tests use.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from posemesh.gateway.auth import Authenticator, load_keys
from posemesh.gateway.changes import ChangeFeed
from posemesh.gateway.limits import UserLimits
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.service import TaskService
from posemesh.gateway.sources import SourcePolicy
from posemesh.gateway.store import TaskStore, now_us, timestamp
from posemesh.mesh import names
from posemesh.mesh.at_rest import SecretBox
from posemesh.mesh.settings import Settings
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from tests.conftest import USERS

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["TaskService"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ApiGateway:
    """What TaskService uses of posemesh.gateway.server.Gateway: the real auth, limits, store, reservations
    (none made: no broker) and change feed; the broker is "available" but nothing can be started on it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.id = "api-under-test"  # the gateway's id (gateway/duties.py): the owner of the tasks it starts
        self.auth = Authenticator(load_keys(settings.api_keys, settings.api_keys_file))
        self.source_policy = SourcePolicy(settings.live_sources)
        self.store = TaskStore(settings.store_location, SecretBox.for_settings(settings))
        self.limits = UserLimits(settings.max_active_tasks_per_user, settings.max_streams_per_user,
                                 self.store)
        self.reservations = Reservations(None, 0, 0.0)
        self.changes: ChangeFeed | None = None
        self.views = None

    def broker_available(self) -> bool:
        return True

    def stream_url(self, task: tpb.Task) -> str:
        return ""

    def cancel(self, task_id: str, reason: str) -> tpb.Task | None:
        return self.store.transition(task_id, tpb.TASK_STATE_CANCELLED, reason)

    def __getattr__(self, name):  # start_task, abandon, delete, ...: the broker's side, not here
        raise AssertionError(f"gateway.{name} needs the broker: test it in tests/test_gateway.py")


class InProcessApi:
    """The server runs on its own event loop in a thread; tests call it with ordinary blocking stubs."""

    def __init__(self, settings: Settings):
        self.gateway = ApiGateway(settings)
        self.store = self.gateway.store
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-under-test", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = tpb_grpc.TaskServiceStub(self.channel)

    async def _start(self) -> int:
        gw = self.gateway
        gw.changes = ChangeFeed(asyncio.get_running_loop())
        self.store.listeners.append(gw.changes.changed)
        # As Gateway._serve_async wires it.
        self.server = grpc.aio.server(interceptors=TaskService.interceptors(gw))
        tpb_grpc.add_TaskServiceServicer_to_server(TaskService(gw), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return port

    def run(self, coroutine, timeout: float = 5.0):
        """Run a coroutine on the server's loop (e.g. to look at what the interceptors hold)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def add_task(self, user: str = "alice", state: int = tpb.TASK_STATE_RUNNING, **fields) -> tpb.Task:
        """A task row as an upload would have made it, without the upload."""
        task = tpb.Task(task_id=names.new_task_id(), state=state, file_name="clip.mp4",
                        created_at=timestamp(now_us()), **fields)
        self.store.create(task, user, None)
        return task

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.gateway.limits.close()
        self.store.close()


@pytest.fixture
def api_factory(tmp_path):
    started: list[InProcessApi] = []

    def start(**overrides) -> InProcessApi:
        s = Settings()
        s.data_dir = tmp_path / f"data{len(started)}"
        s.api_keys = ",".join(f"{u}:{k}" for u, k in USERS.items())
        s.api_keys_file = ""
        s.live_sources = ""
        for k, v in overrides.items():
            setattr(s, k, v)
        api = InProcessApi(s)
        started.append(api)
        return api

    yield start
    for api in started:
        api.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, api_factory) -> InProcessApi:
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        return api_factory(store_url=server.create_database(f"api{time.monotonic_ns()}"))
    return api_factory()
