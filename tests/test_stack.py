"""The supervised local stack as a user runs it: `posemesh up`, a crash, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from posemesh.client import Client
from posemesh.devstack.processes import free_port
from posemesh.devstack.triton_server import SHM_DIR, SHM_REGION_PREFIX, mapped_shm_regions
from posemesh.mesh.settings import REPO_ROOT
from posemesh.v1 import stage_service_pb2 as spb
from posemesh.v1 import stage_service_pb2_grpc as spb_grpc
from posemesh.v1 import task_service_pb2 as tpb
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_up_with_two_gateways_restarts_crashed_processes_and_stops_cleanly(tmp_path):
    """`posemesh up --gateways 2 --workers ingest=1`: two gateways on a local PostgreSQL store (stopped and
    deleted with the stack) and an ingest replica decoding their uploads; a task uploaded through both
    addresses completes; a killed worker is restarted."""
    from tests import clips

    run_dir = tmp_path / "stack"
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("POSEMESH_API_KEYS", None)
    up = subprocess.Popen([sys.executable, "-m", "posemesh.cli", "up", "--run-dir", str(run_dir),
                           "--gateway-port", str(port), "--gateways", "2", "--workers", "ingest=1"],
                          cwd=REPO_ROOT, env=env,
                          stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT)
    try:
        state_file = run_dir / "stack.json"
        wait_for(state_file.exists, 240, 0.2, "the stack to come up")
        state = json.loads(state_file.read_text())
        assert set(state["services"]) == {"rtsp", "broker", "triton", "gateway-0", "gateway-1", "detect-0", "pose-0",
                                          "track-0", "annotate-0", "ingest-0"}
        assert state["rtsp"].startswith("rtsp://127.0.0.1:")  # the relay live tasks publish to
        assert state["gateway"].startswith(f"127.0.0.1:{port},127.0.0.1:") and state["postgres"]
        # Up means ready for the first upload: every stage worker has joined its consumer group.
        for name in ("detect-0", "pose-0", "track-0", "annotate-0"):
            with grpc.insecure_channel(state["control"][name]) as channel:
                assert spb_grpc.StageServiceStub(channel).GetStatus(spb.GetStatusRequest(), timeout=10).assignments > 0
        for address in state["gateway"].split(","):
            with Client(address) as client:  # the development key
                assert list(client.list()) == []
        with Client(state["gateway"]) as client:  # both addresses: calls spread over them
            task = client.submit(clips.synth(tmp_path / "clip.mp4", 10))
            assert client.wait(task.task_id, timeout_s=120).state == tpb.TASK_STATE_COMPLETED
        # Prometheus metrics from the gateways and every worker.
        import urllib.request
        assert set(state["metrics"]) == {"gateway-0", "gateway-1", "detect-0", "pose-0", "track-0", "annotate-0",
                                         "ingest-0"}
        text = urllib.request.urlopen(state["metrics"]["gateway-1"], timeout=10).read().decode()
        assert "posemesh_gateway_uploads_total" in text
        text = urllib.request.urlopen(state["metrics"]["pose-0"], timeout=10).read().decode()
        assert "posemesh_stage_frames_total" in text
        text = urllib.request.urlopen(state["metrics"]["ingest-0"], timeout=10).read().decode()
        assert "posemesh_ingest_frames_total 10.0" in text  # the ingest replica decoded the upload
        # One log per process.
        assert {p.stem for p in (run_dir / "logs").glob("*.log")} >= set(state["services"])

        victim = state["services"]["detect-0"]
        os.kill(victim, signal.SIGKILL)

        def restarted():
            pid = json.loads(state_file.read_text())["services"]["detect-0"]
            return pid != victim and alive(pid)
        wait_for(restarted, 60, 0.2, "the supervisor to restart detect-0")
        pids = list(json.loads(state_file.read_text())["services"].values())
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(90)
    assert up.returncode == 0
    assert not state_file.exists()
    assert [p for p in pids if alive(p)] == []
    with pytest.raises(OSError):  # the stack's PostgreSQL stopped with it
        socket.create_connection(("127.0.0.1", int(state["postgres"].rsplit(":", 1)[1].split("/")[0])), timeout=2)


def started_from(run_dir) -> list[int]:
    """Processes whose environment names `run_dir`: everything a stack started there, whatever it is."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if str(run_dir).encode() in f.read() and alive(int(pid)):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def stub_regions() -> set[Path]:
    """Triton stubs' regions in /dev/shm of this user's."""
    return {r for r in SHM_DIR.resolve().glob(SHM_REGION_PREFIX + "*") if r.stat().st_uid == os.getuid()}


@pytest.mark.parametrize("when", ["starting", "loading", "working"])
def test_run_stops_its_stack_when_terminated(tmp_path, when):
    """`posemesh run` killed with SIGTERM (a CI timeout, say) stops everything it started, whether its stack is
    still starting (Triton started, health checks in flight), Triton is loading its models (its stubs have
    made their shared-memory regions), or a task is being uploaded and followed. Triton's regions go with it:
    a project CI run found four (64 MB of /dev/shm) left by a Triton stopped while it loaded."""
    from tests.conftest import media

    run_dir = tmp_path / "once"
    regions_before = stub_regions()
    proc = subprocess.Popen([sys.executable, "-m", "posemesh.cli", "run", str(media("vtest_opencv_480x360.mp4")),
                             "--run-dir", str(run_dir), "--out", str(tmp_path / "out")], cwd=REPO_ROOT,
                            stdout=open(tmp_path / "run.log", "wb"), stderr=subprocess.STDOUT)
    state_file = run_dir / "stack.json"
    signs = {"starting": (run_dir / "logs" / "triton.log").exists, "working": state_file.exists,
             "loading": lambda: stub_regions() - regions_before}
    wait_for(signs[when], 240, 0.02, f"`posemesh run` to be {when}")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(proc.pid)], check=False)
        proc.kill()
        pytest.fail(f"`posemesh run` still running 60 s after SIGTERM; its log:\n{(tmp_path / 'run.log').read_text()}")
    assert proc.returncode == 128 + signal.SIGTERM
    assert not state_file.exists()
    assert started_from(run_dir) == []
    left = stub_regions() - regions_before - mapped_shm_regions()
    assert not left, f"Triton's shared-memory regions left behind: {sorted(r.name for r in left)}"
