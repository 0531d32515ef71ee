"""The task lifecycle (gateway/lifecycle.py) runs a task again the way it started it: every TaskStarted it
announces, first or again, says all a stage needs, a live task's publish URL included. Against the real
broker, reading what posemesh.control carries."""

from __future__ import annotations

import gc
import time

import pytest
from confluent_kafka import Producer

from posemesh.devstack import rtsp
from posemesh.devstack.processes import free_port
from posemesh.gateway.lifecycle import TaskLifecycle, new_stream_token
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.sources import SourcePolicy
from posemesh.gateway.store import TaskStore, now_us, timestamp
from posemesh.gateway.topics import TopicManager
from posemesh.mesh import kafka, names, records
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import make_settings, media
from tests.helpers import PublishingCamera, control_events, read_topic, rtsp_describe, wait_for

PUBLISH = "rtsp://127.0.0.1:8554/publish/{task}"


def live_settings(broker, data_dir):
    return make_settings(broker, data_dir, live_sources="rtsp://127.0.0.1:*", live_publish_url=PUBLISH,
                         reserved_tasks=0)


def live_task(camera_port: int) -> tpb.Task:
    return tpb.Task(task_id=names.new_task_id(), state=tpb.TASK_STATE_QUEUED, file_name="cam",
                    options=tpb.TaskOptions(), video=tpb.VideoInfo(width=64, height=48, fps=5.0),
                    created_at=timestamp(now_us()), stream_token=new_stream_token(),
                    live=tpb.LiveStatus(source=f"rtsp://127.0.0.1:{camera_port}/cam", max_lag_s=2.0))


def announced(bootstrap: str, task_id: str) -> list[pb.TaskStarted]:
    """Every TaskStarted posemesh.control holds for `task_id`, in order."""
    return [e.started for e in control_events(bootstrap) if e.task_id == task_id and e.HasField("started")]


def test_a_live_task_run_again_after_the_broker_lost_its_data_keeps_its_publish_url(broker, tmp_path):
    settings = live_settings(broker, tmp_path / "data")
    kafka.ensure_shared_topics(settings)
    store = TaskStore(settings.db_path)
    topics = TopicManager(settings, Producer(kafka.producer_config(settings, "lifecycle-test")), store)
    policy = SourcePolicy(settings.live_sources)
    lifecycle = TaskLifecycle(settings, store, topics, Reservations(topics, 0, 5.0), policy)
    task = live_task(free_port())  # nothing streams there: the source keeps reconnecting, which is all it needs
    store.create(task, "alice", None)
    try:
        lifecycle.start_live(task, policy.check(task.live.source), tpb.RTSP_TRANSPORT_TCP)
        lifecycle.halt()  # the broker lost its data: frames stop, then every active task runs again
        lifecycle.run_again()
        assert task.task_id in lifecycle.live_sources, "the camera is read again"
    finally:
        lifecycle.halt()
    expected = PUBLISH.replace("{task}", f"{task.task_id}/{task.stream_token}")  # its secret too
    started = announced(settings.kafka_bootstrap, task.task_id)
    assert [(s.epoch, s.live, s.publish_url) for s in started] == [(0, True, expected), (1, True, expected)]
    assert store.get(task.task_id).state == tpb.TASK_STATE_RUNNING


def _publish_frames(settings, task_id: str, indices: list[int], closed: bool = False) -> None:
    """Frames on a live task's raw_frames topic, as its reader wrote them before its gateway stopped (and the
    end of its stream, `closed`)."""
    producer = Producer(kafka.producer_config(settings, "earlier-reader"))
    partitions = kafka.partitions_for(kafka.RAW_FRAMES, settings)
    out = [records.frame_record(task_id, tpb.TaskOptions(), 0, pb.Frame(index=i, timestamp_s=0.2 * i))
           for i in indices]
    if closed:
        out.append(records.end_of_stream_record(task_id, tpb.TaskOptions(), 0, len(indices), 5.0))
    for record in out:
        producer.produce(kafka.task_topic(kafka.RAW_FRAMES, task_id), record.SerializeToString(),
                         partition=records.partition_of(record, partitions))
    assert producer.flush(10) == 0


