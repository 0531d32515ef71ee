"""The task lifecycle (gateway/lifecycle.py) runs a task again the way it started it: every TaskStarted it
announces, first or again, says all a stage needs, a live task's publish URL included. Against the real
broker, reading what posemesh.control carries."""

from __future__ import annotations

from confluent_kafka import Producer

from posemesh.devstack.processes import free_port
from posemesh.gateway.lifecycle import TaskLifecycle
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.sources import SourcePolicy
from posemesh.gateway.store import TaskStore, now_us, timestamp
from posemesh.gateway.topics import TopicManager
from posemesh.mesh import kafka, names
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import make_settings
from tests.helpers import control_events, read_topic

PUBLISH = "rtsp://127.0.0.1:8554/publish/{task}"


def live_settings(broker, data_dir):
    return make_settings(broker, data_dir, live_sources="rtsp://127.0.0.1:*", live_publish_url=PUBLISH,
                         reserved_tasks=0)


def live_task(camera_port: int) -> tpb.Task:
    return tpb.Task(task_id=names.new_task_id(), state=tpb.TASK_STATE_QUEUED, file_name="cam",
                    options=tpb.TaskOptions(), video=tpb.VideoInfo(width=64, height=48, fps=5.0),
                    created_at=timestamp(now_us()),
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
    expected = PUBLISH.replace("{task}", task.task_id)
    started = announced(settings.kafka_bootstrap, task.task_id)
    assert [(s.epoch, s.live, s.publish_url) for s in started] == [(0, True, expected), (1, True, expected)]
    assert store.get(task.task_id).state == tpb.TASK_STATE_RUNNING


def test_live_tasks_go_on_after_a_gateway_restart_announced_with_their_publish_url(gateway_factory, broker, tmp_path):
    """Two live tasks of a gateway that stopped: one whose camera had finished (its frames all out, waiting
    for its results), one still reading (its stream is closed after the frames that went in). The next
    gateway announces both again, as the first did, publish URL included."""
    data = tmp_path / "data"
    settings = live_settings(broker, data)
    kafka.ensure_shared_topics(settings)
    store = TaskStore(settings.db_path)
    admin = kafka.admin(settings)
    finished, reading = live_task(free_port()), live_task(free_port())
    for task in (finished, reading):
        store.create(task, "alice", None)
        store.transition(task.task_id, tpb.TASK_STATE_RUNNING)
        store.set_live_source(task.task_id, task.live.source, tpb.RTSP_TRANSPORT_TCP)
        kafka.create_topics(admin, kafka.task_topic_specs(task.task_id, settings))
    store.record_ending(finished.task_id, tpb.TASK_STATE_COMPLETED, "the live stream ended")
    store.add_done(reading.task_id, "decode", [(0, 2)], 0)  # three frames went in before the restart
    store.close()

    gw = gateway_factory(data, live_sources=settings.live_sources, live_publish_url=PUBLISH, reserved_tasks=0)
    for task in (finished, reading):
        expected = PUBLISH.replace("{task}", task.task_id)
        started = announced(settings.kafka_bootstrap, task.task_id)
        assert [(s.epoch, s.live, s.publish_url) for s in started] == [(0, True, expected)], task.task_id
    raw_frames = kafka.task_topic(kafka.RAW_FRAMES, reading.task_id)
    [end] = [r for r in read_topic(settings.kafka_bootstrap, raw_frames, until_eos=False, timeout=20)
             if r.HasField("end_of_stream")]
    assert end.end_of_stream.total_frames == 3 and end.epoch == 0
    assert gw.gateway.store.ending(reading.task_id)[0] == tpb.TASK_STATE_FAILED
    assert gw.gateway.store.ending(finished.task_id) == (tpb.TASK_STATE_COMPLETED, "the live stream ended")
