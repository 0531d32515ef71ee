"""The ingest stage (POSEMESH_INGEST=stage): uploads decoded and cameras read by replicas of their own, not by
the gateway.

One mesh of real processes with two ingest replicas (each decoding one upload at a time) and one
replica of every stage. The frame producer stays at most 8 frames ahead of annotate, so an upload is still
being decoded well into its task and a replica can be killed mid-file. Results must equal the undisturbed
run's frame by frame, as in test_resilience. Cameras are served by a real RTSP server (GStreamer's), as in
test_live: the lag stays bounded, and a camera whose replica is killed goes on from another.
"""

from __future__ import annotations

import collections
import io
import json
import signal
import threading
import time

import av
import grpc
import pytest

from posemesh.client import Client, read_mot_boxes
from posemesh.devstack import rtsp
from posemesh.devstack.processes import stop_process
from posemesh.mesh import names
from posemesh.mesh.pipeline import INGEST
from posemesh.v1 import stage_service_pb2 as spb
from posemesh.v1 import stage_service_pb2_grpc as spb_grpc
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import USERS, auth, media
from tests.helpers import GIVEN_BOXES, PublishingCamera, assert_given_boxes_kept, rtsp_describe, upload, wait_for
from tests.mesh import LagReadings, Mesh, assert_same_as_reference, reference_run, town_clip
from tests.mp4_craft import damaged_tail

pytestmark = pytest.mark.slow

FRAMES = 60
MAX_LAG_S = 2.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return town_clip(tmp_path_factory.mktemp("clip"), FRAMES)


@pytest.fixture(scope="module")
def cameras(tmp_path_factory):
    """The RTSP server, or None where GStreamer's is not installed (the camera tests skip)."""
    if rtsp.available():
        yield None
        return
    root = tmp_path_factory.mktemp("cameras")
    long = clips.repeat(media("mmpose_demo_960x540_5f.mp4"), root / "long.mp4", 80)  # 80 s at 5 fps
    with rtsp.RtspServer({"long": long}, log_path=root / "rtsp.log") as server:
        yield server


@pytest.fixture(scope="module")
def mesh(onnx_dir, tmp_path_factory, cameras):
    m = Mesh(tmp_path_factory.mktemp("mesh"), onnx_dir, replicas=1, ingest=2, topic_delete_delay_s=1.0,
             max_frames_ahead=8, ingest_max_jobs=1, live_sources="rtsp://127.0.0.1:*", live_max_lag_s=MAX_LAG_S,
             live_outage_s=4.0)
    yield m
    m.stop()


@pytest.fixture
def client(mesh, cameras):
    if cameras is None:
        pytest.skip(rtsp.available())
    with Client(f"127.0.0.1:{mesh.gateway_port}", USERS["alice"]) as c:
        yield c


@pytest.fixture(scope="module")
def reference(mesh, clip):
    return reference_run(mesh, clip)


def _decoding(mesh: Mesh, task_id: str, at_least: int):
    """The ingest replica decoding the task, once it sent `at_least` of its frames."""
    def holder():
        for worker in mesh.replicas(INGEST):
            tasks = {t.task_id: t for t in worker.status().tasks}
            if task_id in tasks and tasks[task_id].frames_done >= at_least:
                return worker
        return None
    return wait_for(holder, 120, 0.05, f"an ingest replica to decode {at_least} frames of {task_id}")


def test_an_upload_is_decoded_by_an_ingest_replica_and_the_task_says_what_decoded(mesh, clip, reference):
    task = upload(mesh.stub, clip, auth())
    worker = _decoding(mesh, task.task_id, 1)
    done = assert_same_as_reference(mesh, task.task_id, reference)
    assert done.video.frame_count == FRAMES and done.video.duration_s > 0
    assert worker.status().frames_processed >= FRAMES
    # The upload went to the blob store for the ingest stage: nothing of it stays on the gateway's disk.
    assert not (mesh.settings.jobs_dir / task.task_id).exists()


def test_stats_count_the_ingest_replicas_as_the_decode_step(mesh):
    """GetStats' "decode" step counts the ingest replicas, which decode here, and not the gateway."""
    alive = [w for w in mesh.replicas(INGEST) if w.alive()]

    def counted() -> int:
        stats = mesh.stub.GetStats(tpb.GetStatsRequest(), metadata=auth(), timeout=10)
        return {s.stage: s.workers_alive for s in stats.stages}["decode"]
    wait_for(lambda: counted() == len(alive) == 2, 15, 0.5, "the 2 ingest replicas counted as the decode step")