def test_live_tasks_go_on_after_a_gateway_restart_announced_with_their_publish_url(gateway_factory, broker, tmp_path):
    """Four live tasks of a gateway that stopped: one whose camera had finished (its frames all out, waiting
    for its results), one still reading (its camera is read again, from the frame after those that went in),
    one whose stream lost a frame that later ones overtook (closed after the frames before the hole, and
    ending FAILED, saying why), and one whose stream its reader had closed just before it died (not closed
    again). The next gateway announces them again, as the first did, publish URL included."""
    data = tmp_path / "data"
    settings = live_settings(broker, data)
    kafka.ensure_shared_topics(settings)
    store = TaskStore(settings.db_path)
    admin = kafka.admin(settings)
    finished, reading, broken, closing = (live_task(free_port()) for _ in range(4))
    for task in (finished, reading, broken, closing):
        store.create(task, "alice", None)
        store.transition(task.task_id, tpb.TASK_STATE_RUNNING)
        store.set_live_source(task.task_id, task.live.source, tpb.RTSP_TRANSPORT_TCP)
        kafka.create_topics(admin, kafka.task_topic_specs(task.task_id, settings))
    store.record_ending(finished.task_id, tpb.TASK_STATE_COMPLETED, "the live stream ended")
    _publish_frames(settings, reading.task_id, [0, 1, 2])
    store.add_done(reading.task_id, "decode", [(0, 1)], 0)  # progress said two; three went in
    _publish_frames(settings, broken.task_id, [0, 1, 3, 4])  # frame 2 never landed
    store.add_done(broken.task_id, "decode", [(0, 4)], 0)
    _publish_frames(settings, closing.task_id, [0, 1, 2, 3, 4, 5], closed=True)  # its gateway died right after
    store.close()

    gw = gateway_factory(data, live_sources=settings.live_sources, live_publish_url=PUBLISH, reserved_tasks=0)
    for task in (finished, reading, broken):
        expected = PUBLISH.replace("{task}", f"{task.task_id}/{task.stream_token}")  # its secret too
        started = announced(settings.kafka_bootstrap, task.task_id)
        assert [(s.epoch, s.live, s.publish_url) for s in started] == [(0, True, expected)], task.task_id
    lifecycle = gw.gateway.lifecycle
    assert lifecycle.live_sources[reading.task_id].index == 3, "read again from the frame after those that went in"
    assert gw.gateway.store.ending(reading.task_id) is None
    [end] = [r for r in read_topic(settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, broken.task_id),
                                   until_eos=False, timeout=20) if r.HasField("end_of_stream")]
    assert end.end_of_stream.total_frames == 2 and end.epoch == 0, "closed after the frames before the hole"
    state, message = gw.gateway.store.ending(broken.task_id)
    assert state == tpb.TASK_STATE_FAILED and "frames of its stream were lost" in message, message
    assert broken.task_id not in lifecycle.live_sources
    # Closed already: it ends as its results arrive, with the count its end of stream gave, closed once only.
    state, message = gw.gateway.store.ending(closing.task_id)
    assert state == tpb.TASK_STATE_FAILED and "as its stream was being closed" in message, message
    ends = [r for r in read_topic(settings.kafka_bootstrap, kafka.task_topic(kafka.RAW_FRAMES, closing.task_id),
                                  until_eos=False, timeout=20) if r.HasField("end_of_stream")]
    assert [e.end_of_stream.total_frames for e in ends] == [6]
    assert closing.task_id not in lifecycle.live_sources
    assert gw.gateway.store.ending(finished.task_id) == (tpb.TASK_STATE_COMPLETED, "the live stream ended")


# ---------------------------------------------------------------------- CancelTask: the state it leaves

def _lifecycle(settings) -> tuple[TaskLifecycle, TaskStore, SourcePolicy]:
    kafka.ensure_shared_topics(settings)
    store = TaskStore(settings.db_path)
    topics = TopicManager(settings, Producer(kafka.producer_config(settings, "lifecycle-test")), store)
    policy = SourcePolicy(settings.live_sources)
    return TaskLifecycle(settings, store, topics, Reservations(topics, 0, 5.0), policy), store, policy


def _result(task_id: str) -> pb.TaskResult:
    """What annotate reports once a task's results are written."""
    return pb.TaskResult(task_id=task_id, frames_written=3, artifacts=[tpb.Artifact(
        kind=tpb.ARTIFACT_KIND_KEYPOINTS, file_name="keypoints.jsonl", size_bytes=10)])


