"""The gateway against the real broker and a real gRPC server on a free port (no stage workers here)."""

from __future__ import annotations

import os

import av
import grpc
import pytest

from posemesh.mesh import kafka
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import auth, media
from tests.helpers import read_topic, reserved_topics, topics, upload, upload_requests, wait_for, wait_state


def count_frames(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def job_files(gw) -> list[str]:
    root = gw.settings.jobs_dir
    return [str(p) for p in root.rglob("*")] if root.exists() else []


def test_upload_publishes_every_frame_in_order_then_end_of_stream(gateway):
    clip = media("mmpose_demo_960x540_5f.mp4")
    task = upload(gateway.stub, clip, auth())
    assert task.state in (tpb.TASK_STATE_QUEUED, tpb.TASK_STATE_RUNNING)
    assert task.video.width == 960 and task.video.height == 540 and task.video.codec == "h264"
    names = topics(gateway.settings.kafka_bootstrap)
    for prefix in kafka.PIPELINE_TOPIC_PREFIXES:
        assert kafka.task_topic(prefix, task.task_id) in names
    assert kafka.task_topic(kafka.LIVE_FRAMES, task.task_id) not in names  # made for a first viewer only

    records = read_topic(gateway.settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, task.task_id))
    frames = [r.frame for r in records if r.HasField("frame")]
    eos = [r.end_of_stream for r in records if r.HasField("end_of_stream")]
    expected = count_frames(clip)
    assert sorted(f.index for f in frames) == list(range(expected))
    assert len(eos) == 1 and eos[0].total_frames == expected
    # Per partition the frames are in index order (the partition is index % partitions).
    by_partition: dict[int, list[int]] = {}
    for f in frames:
        by_partition.setdefault(f.index % gateway.settings.frame_partitions, []).append(f.index)
    assert all(v == sorted(v) for v in by_partition.values())
    assert all(f.jpeg[:2] == b"\xff\xd8" and f.width == 960 and f.height == 540 for f in frames)
    assert [round(f.timestamp_s, 3) for f in sorted(frames, key=lambda f: f.index)] == [0.0, 0.2, 0.4, 0.6, 0.8]

    done = wait_state(gateway.stub, task.task_id, auth(), {tpb.TASK_STATE_RUNNING})
    decode = wait_for(lambda: next(p for p in gateway.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id),
                                                                    metadata=auth()).task.progress
                                   if p.stage == "decode" and p.frames_done == expected), 10, what="decode progress")
    assert decode.frames_total == expected and done.started_at.seconds > 0


def test_watch_streams_until_terminal_and_cancel_deletes_topics(gateway):
    task = upload(gateway.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
    stream = gateway.stub.WatchTask(tpb.WatchTaskRequest(task_id=task.task_id), metadata=auth(), timeout=60)
    first = next(stream)
    assert first.task.task_id == task.task_id and first.task.state == tpb.TASK_STATE_RUNNING
    cancelled = gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth()).task
    assert cancelled.state == tpb.TASK_STATE_CANCELLED and cancelled.error_message
    states = [first.task.state] + [e.task.state for e in stream]  # the stream ends at the terminal state
    assert states[-1] == tpb.TASK_STATE_CANCELLED
    # A second cancel is a precondition failure, not a silent success.
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_for(lambda: not set(kafka.task_topics(task.task_id)) & topics(gateway.settings.kafka_bootstrap),
             30, what="topic deletion after cancel")
    assert not job_files(gateway) or all(task.task_id not in p for p in job_files(gateway))