def test_boxes_given_with_an_upload_reach_detect_through_the_ingest_stage(mesh, tmp_path):
    """Boxes given instead of the detector (the SDK's given_boxes, read from a MOT file as the CLI's --boxes
    does) are kept with the upload in the blob store; the ingest replica that decodes it puts each frame's on
    its record, and detect keeps them."""
    mot = tmp_path / "det.txt"
    mot.write_text("".join(f"{i + 1},-1,{x1 + 1},{y1 + 1},{x2 - x1},{y2 - y1},1,-1,-1,-1\n"  # pixels from 1
                           for i, boxes in GIVEN_BOXES.items() for x1, y1, x2, y2 in boxes))
    assert read_mot_boxes(mot) == GIVEN_BOXES
    with Client(f"127.0.0.1:{mesh.gateway_port}", USERS["alice"]) as client:
        task = client.submit(media("mmpose_demo_960x540_5f.mp4"), outputs=["keypoints"],
                             given_boxes=read_mot_boxes(mot))
        done = mesh.wait_done(task.task_id)
        assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
        keypoints = io.BytesIO()
        client.download(task.task_id, "keypoints", keypoints)
    assert_given_boxes_kept(done, [json.loads(line) for line in keypoints.getvalue().decode().splitlines()])
    # They went with the upload when the task ended.
    wait_for(lambda: mesh.settings.blob_store().size(names.given_boxes_key(task.task_id)) is None, 10, 0.1,
             "the given boxes to be deleted with the upload")


def test_sigkill_of_the_ingest_replica_mid_upload_changes_nothing(mesh, clip, reference):
    task = upload(mesh.stub, clip, auth())
    victim = _decoding(mesh, task.task_id, 12)
    assert victim.status().tasks[0].frames_done < FRAMES, "decoding was over before the kill: nothing tested"
    mesh.kill(victim)
    replacement = mesh.start_worker(INGEST)  # as a supervisor would; the other replica takes the job meanwhile
    assert_same_as_reference(mesh, task.task_id, reference)
    mesh.wait_healthy()
    assert replacement.alive()


def test_the_gateway_killed_mid_upload_leaves_the_decoding_going_and_changes_nothing(mesh, clip, reference):
    task = upload(mesh.stub, clip, auth())
    _decoding(mesh, task.task_id, 12)
    mesh.kill_gateway()
    mesh.start_gateway()
    assert_same_as_reference(mesh, task.task_id, reference)


def test_more_uploads_than_decoding_slots_are_spread_over_the_replicas_and_all_come_out_frame_exact(
        mesh, clip, reference):
    """Four uploads at once, two decoding slots (two replicas of one): two wait in a queue, one on each replica
    (gateway/placement.py; keyed by task id, all four could land on one replica while the other idles)."""
    tasks, errors = [], []

    def send():
        try:
            tasks.append(upload(mesh.stub, clip, auth()))
        except grpc.RpcError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(tasks) == 4
    holders: dict[str, str] = {}  # task -> the replica that listed it first (queued or decoding)

    def all_placed():
        for worker in mesh.replicas(INGEST):
            status = worker.status()
            for listed in status.tasks:
                holders.setdefault(listed.task_id, status.worker_id)
        return all(t.task_id in holders for t in tasks)
    wait_for(all_placed, 60, 0.05, "every upload to reach an ingest replica")
    per_replica = collections.Counter(holders[t.task_id] for t in tasks)
    assert sorted(per_replica.values()) == [2, 2], f"uploads per ingest replica: {dict(per_replica)}"
    for task in tasks:
        assert_same_as_reference(mesh, task.task_id, reference)


def test_what_decoded_reaches_the_task_before_it_completes(mesh, tmp_path):
    """The 5-frame clip with its last 40 KB zeroed: 5 packets, 2 frames (tests/test_inputs.py has the gateway
    decoding it). The ingest replica tells the gateway what decoded before the end of stream goes out, so the
    completed task says 2 frames, 0.4 s and why."""
    task = upload(mesh.stub, damaged_tail(tmp_path / "tail.mp4", 40_000), auth())
    assert (task.video.frame_count, task.video.duration_s) == (5, 1.0)  # the probe's estimate
    done = mesh.wait_done(task.task_id)
    assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
    assert (done.video.frame_count, done.video.duration_s) == (2, 0.4)
    assert done.warnings == ["3 of the 5 frames of the upload could not be decoded and were skipped; the 2 that "
                             "decoded are processed"]
    assert {p.stage: (p.frames_done, p.frames_total) for p in done.progress}["decode"] == (2, 2)