@pytest.mark.skipif(bool(rtsp.available()), reason=rtsp.available() or "")
def test_cancel_answers_the_state_it_leaves_the_task_in(broker, tmp_path):
    """An upload's task is CANCELLED by the cancel itself. A live task keeps its results: the cancel stops its
    camera and leaves it RUNNING with `ending` CANCELLED, the same however often it is asked, until the
    results arrive; then it is CANCELLED with them (a stream that ended right after the cancel changes
    nothing). A live task whose stream had ended before the cancel keeps its ending (COMPLETED)."""
    settings = live_settings(broker, tmp_path / "data")
    settings.live_outage_s = 2.0  # how long an ended stream is tried again
    lifecycle, store, policy = _lifecycle(settings)
    clip = clips.repeat(media("mmpose_demo_960x540_5f.mp4"), tmp_path / "long.mp4", 40)
    with rtsp.RtspServer({"long": clip}, log_path=tmp_path / "rtsp.log") as camera:
        publishing = PublishingCamera(media("mmpose_demo_960x540_5f.mp4"), camera.url("publish/short"))
        try:
            upload = live_task(0)
            upload.ClearField("live")
            store.create(upload, "alice", None)
            store.transition(upload.task_id, tpb.TASK_STATE_RUNNING)
            answered = lifecycle.cancel(upload.task_id, "cancelled by the user")
            assert answered.state == tpb.TASK_STATE_CANCELLED and answered.HasField("finished_at")
            assert answered.ending == tpb.TASK_STATE_UNSPECIFIED
            stored = store.get(upload.task_id)
            assert (stored.state, stored.finished_at) == (answered.state, answered.finished_at)

            reading = live_task(camera.port)
            reading.live.source = camera.url("cam/long")
            store.create(reading, "alice", None)
            lifecycle.start_live(reading, policy.check(reading.live.source), tpb.RTSP_TRANSPORT_TCP)
            wait_for(lambda: store.get(reading.task_id).live.frames_received >= 2, 30, 0.1, "frames from the camera")
            for _ in range(2):  # a retried cancel (the SDK retries) answers the same and ends nothing early
                answered = lifecycle.cancel(reading.task_id, "cancelled by the user")
                assert (answered.state, answered.ending) == (tpb.TASK_STATE_RUNNING, tpb.TASK_STATE_CANCELLED)
                assert not answered.HasField("finished_at")
            wait_for(lambda: store.ending(reading.task_id), 15, 0.1, "the camera to be let go")
            assert store.ending(reading.task_id) == (tpb.TASK_STATE_CANCELLED, "cancelled by the user")
            again = lifecycle.cancel(reading.task_id, "cancelled by the user")
            assert (again.state, again.ending) == (tpb.TASK_STATE_RUNNING, tpb.TASK_STATE_CANCELLED)
            lifecycle.complete(_result(reading.task_id))
            done = store.get(reading.task_id)
            assert (done.state, done.ending, done.error_message) == (
                tpb.TASK_STATE_CANCELLED, tpb.TASK_STATE_CANCELLED, "cancelled by the user")
            assert [a.file_name for a in done.artifacts] == ["keypoints.jsonl"]

            ended = live_task(camera.port)
            ended.live.source = camera.url("live/short")  # a camera publishing to the relay, then gone
            publishing.start()
            wait_for(lambda: rtsp_describe(ended.live.source)[0] == 200, 20, 0.1, "the camera to publish")
            store.create(ended, "alice", None)
            lifecycle.start_live(ended, policy.check(ended.live.source), tpb.RTSP_TRANSPORT_TCP)
            wait_for(lambda: store.get(ended.task_id).live.frames_received >= 2, 30, 0.1, "frames from the camera")
            publishing.stop()
            wait_for(lambda: store.ending(ended.task_id), 30, 0.1, "the stream to end")
            answered = lifecycle.cancel(ended.task_id, "cancelled by the user")
            assert (answered.state, answered.ending) == (tpb.TASK_STATE_RUNNING, tpb.TASK_STATE_COMPLETED)
            lifecycle.complete(_result(ended.task_id))
            assert store.get(ended.task_id).state == tpb.TASK_STATE_COMPLETED
        finally:
            publishing.stop()
            lifecycle.halt()