def test_completion_reported_by_a_worker_deletes_topics_and_serves_results(gateway):
    """The annotate worker's protocol, spoken over the real events topic: a result completes the task."""
    from confluent_kafka import Producer

    task = upload(gateway.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
    result_dir = gateway.settings.results_dir / task.task_id
    result_dir.mkdir(parents=True)
    (result_dir / "keypoints.jsonl").write_text('{"index": 0}\n')
    event = pb.WorkerEvent(worker_id="annotate-test", stage="annotate", result=pb.TaskResult(
        task_id=task.task_id, frames_written=5, artifacts=[tpb.Artifact(
            kind=tpb.ARTIFACT_KIND_KEYPOINTS, file_name="keypoints.jsonl", size_bytes=13)]))
    producer = Producer({"bootstrap.servers": gateway.settings.kafka_bootstrap})
    producer.produce(kafka.EVENTS_TOPIC, event.SerializeToString())
    producer.flush(10)
    done = wait_state(gateway.stub, task.task_id, auth(), {tpb.TASK_STATE_COMPLETED}, timeout=30)
    assert done.finished_at.seconds > 0
    chunks = list(gateway.stub.DownloadResult(tpb.DownloadResultRequest(
        task_id=task.task_id, kind=tpb.ARTIFACT_KIND_KEYPOINTS), metadata=auth()))
    assert chunks[0].artifact.file_name == "keypoints.jsonl"
    assert b"".join(c.chunk for c in chunks[1:]) == b'{"index": 0}\n'
    with pytest.raises(grpc.RpcError) as err:  # not produced by this task
        list(gateway.stub.DownloadResult(tpb.DownloadResultRequest(
            task_id=task.task_id, kind=tpb.ARTIFACT_KIND_ANNOTATED_VIDEO), metadata=auth()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    wait_for(lambda: not set(kafka.task_topics(task.task_id)) & topics(gateway.settings.kafka_bootstrap),
             30, what="topic deletion after completion")


def _expect(code, call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert err.value.details()  # a message a person can act on
    return err.value.details()


def test_bad_uploads_get_precise_codes_and_leave_nothing_behind(gateway, tmp_path):
    from prometheus_client import REGISTRY

    def refused(code: str) -> float:
        return REGISTRY.get_sample_value("posemesh_gateway_uploads_total", {"outcome": code}) or 0.0

    invalid_before, exhausted_before = refused("invalid_argument"), refused("resource_exhausted")
    stub = gateway.stub
    reservations = gateway.gateway.reservations
    wait_for(lambda: len(reservations.ready) == gateway.settings.reserved_tasks, 30, 0.1, "the reserved task ids")
    reserved = list(reservations.ready)
    before = topics(gateway.settings.kafka_bootstrap)
    clip = media("mmpose_demo_960x540_5f.mp4").read_bytes()
    # Random bytes named .mp4.
    msg = _expect(grpc.StatusCode.INVALID_ARGUMENT,
                  lambda: stub.Upload(upload_requests(os.urandom(300_000), "random.mp4"), metadata=auth()))
    assert "random.mp4" in msg
    # A 0-byte upload.
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Upload(upload_requests(b"", "empty.mp4"), metadata=auth()))
    # A truncated MP4 (the first 40%).
    msg = _expect(grpc.StatusCode.INVALID_ARGUMENT,
                  lambda: stub.Upload(upload_requests(clip[: len(clip) * 2 // 5], "cut.mp4"), metadata=auth()))
    # Over the size limit.
    gateway.settings.max_upload_bytes = 100_000
    msg = _expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
                  lambda: stub.Upload(upload_requests(clip, "big.mp4"), metadata=auth()))
    assert "100000" in msg
    gateway.settings.max_upload_bytes = 8 * 1024 * 1024
    # Chunks but no metadata.
    _expect(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Upload(iter([tpb.UploadRequest(chunk=clip[:1000])]), metadata=auth()))
    # A chunk over 1 MiB.
    _expect(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Upload(upload_requests(clip + bytes(2 << 20), "x.mp4", chunk=2 << 20), metadata=auth()))
    # Counted on the gateway's metrics, by status code.
    assert refused("invalid_argument") - invalid_before == 5 and refused("resource_exhausted") - exhausted_before == 1
    # Nothing left behind: no task, no topic, no temp file.
    assert stub.ListTasks(tpb.ListTasksRequest(), metadata=auth()).tasks == []
    assert (topics(gateway.settings.kafka_bootstrap) - before
            - reserved_topics(gateway.settings.kafka_bootstrap)) == set()
    # Each refused upload had taken a reserved task id (the uploads take one as they begin): all came back.
    assert sorted(reservations.ready) == sorted(reserved) and not reservations.lent
    assert job_files(gateway) == []


def test_auth_and_ownership(gateway):
    stub = gateway.stub
    task = upload(stub, media("mmpose_demo_960x540_5f.mp4"), auth("alice"))
    req = tpb.GetTaskRequest(task_id=task.task_id)
    _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.GetTask(req))
    _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.GetTask(req, metadata=[("authorization", "Bearer nope")]))
    _expect(grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.Upload(upload_requests(b"x"), metadata=[("authorization", "nope")]))
    # Another user's task is indistinguishable from a missing one.
    _expect(grpc.StatusCode.NOT_FOUND, lambda: stub.GetTask(req, metadata=auth("bob")))
    _expect(grpc.StatusCode.NOT_FOUND, lambda: stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id),
                                                                metadata=auth("bob")))
    _expect(grpc.StatusCode.NOT_FOUND, lambda: stub.GetTask(tpb.GetTaskRequest(task_id="0" * 32), metadata=auth()))
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.GetTask(tpb.GetTaskRequest(), metadata=auth()))
    assert [t.task_id for t in stub.ListTasks(tpb.ListTasksRequest(), metadata=auth("bob")).tasks] == []
    # bob's failed attempts did not touch alice's task.
    assert stub.GetTask(req, metadata=auth("alice")).task.state == tpb.TASK_STATE_RUNNING
    _expect(grpc.StatusCode.FAILED_PRECONDITION,
            lambda: stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth()))
    _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: list(stub.DownloadResult(
        tpb.DownloadResultRequest(task_id=task.task_id, kind=tpb.ARTIFACT_KIND_KEYPOINTS), metadata=auth())))
    stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth())
    _expect(grpc.StatusCode.NOT_FOUND, lambda: stub.GetTask(req, metadata=auth()))