def test_an_operator_stopping_a_task_on_its_ingest_replica_fails_it_saying_so(mesh, clip):
    task = upload(mesh.stub, clip, auth())
    holder = _decoding(mesh, task.task_id, 1)
    with grpc.insecure_channel(f"127.0.0.1:{holder.port}") as channel:
        stopped = spb_grpc.StageServiceStub(channel).StopTask(spb.StopTaskRequest(task_id=task.task_id), timeout=10)
    assert stopped.was_active
    done = mesh.wait_done(task.task_id)
    assert done.state == tpb.TASK_STATE_FAILED
    assert done.error_message == f"its decoding was stopped by an operator on {holder.status().worker_id}"
    # Its job is done with: no replica decodes the task again.
    wait_for(lambda: all(task.task_id not in {t.task_id for t in w.status().tasks} for w in mesh.replicas(INGEST)),
             30, 0.2, "the stopped task to leave the ingest replicas")


def _reading_camera(mesh: Mesh, task_id: str):
    """The ingest replica reading the task's camera."""
    def holder():
        return next((w for w in mesh.replicas(INGEST) if task_id in {t.task_id for t in w.status().tasks}), None)
    return wait_for(holder, 60, 0.1, f"an ingest replica to read the camera of {task_id}")


def _results(client: Client, task_id: str) -> tuple[list[dict], int]:
    """The task's keypoint records, and the frames of its annotated video."""
    keypoints, video = io.BytesIO(), io.BytesIO()
    client.download(task_id, "keypoints", keypoints)
    client.download(task_id, "video", video)
    with av.open(io.BytesIO(video.getvalue())) as c:
        frames = sum(1 for _ in c.decode(video=0))
    return [json.loads(line) for line in keypoints.getvalue().decode().splitlines()], frames


def test_a_camera_read_by_an_ingest_replica_is_thinned_to_keep_the_lag_bounded(mesh, client, cameras):
    """A 1080p30 camera outruns two cores: the replica drops frames at the source to keep the lag within the
    bound, following the annotate stage through its committed offsets; the camera's end completes the task."""
    source = cameras.url("live/town")
    camera = PublishingCamera(media("towncentre_1080p_302f.mp4"), cameras.url("publish/town"), loops=1).start()
    wait_for(lambda: rtsp_describe(source)[0] == 200, 20, 0.1, "the camera to publish")
    started = time.time()
    task = client.start_live(source)
    lags, snapshot, holder = LagReadings(started, camera), None, None
    for snapshot in client.watch(task.task_id):
        holder = holder or _reading_camera(mesh, task.task_id)
        lags.see(snapshot)
    camera.stop()
    assert snapshot.state == tpb.TASK_STATE_COMPLETED and "ended" in snapshot.error_message, snapshot.error_message
    live = snapshot.live
    # A rebalance of the stages stops the mesh for a second or more, and the lag grows by that long (CI run 75
    # saw 3.48 s once, which needs at least 0.98 s of it: the rebalances log 1.00-1.05 s). Over the bound by more
    # than that, it says when (seconds after the start, lag, frames received and packets sent by then) and what the
    # processes did meanwhile.
    over = mesh.lags_over_bound(lags, started, MAX_LAG_S)
    assert live.frames_dropped > 0 and lags and not over, f"{live}\n" + mesh.lag_report(
        lags, over, started, camera, "reading", "rebalanced", "new Kafka clients", "ingest partitions", "took",
        "WARNING", "ERROR")
    records, video_frames = _results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records))) and len(records) >= 5
    assert len(records) == live.frames_received - live.frames_dropped == video_frames
    assert holder.status().frames_processed >= len(records)  # the replica published them, not the gateway