@pytest.mark.skipif(bool(rtsp.available()), reason=rtsp.available() or "")
def test_a_camera_behind_a_relay_that_drops_out_is_read_again_until_the_outage_limit(broker, tmp_path):
    """A camera publishing through a relay goes away for 10 s: the relay still answers (it refuses the path),
    so it looks like a stream that ended; the task goes on reading it when it is back. Gone for good, it is
    tried until LIVE_OUTAGE_S without a frame; then the task ends COMPLETED, saying why, since the relay
    still answers (a source whose server is gone too ends FAILED: tests/test_live.py)."""
    settings = live_settings(broker, tmp_path / "data")
    settings.live_outage_s = 16.0
    lifecycle, store, policy = _lifecycle(settings)
    clip = clips.repeat(media("mmpose_demo_960x540_5f.mp4"), tmp_path / "long.mp4", 40)
    with rtsp.RtspServer(log_path=tmp_path / "rtsp.log") as relay:
        camera = PublishingCamera(clip, relay.url("publish/dock")).start()
        task = live_task(relay.port)
        task.live.source = relay.url("live/dock")
        try:
            wait_for(lambda: rtsp_describe(task.live.source)[0] == 200, 20, 0.1, "the camera to publish")
            store.create(task, "alice", None)
            lifecycle.start_live(task, policy.check(task.live.source), tpb.RTSP_TRANSPORT_TCP)
            wait_for(lambda: store.get(task.task_id).live.frames_received >= 6, 30, 0.1, "frames from the camera")
            camera.stop()
            gone = time.monotonic()
            wait_for(lambda: not store.get(task.task_id).live.connected, 15, 0.1, "the drop-out to show")
            before = store.get(task.task_id).live.frames_received
            time.sleep(max(0.0, gone + 10 - time.monotonic()))
            assert rtsp_describe(task.live.source)[0] == 404  # the relay answers, refusing the path
            assert store.ending(task.task_id) is None and store.get(task.task_id).state == tpb.TASK_STATE_RUNNING
            camera.start()  # back after 10 s
            wait_for(lambda: store.get(task.task_id).live.frames_received >= before + 6, 30, 0.1, "frames again")
            live = store.get(task.task_id).live
            assert live.connected and live.reconnects >= 1 and store.ending(task.task_id) is None

            camera.stop()  # gone for good
            gone = time.monotonic()
            state, message = wait_for(lambda: store.ending(task.task_id), 60, 0.1, "the task to give the camera up")
            took = time.monotonic() - gone
            print(f"given up {took:.1f} s after the camera left: {message}")
            assert state == tpb.TASK_STATE_COMPLETED and "ended" in message and "no frame for 16 s" in message
            assert 16 <= took <= 16 + 6
        finally:
            camera.stop()
            lifecycle.halt()


# ---------------------------------------------------------------------- an upload's frame producer

def test_an_upload_writes_through_a_producer_its_gateway_made_when_it_started(broker, tmp_path):
    """A new idempotent producer sends nothing for its first 0.5 s (mesh/kafka.py's SpareProducer), so a gateway that
    decodes uploads makes its first ones' producers as it starts (make_producers_ready): the first upload's frame
    producer is one of those, not a new one (which a configuration of its own would make)."""
    settings = make_settings(broker, tmp_path / "data", reserved_tasks=2)
    lifecycle, store, _policy = _lifecycle(settings)
    lifecycle.make_producers_ready()
    # The spares themselves (private): only their identity tells a producer made then from one made now.
    stocked = [p for spares in kafka.SPARE_PRODUCERS._spares.values() for p in spares]
    assert len(stocked) == 2
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(media("mmpose_demo_960x540_5f.mp4").read_bytes())
    task = tpb.Task(task_id=names.new_task_id(), state=tpb.TASK_STATE_QUEUED, file_name="clip.mp4",
                    options=tpb.TaskOptions(), video=tpb.VideoInfo(width=960, height=540, fps=5.0, frame_count=5),
                    created_at=timestamp(now_us()))
    store.create(task, "alice", None)
    try:
        lifecycle.start(task, clip)
        producer = lifecycle.frame_producers[task.task_id].producer
        assert any(producer is made for made in stocked)
    finally:
        lifecycle.halt()


def test_a_camera_is_read_through_a_producer_its_gateway_made_when_it_started(broker, tmp_path):
    """As the upload's above, for a camera: where cameras are allowed, the gateway makes a live reader's producer as
    it starts, so the first live task's first frame does not wait the new producer's 0.5 s; the next is made then.
    Where none is allowed, none is made (an idle producer costs a connection and librdkafka's threads)."""
    lifecycle, _store, _policy = _lifecycle(make_settings(broker, tmp_path / "none", reserved_tasks=0))
    try:
        lifecycle.make_producers_ready()
        assert not any(dict(key).get("client.id") == "gateway-live" for key in kafka.SPARE_PRODUCERS._spares)
    finally:
        lifecycle.halt()
    kafka.SPARE_PRODUCERS.clear()
    settings = live_settings(broker, tmp_path / "data")
    lifecycle, store, policy = _lifecycle(settings)
    lifecycle.make_producers_ready()
    # The spares themselves (private): only their identity tells a producer made then from one made now.
    live = [spares for key, spares in kafka.SPARE_PRODUCERS._spares.items()
            if dict(key).get("client.id") == "gateway-live"]
    assert [len(spares) for spares in live] == [1]
    stocked = live[0][0]
    task = live_task(free_port())  # nothing answers there: the reader keeps trying until the task is halted
    store.create(task, "alice", None)
    try:
        lifecycle.start_live(task, policy.check(task.live.source), tpb.RTSP_TRANSPORT_TCP)
        assert lifecycle.live_sources[task.task_id].producer is stocked
    finally:
        lifecycle.halt(join_s=10)
        # Without a collection here a producer of this test (gateway-live) outlived it, in some reference cycle, and
        # went on trying to reach the session's broker once that had stopped.
        gc.collect()