def test_list_pagination_idempotency_and_restart(gateway_factory, tmp_path):
    gw = gateway_factory(tmp_path / "data")
    clip = media("mmpose_demo_960x540_5f.mp4")
    first = upload(gw.stub, clip, auth(), key="retry-1")
    again = upload(gw.stub, clip, auth(), key="retry-1")
    assert again.task_id == first.task_id
    ids = {first.task_id} | {upload(gw.stub, clip, auth()).task_id for _ in range(2)}
    page1 = gw.stub.ListTasks(tpb.ListTasksRequest(page_size=2), metadata=auth())
    page2 = gw.stub.ListTasks(tpb.ListTasksRequest(page_size=2, page_token=page1.next_page_token), metadata=auth())
    assert len(page1.tasks) == 2 and len(page2.tasks) == 1 and not page2.next_page_token
    assert {t.task_id for t in [*page1.tasks, *page2.tasks]} == ids
    _expect(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: gw.stub.ListTasks(tpb.ListTasksRequest(page_token="garbage"), metadata=auth()))
    gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=first.task_id), metadata=auth())

    gw.stop()
    restarted = gateway_factory(tmp_path / "data")
    listed = restarted.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth()).tasks
    assert {t.task_id for t in listed} == ids
    states = {t.task_id: t.state for t in listed}
    assert states[first.task_id] == tpb.TASK_STATE_CANCELLED
    # The others were running: resumed (frames republished) or failed with a reason, never stuck.
    for task_id in ids - {first.task_id}:
        task = restarted.stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=auth()).task
        assert task.state == tpb.TASK_STATE_RUNNING or (task.state == tpb.TASK_STATE_FAILED and task.error_message)


