"""A camera's password never rests on disk, and a deleted live task leaves nothing: a real gateway on free ports
(real broker, real SQLite), a real RTSP camera (GStreamer's server) whose URL carries a unique password,
and every byte of every file under the gateway's data dir read back while the task runs and after it is
cancelled and deleted. A restarted gateway (same data dir, same key file) still reads the URL it stored; one
whose key is gone fails the task that needed it, saying why."""

from __future__ import annotations

import logging
import secrets
import sqlite3
import stat
from pathlib import Path

import grpc
import pytest
from confluent_kafka import Producer
from cryptography.fernet import Fernet

from posemesh.devstack import rtsp
from posemesh.gateway.lifecycle import TaskLifecycle
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.sources import SourcePolicy
from posemesh.gateway.store import TaskStore, now_us, timestamp
from posemesh.gateway.topics import TopicManager
from posemesh.mesh import kafka, names
from posemesh.mesh.at_rest import SecretBox
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import auth, make_settings, media
from tests.helpers import files_holding, wait_for, wait_state

pytestmark = pytest.mark.skipif(bool(rtsp.available()), reason=rtsp.available() or "")

DONE = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


@pytest.fixture(scope="module")
def camera(tmp_path_factory):
    root = tmp_path_factory.mktemp("camera")
    with rtsp.RtspServer({"gate": media("vtest_opencv_480x360.mp4")}, log_path=root / "rtsp.log") as server:
        yield server  # 80 s at 10 fps: streams for as long as a test needs


def with_password(url: str, password: str) -> str:
    return url.replace("rtsp://", f"rtsp://operator:{password}@", 1)



