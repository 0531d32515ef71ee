"""Fixtures that start the real parts: the Tansu broker, Triton, the gateway, the stage workers.

Nothing here is mocked: each fixture starts the real process or server on free ports of this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from posemesh.devstack.broker import LocalBroker
from posemesh.devstack.processes import free_port, stop_process
from posemesh.mesh.settings import REPO_ROOT, Settings, default_media_dir, default_models_dir

MEDIA = default_media_dir()
MODELS = default_models_dir()
USERS = {"alice": "alice-key", "bob": "bob-key"}


def media(name: str) -> Path:
    path = MEDIA / name
    if not path.exists():
        pytest.skip(f"{path} not present (set POSEMESH_MEDIA_DIR)")
    return path


def auth(user: str = "alice") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {USERS[user]}")]


@pytest.fixture(autouse=True)
def _no_spare_producers_left():
    """A test that made frame producers in this process leaves no spare behind (kafka.SpareProducer): one made for a
    broker a test stopped would go on trying to reach it for the rest of the session."""
    yield
    from posemesh.mesh import kafka

    kafka.SPARE_PRODUCERS.clear()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
        yield b


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server (Debian's package); each test that needs a store takes a fresh database."""
    from posemesh.devstack.postgres import LocalPostgres

    with LocalPostgres(log_path=tmp_path_factory.mktemp("postgres") / "postgres.log") as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-protocol server (moto's server mode, a process of its own) with one bucket."""
    from posemesh.devstack.object_store import CREDENTIALS, LocalS3

    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # boto3 in this process (the gateway) and in the workers finds them here
    server = LocalS3(log_path=tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def make_settings(broker, data_dir: Path, **overrides) -> Settings:
    s = Settings()
    s.kafka_bootstrap = broker.bootstrap
    s.data_dir = data_dir
    s.api_keys = ",".join(f"{u}:{k}" for u, k in USERS.items())
    s.api_keys_file = ""
    s.topic_delete_delay_s = 1.0
    s.max_upload_bytes = 8 * 1024 * 1024
    # Workers replace their producer every couple of tasks (the default: every 200 topics), so every test that
    # kills, restarts or checks results frame by frame does so across producer replacements too.
    s.producer_topics_max = 3
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


def settings_env(s: Settings) -> dict:
    """The same settings as POSEMESH_* variables, for worker processes."""
    env = dict(os.environ)
    env.update({
        "POSEMESH_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "POSEMESH_DATA_DIR": str(s.data_dir),
        "POSEMESH_TRITON_URL": s.triton_url, "POSEMESH_API_KEYS": s.api_keys,
        "POSEMESH_TOPIC_DELETE_DELAY_S": str(s.topic_delete_delay_s), "PYTHONUNBUFFERED": "1",
        "POSEMESH_GROUP_PREFIX": s.group_prefix, "POSEMESH_BLOB_URL": s.blob_url,
        "POSEMESH_S3_ENDPOINT_URL": s.s3_endpoint_url, "POSEMESH_INGEST": s.ingest,
        "POSEMESH_MAX_FRAMES_AHEAD": str(s.max_frames_ahead), "POSEMESH_SHARED_PICTURES_DIR": s.shared_pictures_dir,
        "POSEMESH_PRODUCER_TOPICS_MAX": str(s.producer_topics_max),
    })
    return env


class RunningGateway:
    def __init__(self, settings: Settings):
        from posemesh.gateway.server import Gateway

        self.settings = settings
        self.gateway = Gateway(settings)
        self.port = self.gateway.start("127.0.0.1:0")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        from posemesh.v1 import task_service_pb2_grpc as tpb_grpc

        self.stub = tpb_grpc.TaskServiceStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.channel.close()
        self.gateway.stop()


@pytest.fixture
def gateway_factory(broker, tmp_path):
    started = []

    def start(data_dir: Path | None = None, **overrides) -> RunningGateway:
        gw = RunningGateway(make_settings(broker, data_dir or tmp_path / "data", **overrides))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        try:
            gw.stop()
        except Exception:  # noqa: BLE001 - best-effort teardown: stop the other gateways too
            pass


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory()


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    from posemesh.mesh.models import prepare

    out = tmp_path_factory.mktemp("onnx")
    prepare(out, MODELS)
    return out


@pytest.fixture(scope="session")
def triton(onnx_dir, tmp_path_factory):
    from posemesh.devstack.triton_server import TritonServer

    work = tmp_path_factory.mktemp("triton")
    server = TritonServer(onnx_dir, work, log_path=work / "triton.log")
    server.start()
    yield server
    server.stop()


class Workers:
    """Stage workers as real processes (python -m posemesh.stages NAME), like the stack runs them."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings, self.log_dir = settings, log_dir
        self.procs: list[tuple[str, int, subprocess.Popen]] = []

    def start(self, stage: str) -> int:
        port = free_port()
        log = open(self.log_dir / f"{stage}-{port}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "posemesh.stages", stage, "--control-port", str(port)],
                                cwd=REPO_ROOT, env=settings_env(self.settings), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((stage, port, proc))
        return port

    def wait_healthy(self, timeout: float = 90.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        for stage, port, proc in self.procs:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while True:
                    assert proc.poll() is None, f"{stage} worker exited; see {self.log_dir}"
                    try:
                        if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                            break
                    except grpc.RpcError:
                        pass
                    assert time.monotonic() < deadline, f"{stage} worker not healthy after {timeout}s"
                    time.sleep(0.2)

    def alive(self) -> bool:
        return all(p.poll() is None for _s, _p, p in self.procs)

    def kill(self) -> None:
        """SIGKILL every worker here (a crash: nothing is flushed or closed)."""
        for _s, _p, proc in self.procs:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for _s, _p, proc in self.procs:
            stop_process(proc, grace=15)


@pytest.fixture
def pipeline(broker, triton, tmp_path, gateway_factory):
    """The gateway plus one worker per stage, on the real broker and the real Triton."""
    gw = gateway_factory()
    gw.settings.triton_url = triton.url
    # Fresh consumer groups per test: a worker stopped in the middle of a group join can leave the local
    # broker's group waiting (see RUNTIME-NOTES / the issue notes); production brokers expire it.
    gw.settings.group_prefix = f"test{time.monotonic_ns()}"
    workers = Workers(gw.settings, tmp_path)
    for stage in ("detect", "pose", "track", "annotate"):
        workers.start(stage)
    workers.wait_healthy()
    yield gw, workers
    workers.stop()


@pytest.fixture(scope="module")
def shared_pipeline(broker, triton, tmp_path_factory):
    """One gateway and one worker per stage for a whole test module (their start-up is the slow part)."""
    root = tmp_path_factory.mktemp("pipeline")
    gw = RunningGateway(make_settings(broker, root / "data", triton_url=triton.url,
                                      group_prefix=f"test{time.monotonic_ns()}"))
    workers = Workers(gw.settings, root)
    for stage in ("detect", "pose", "track", "annotate"):
        workers.start(stage)
    try:
        workers.wait_healthy()
        yield gw, workers
    finally:
        workers.stop()
        gw.stop()