def test_per_user_active_task_limit(gateway_factory):
    gw = gateway_factory(max_active_tasks_per_user=1)
    clip = media("mmpose_demo_960x540_5f.mp4")
    task = upload(gw.stub, clip, auth("alice"))
    _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: upload(gw.stub, clip, auth("alice")))
    upload(gw.stub, clip, auth("bob"))  # other users are not affected
    gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    upload(gw.stub, clip, auth("alice"))


def test_health_and_reflection(gateway):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(gateway.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="posemesh.v1.TaskService")).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert "posemesh.v1.TaskService" in names and "grpc.health.v1.Health" in names


def test_rotation_metadata_is_honoured(gateway, tmp_path):
    """A phone-style clip: pixels stored landscape, display matrix says rotate 90 degrees. The frames on
    raw_frames_<task> must be upright: portrait, and turned the way the display matrix says."""
    import cv2
    import numpy as np

    from tests.helpers import make_clip

    source = media("mmpose_demo_960x540_5f.mp4")
    clip = make_clip(source, tmp_path / "rotated.mp4", 3, rotation=90)
    task = upload(gateway.stub, clip, auth())
    assert (task.video.width, task.video.height, task.video.rotation) == (540, 960, 270)
    records = read_topic(gateway.settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, task.task_id))
    frame0 = next(r.frame for r in records if r.HasField("frame") and r.frame.index == 0)
    image = cv2.imdecode(np.frombuffer(frame0.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (960, 540) and (frame0.width, frame0.height) == (540, 960)
    with av.open(str(source)) as c:
        original = next(c.decode(video=0)).to_ndarray(format="bgr24")
    ccw = cv2.rotate(original, cv2.ROTATE_90_COUNTERCLOCKWISE).astype(np.float32)
    cw = cv2.rotate(original, cv2.ROTATE_90_CLOCKWISE).astype(np.float32)
    assert np.abs(image - ccw).mean() < 0.3 * np.abs(image - cw).mean()
    gateway.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())


def test_a_pose_model_without_weights_is_refused_up_front(gateway_factory):
    gw = gateway_factory(disabled_pose_models="rtmpose")
    msg = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: gw.stub.Upload(upload_requests(
        media("mmpose_demo_960x540_5f.mp4").read_bytes(), options=tpb.TaskOptions(pose_model=tpb.POSE_MODEL_RTMPOSE)),
        metadata=auth()))
    assert "rtmpose" in msg and "blazepose_full or blazepose_lite" in msg
    assert gw.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth()).tasks == [] and job_files(gw) == []
    upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), auth(),
           options=tpb.TaskOptions(pose_model=tpb.POSE_MODEL_BLAZEPOSE_FULL))


def test_a_gateway_whose_saved_events_offset_belongs_to_an_older_broker_still_hears_workers(gateway_factory, tmp_path):
    """The local broker keeps topics in memory: after it restarts, the offset the gateway saved for
    posemesh.events points past the new topic's end. The gateway must notice and read from the start."""
    from confluent_kafka import Producer

    from posemesh.gateway.events import OFFSET_KEY
    from posemesh.gateway.store import TaskStore

    data = tmp_path / "data"
    store = TaskStore(data / "tasks.sqlite3")
    store.set_meta(OFFSET_KEY, str(10**9))
    store.close()
    gw = gateway_factory(data)
    task = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
    event = pb.WorkerEvent(worker_id="detect-test", stage="detect", progress=pb.TaskProgress(
        task_id=task.task_id, frames_done=3, frames_total=5, done=[pb.IndexRange(first=0, last=2)]))
    producer = Producer({"bootstrap.servers": gw.settings.kafka_bootstrap})
    producer.produce(kafka.EVENTS_TOPIC, event.SerializeToString())
    producer.flush(10)
    wait_for(lambda: any(p.stage == "detect" and p.frames_done == 3 for p in gw.stub.GetTask(
        tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task.progress), 20, what="the worker's progress")
