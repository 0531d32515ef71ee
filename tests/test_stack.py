"""The supervised local stack as a user runs it: `posemesh up`, a crash, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from posemesh.client import Client
from posemesh.devstack.processes import free_port
from posemesh.mesh.settings import REPO_ROOT
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


def test_up_restarts_crashed_processes_and_stops_cleanly(tmp_path):
    run_dir = tmp_path / "stack"
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("POSEMESH_API_KEYS", None)
    up = subprocess.Popen([sys.executable, "-m", "posemesh.cli", "up", "--run-dir", str(run_dir),
                           "--gateway-port", str(port)], cwd=REPO_ROOT, env=env,
                          stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT)
    try:
        state_file = run_dir / "stack.json"
        wait_for(state_file.exists, 240, 0.2, "the stack to come up")
        state = json.loads(state_file.read_text())
        assert set(state["services"]) == {"rtsp", "broker", "triton", "gateway", "detect-0", "pose-0", "track-0",
                                          "annotate-0"}
        assert state["rtsp"].startswith("rtsp://127.0.0.1:")  # the relay live tasks publish to
        with Client(f"127.0.0.1:{port}") as client:  # the development key
            assert list(client.list()) == []
        # Prometheus metrics from the gateway and every worker.
        import urllib.request
        assert set(state["metrics"]) == {"gateway", "detect-0", "pose-0", "track-0", "annotate-0"}
        text = urllib.request.urlopen(state["metrics"]["gateway"], timeout=10).read().decode()
        assert "posemesh_gateway_uploads_total" in text
        text = urllib.request.urlopen(state["metrics"]["pose-0"], timeout=10).read().decode()
        assert "posemesh_stage_frames_total" in text
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


def test_run_stops_its_stack_when_terminated(tmp_path):
    """`posemesh run` killed with SIGTERM (a CI timeout, say) stops everything it started."""
    from tests.conftest import media

    run_dir = tmp_path / "once"
    proc = subprocess.Popen([sys.executable, "-m", "posemesh.cli", "run", str(media("vtest_opencv_480x360.mp4")),
                             "--run-dir", str(run_dir), "--out", str(tmp_path / "out")], cwd=REPO_ROOT,
                            stdout=open(tmp_path / "run.log", "wb"), stderr=subprocess.STDOUT)
    state_file = run_dir / "stack.json"
    wait_for(state_file.exists, 240, 0.2, "the stack of `posemesh run` to come up")
    pids = list(json.loads(state_file.read_text())["services"].values())
    proc.send_signal(signal.SIGTERM)
    proc.wait(90)
    assert not state_file.exists()
    assert [p for p in pids if alive(p)] == []