def stored_live_url(db: Path, task_id: str) -> str:
    """The live_url column as it lies in the database (read-only, closed at once: a reader would keep the
    gateway's checkpoint from emptying the write-ahead log)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT live_url FROM tasks WHERE task_id = ?", (task_id,)).fetchone()[0]
    finally:
        conn.close()


def start_live(gw, url: str) -> tpb.Task:
    request = tpb.StartLiveTaskRequest(source=tpb.LiveSource(url=url), name="loading dock")
    return gw.stub.StartLiveTask(request, metadata=auth(), timeout=60).task


def received_frames(gw, task_id: str) -> tpb.Task | None:
    task = gw.stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=auth()).task
    return task if task.live.frames_received > 0 else None


def test_a_camera_password_is_never_on_disk_and_a_deleted_live_task_leaves_nothing(gateway_factory, camera,
                                                                                  tmp_path, caplog):
    data, password = tmp_path / "data", "pw-" + secrets.token_hex(16)
    # No stage workers: the stall timeout ends the task once its source stops (a mesh would end it with
    # its results; what is on disk is the same).
    gw = gateway_factory(data, live_sources=f"rtsp://127.0.0.1:{camera.port}", reserved_tasks=0,
                         stall_timeout_s=6.0, topic_delete_delay_s=1.0)
    url = with_password(camera.url("cam/gate"), password)
    with caplog.at_level(logging.DEBUG):
        task = start_live(gw, url)
        assert task.live.source == camera.url("cam/gate") and password not in str(task)
        running = wait_for(lambda: received_frames(gw, task.task_id), 30, 0.2, "frames from the camera")

        # While the task runs: the URL is stored (sealed), the password is in no file, no answer, no log line.
        sealed = stored_live_url(data / "tasks.sqlite3", task.task_id)
        assert sealed.startswith("fernet:") and files_holding(data, sealed), "the scan must find the stored URL"
        assert files_holding(data, password) == [] and files_holding(data, "operator:") == []
        listed = gw.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth()).tasks
        for answer in (running, *listed):
            assert password.encode() not in answer.SerializeToString() and "operator" not in str(answer)
        for name in ("tasks.sqlite3", "tasks.sqlite3-wal", "tasks.sqlite3-shm", "secrets.key"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE(data.stat().st_mode) & 0o007 == 0, "the data dir is not for other users"

        try:
            gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
        except grpc.RpcError as err:  # it stalled to an end first on a slow machine: it is ended all the same
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        wait_state(gw.stub, task.task_id, auth(), DONE, timeout=60)
        gw.stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth())

        # At once: neither the password nor its sealed form in any file, the write-ahead log emptied.
        for needle in (password, sealed, "loading dock"):
            assert files_holding(data, needle) == [], needle
        assert not (data / "jobs" / task.task_id).exists() and not (data / "results" / task.task_id).exists()
        # Once the topics are handed off and deleted, the row goes too: not even the task id is left.
        wait_for(lambda: not files_holding(data, task.task_id), 60, 0.5, "no file to hold the task id")
    assert password not in caplog.text and sealed not in caplog.text


def test_a_restarted_gateway_reads_the_camera_url_it_stored(gateway_factory, camera, tmp_path):
    data, keys = tmp_path / "data", tmp_path / "secrets" / "key"
    keys.parent.mkdir()
    keys.write_bytes(Fernet.generate_key() + b"\n")  # as a Kubernetes or Compose secret gives it
    settings = {"live_sources": f"rtsp://127.0.0.1:{camera.port}", "reserved_tasks": 0,
                "secrets_key_file": str(keys)}
    url = with_password(camera.url("cam/gate"), "pw-" + secrets.token_hex(16))
    first = gateway_factory(data, **settings)
    task = start_live(first, url)
    wait_for(lambda: received_frames(first, task.task_id), 30, 0.2, "frames from the camera")
    first.stop()  # the task stays RUNNING for the next gateway
    assert not (data / "secrets.key").exists(), "a named key file is used, no default one made"

    second = gateway_factory(data, **settings)
    [active] = [a for a in second.gateway.store.active_tasks() if a.task.task_id == task.task_id]
    assert active.live_url == url and not active.live_error


def test_a_live_task_whose_url_cannot_be_opened_any_more_fails_saying_why(broker, tmp_path):
    """The key was replaced without keeping the old one; then the broker lost its data, and the live task
    would start over on its camera: it fails with the reason instead."""
    settings = make_settings(broker, tmp_path / "data", live_sources="rtsp://127.0.0.1:*", reserved_tasks=0)
    kafka.ensure_shared_topics(settings)
    task = tpb.Task(task_id=names.new_task_id(), state=tpb.TASK_STATE_QUEUED, file_name="cam",
                    created_at=timestamp(now_us()), video=tpb.VideoInfo(width=64, height=48, fps=5.0),
                    live=tpb.LiveStatus(source="rtsp://127.0.0.1:9/cam", max_lag_s=2.0))
    before = TaskStore(settings.db_path)  # the data dir's own key
    before.create(task, "alice", None)
    before.set_live_source(task.task_id, "rtsp://u:pw@127.0.0.1:9/cam", tpb.RTSP_TRANSPORT_TCP)
    before.transition(task.task_id, tpb.TASK_STATE_RUNNING)
    before.close()

    store = TaskStore(settings.db_path, SecretBox([Fernet.generate_key()]))  # another key
    topics = TopicManager(settings, Producer(kafka.producer_config(settings, "at-rest-test")), store)
    policy = SourcePolicy(settings.live_sources)
    lifecycle = TaskLifecycle(settings, store, topics, Reservations(topics, 0, 5.0), policy)
    lifecycle.run_again()
    failed = store.get(task.task_id)
    assert failed.state == tpb.TASK_STATE_FAILED
    assert "could not start over: the camera URL of this live task was encrypted with a key this server does not " \
           "have" in failed.error_message and failed.error_message.endswith("start a new live task")
    assert task.task_id not in lifecycle.live_sources
    store.close()


def test_a_queued_camera_task_whose_url_cannot_be_opened_fails_at_the_restart_with_the_ingest_stage(broker, tmp_path):
    """The gateway died before the task ran (no ingest job is written before RUNNING), and came back with
    another key: it cannot write the job, so no replica would ever read the camera. It fails at once, saying
    why, instead of waiting for the stall limit."""
    settings = make_settings(broker, tmp_path / "data", live_sources="rtsp://127.0.0.1:*", reserved_tasks=0,
                             ingest="stage")
    settings.jobs_dir.mkdir(parents=True)
    kafka.ensure_shared_topics(settings)
    task = tpb.Task(task_id=names.new_task_id(), state=tpb.TASK_STATE_QUEUED, file_name="cam",
                    created_at=timestamp(now_us()), video=tpb.VideoInfo(width=64, height=48, fps=5.0),
                    live=tpb.LiveStatus(source="rtsp://127.0.0.1:9/cam", max_lag_s=2.0))
    before = TaskStore(settings.db_path)
    before.create(task, "alice", None)
    before.set_live_source(task.task_id, "rtsp://u:pw@127.0.0.1:9/cam", tpb.RTSP_TRANSPORT_TCP)
    before.close()
    store = TaskStore(settings.db_path, SecretBox([Fernet.generate_key()]))  # another key
    topics = TopicManager(settings, Producer(kafka.producer_config(settings, "at-rest-test")), store)
    topics.create(task.task_id)
    lifecycle = TaskLifecycle(settings, store, topics, Reservations(topics, 0, 5.0),
                              SourcePolicy(settings.live_sources))
    lifecycle.recover()
    failed = store.get(task.task_id)
    assert failed.state == tpb.TASK_STATE_FAILED, failed
    assert failed.error_message.startswith("the gateway restarted before the live task started, and the camera URL "
                                           "of this live task was encrypted with a key this server does not have")
    store.close()