def test_sigkill_of_the_ingest_replica_reading_a_camera_moves_the_camera_to_another(mesh, client, cameras):
    """The other replica takes the job over, reads back where the stream stopped and opens the camera again:
    one result with every frame of both readers (indices dense, times growing across the gap), the counts of
    both readers added up, and a cancel that reaches the new reader keeps the results."""
    task = client.start_live(cameras.url("cam/long"))
    victim = _reading_camera(mesh, task.task_id)
    wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 8, 120, 0.2, "8 annotated frames")
    mesh.kill(victim)
    replacement = mesh.start_worker(INGEST)  # as a supervisor would
    before = client.get(task.task_id)
    read_before = before.progress[0].frames_done  # as far as the killed replica got to say
    going_on = wait_for(lambda: (t := client.get(task.task_id)).live.reconnects > before.live.reconnects and
                        t.progress[-1].frames_done >= read_before + 8 and t, 120, 0.2, "8 more annotated frames")
    assert going_on.state == tpb.TASK_STATE_RUNNING and not going_on.ending
    assert going_on.live.frames_received > before.live.frames_received  # added to, not started over
    client.cancel(task.task_id)
    done = client.wait(task.task_id, timeout_s=120)
    assert done.state == tpb.TASK_STATE_CANCELLED and done.artifacts, done.error_message
    records, video_frames = _results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records))) and len(records) >= read_before + 8
    times = [r["timestamp_s"] for r in records]
    assert all(t1 > t0 for t0, t1 in zip(times, times[1:])), "times grow across the take-over"
    assert video_frames == len(records)
    mesh.wait_healthy()
    assert replacement.alive()


def test_a_camera_goes_on_uninterrupted_while_the_gateway_is_killed_and_started_again(mesh, client, cameras):
    """The camera is its ingest replica's: the gateway that started the task dies and comes back, writes the
    task's job again (the replica reading the camera keeps it: the same run), and the camera is never let go;
    a cancel after that still reaches it and keeps the results."""
    task = client.start_live(cameras.url("cam/long"))
    holder = _reading_camera(mesh, task.task_id)
    wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 5, 120, 0.2, "5 annotated frames")
    mesh.kill_gateway()
    mesh.start_gateway()
    before = client.get(task.task_id)
    going_on = wait_for(lambda: (t := client.get(task.task_id)).progress[-1].frames_done >=
                        before.progress[-1].frames_done + 5 and t, 120, 0.2, "5 more annotated frames")
    assert going_on.live.reconnects == 0 and going_on.live.connected, going_on.live
    readers = [w for w in mesh.replicas(INGEST) if task.task_id in {t.task_id for t in w.status().tasks}]
    assert readers == [holder]
    client.cancel(task.task_id)
    done = client.wait(task.task_id, timeout_s=120)
    assert done.state == tpb.TASK_STATE_CANCELLED and done.artifacts, done.error_message
    records, video_frames = _results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records))) == list(range(video_frames))
    assert len(records) >= going_on.progress[-1].frames_done


def test_a_camera_taken_off_the_allow_list_is_stopped_as_the_gateway_starts_again(mesh, client, cameras):
    """The operator narrows POSEMESH_LIVE_SOURCES and restarts the gateway: the camera an ingest replica reads
    from a host no longer allowed is stopped, and the task fails saying why, its frames so far in the results
    (as when the gateway itself read the camera)."""
    task = client.start_live(cameras.url("cam/long"))
    _reading_camera(mesh, task.task_id)
    wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 5, 120, 0.2, "5 annotated frames")
    mesh.kill_gateway()
    try:
        mesh.start_gateway(POSEMESH_LIVE_SOURCES="rtsp://192.0.2.1:*")
        done = client.wait(task.task_id, timeout_s=120)
    finally:
        stop_process(mesh.gateway, grace=10)
        mesh.start_gateway()
    assert done.state == tpb.TASK_STATE_FAILED and "not allowed any more" in done.error_message, done.error_message
    assert done.artifacts
    records, video_frames = _results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records))) == list(range(video_frames))
    assert len(records) >= 5
    assert not [w for w in mesh.replicas(INGEST) if task.task_id in {t.task_id for t in w.status().tasks}]


def test_the_broker_killed_and_restarted_mid_decoding_runs_the_task_again_frame_exact(mesh, clip, reference):
    """The memory-only broker comes back empty: the ingest replicas start over in a new group on the new
    posemesh.ingest, and the gateway hands the upload over again under a new run."""
    task = upload(mesh.stub, clip, auth())
    _decoding(mesh, task.task_id, 12)
    # One replica of each stage here: a worker that dies as the broker comes back is started again, as a
    # supervisor would (a local run saw track die so, and the task wait for it forever).
    with mesh.supervised() as died:
        mesh.restart_broker(down_s=1.0)
        done = assert_same_as_reference(mesh, task.task_id, reference)
    assert any("lost its data" in w for w in done.warnings)
    mesh.wait_healthy()
    # librdkafka's SIGSEGV when cached topics go (see test_resilience's broker test); any other death fails.
    assert all(status == -signal.SIGSEGV for _stage, status in died), died
    if died:
        pytest.xfail(f"librdkafka's crash as the broker came back (task exact nonetheless, once restarted): {died}")
