"""posemesh.control replayed as Apache Kafka leaves it after log compaction (stages/control.py).

The local broker never compacts, so a history compacted the way Kafka compacts it (the latest record of
each key, in offset order; tombstones gone once delete.retention.ms has passed) is written to a fresh
broker's control topic, and a real ControlFollower replays it.
"""

from __future__ import annotations

import time

from confluent_kafka import Producer

from posemesh.devstack.broker import LocalBroker
from posemesh.mesh import kafka
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import make_settings


def compact(records: list[tuple[bytes, bytes | None]], drop_tombstones: bool) -> list[tuple[bytes, bytes | None]]:
    """Kafka's log compaction of one partition: keep the last record of each key where it stood; a tombstone
    (no value) is itself removed once delete.retention.ms has passed."""
    last = {key: offset for offset, (key, _value) in enumerate(records)}
    kept = [(k, v) for offset, (k, v) in enumerate(records) if last[k] == offset]
    return [(k, v) for k, v in kept if v is not None] if drop_tombstones else kept


def history() -> tuple[list[tuple[bytes, bytes | None]], dict[str, str]]:
    """Control events of four tasks as the gateway publishes them, interleaved as they happen."""
    ids = {name: f"{name}{time.time_ns():x}"[:24] for name in ("running", "ended", "reserved", "rerun")}
    running, ended, reserved, rerun = ids["running"], ids["ended"], ids["reserved"], ids["rerun"]
    options = tpb.TaskOptions(pose_model=tpb.POSE_MODEL_BLAZEPOSE_FULL, min_person_score=0.4)
    events = [
        pb.ControlEvent(task_id=running, reserved=pb.TaskReserved()),
        pb.ControlEvent(task_id=reserved, reserved=pb.TaskReserved()),
        pb.ControlEvent(task_id=running, started=pb.TaskStarted(options=options, epoch=1)),
        pb.ControlEvent(task_id=ended, started=pb.TaskStarted(epoch=1)),
        pb.ControlEvent(task_id=rerun, started=pb.TaskStarted(epoch=1)),
        pb.ControlEvent(task_id=running, viewers=pb.ViewersChanged(count=1)),
        pb.ControlEvent(task_id=ended, viewers=pb.ViewersChanged(count=2)),
        pb.ControlEvent(task_id=rerun, started=pb.TaskStarted(epoch=2)),  # run again after a broker loss
        pb.ControlEvent(task_id=rerun, viewers=pb.ViewersChanged(count=3)),
        pb.ControlEvent(task_id=running, viewers=pb.ViewersChanged(count=0)),  # the viewer left
        pb.ControlEvent(task_id=running, source_stopped=pb.SourceStopped(reason="not allowed any more",
                                                                         state=tpb.TASK_STATE_FAILED)),
        pb.ControlEvent(task_id=ended, source_stopped=pb.SourceStopped(reason="cancelled by the user")),
        pb.ControlEvent(task_id=ended, ended=pb.TaskEnded(state=tpb.TASK_STATE_COMPLETED)),
    ]
    return [record for event in events for record in kafka.control_records(event)], ids


def test_each_key_names_one_fact_of_one_task_and_an_end_clears_the_others():
    started = kafka.control_records(pb.ControlEvent(task_id="t" * 12, started=pb.TaskStarted(epoch=1)))
    viewers = kafka.control_records(pb.ControlEvent(task_id="t" * 12, viewers=pb.ViewersChanged(count=1)))
    assert started[0][0] != viewers[0][0]
    ended = kafka.control_records(pb.ControlEvent(task_id="t" * 12, ended=pb.TaskEnded()))
    assert ended[0][1] is not None and [v for _k, v in ended[1:]] == [None] * (len(kafka.CONTROL_KINDS) - 1)
    assert {k for k, _v in ended} == {kafka.control_key("t" * 12, kind) for kind in kafka.CONTROL_KINDS}


def replayed(records: list[tuple[bytes, bytes | None]], tmp_path):
    """What a freshly started worker's ControlFollower knows after replaying exactly these records."""
    from posemesh.stages.control import ControlFollower

    tmp_path.mkdir(parents=True, exist_ok=True)
    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = make_settings(broker, tmp_path)
        kafka.ensure_shared_topics(settings)
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        for key, value in records:
            producer.produce(kafka.CONTROL_TOPIC, value, key=key)
        assert producer.flush(10) == 0
        follower = ControlFollower(settings, "compaction-test")
        follower.start()
        try:
            assert follower.caught_up.wait(20), "the replay never reached the end of posemesh.control"
            with follower.lock:
                return (dict(follower.live), dict(follower.ended), dict(follower.viewers), set(follower.reserved),
                        dict(follower.stopped))
        finally:
            follower.stop()
            follower.join(5)


def check_state(state, ids) -> None:
    live, ended, viewers, reserved, stopped = state
    assert set(live) == {ids["running"], ids["rerun"]}, "a running task was lost from the history"
    assert live[ids["running"]].options.pose_model == tpb.POSE_MODEL_BLAZEPOSE_FULL
    assert abs(live[ids["running"]].options.min_person_score - 0.4) < 1e-6
    assert live[ids["rerun"]].epoch == 2
    assert ended == {ids["ended"]: tpb.TASK_STATE_COMPLETED}
    assert viewers == {ids["rerun"]: 3}
    assert reserved == {ids["reserved"]}
    # A live task's camera to stop, and how the task then ends, until it ends.
    assert stopped == {ids["running"]: pb.SourceStopped(reason="not allowed any more", state=tpb.TASK_STATE_FAILED)}


def test_a_worker_rebuilds_every_task_from_a_history_compacted_as_apache_kafka_does(tmp_path):
    records, ids = history()
    compacted = compact(records, drop_tombstones=True)
    assert len(compacted) < len(records)  # compaction really removed records, the ended task's older facts among them
    assert not [k for k, _v in compacted if k.startswith(ids["ended"].encode()) and not k.endswith(b"/ended")]
    check_state(replayed(compacted, tmp_path / "compacted"), ids)


def test_the_uncompacted_history_with_its_tombstones_gives_the_same_state(tmp_path):
    """What the local broker (which never compacts) replays, and Kafka before the cleaner has run."""
    records, ids = history()
    check_state(replayed(records, tmp_path / "full"), ids)
    compacted_keeping_tombstones = compact(records, drop_tombstones=False)
    check_state(replayed(compacted_keeping_tombstones, tmp_path / "tombstones"), ids)


class CountedPolls:
    """A real consumer whose polls are counted (nothing else about it changes)."""

    def __init__(self, consumer):
        self.consumer, self.polls = consumer, 0

    def poll(self, timeout):
        self.polls += 1
        return self.consumer.poll(timeout)

    def __getattr__(self, name):
        return getattr(self.consumer, name)


def test_a_caught_up_follower_polls_once_a_second_and_still_hears_a_start_at_once(tmp_path):
    """An idle worker's follower used to poll ten times a second, finding nothing. A poll ends at the first record,
    so its timeout can run to the next incarnation check without delaying any event."""
    from posemesh.stages.control import CHECK_EVERY_S, ControlFollower

    class Counted(ControlFollower):
        counted: CountedPolls | None = None

        def _follow(self, consumer, admin, incarnation):
            self.counted = CountedPolls(consumer)
            return super()._follow(self.counted, admin, incarnation)

    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = make_settings(broker, tmp_path)
        kafka.ensure_shared_topics(settings)
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        follower = Counted(settings, "idle-polls-test")
        follower.start()
        try:
            assert follower.caught_up.wait(20), "the replay never reached the end of posemesh.control"
            polls, t0 = follower.counted.polls, time.monotonic()
            time.sleep(4 * CHECK_EVERY_S)
            rate = (follower.counted.polls - polls) / (time.monotonic() - t0)
            assert rate <= 1.5 / CHECK_EVERY_S, f"{rate:.1f} polls a second while nothing happens"
            heard = []
            for n in range(3):
                time.sleep(0.37 * CHECK_EVERY_S)  # somewhere inside a poll's wait
                task_id = f"started{n}{time.time_ns():x}"[:24]
                event = pb.ControlEvent(task_id=task_id, started=pb.TaskStarted(epoch=1))
                for key, value in kafka.control_records(event):
                    producer.produce(kafka.CONTROL_TOPIC, value, key=key)
                sent = time.monotonic()
                assert producer.flush(10) == 0
                while follower.started(task_id) is None and time.monotonic() - sent < 10:
                    time.sleep(0.01)
                heard.append(time.monotonic() - sent)
            # The followers' fetch wait (kafka.FOLLOWER_FETCH_WAIT_MS, 0.25 s) and a margin; a start waiting out the
            # poll's timeout would be heard up to CHECK_EVERY_S later.
            assert sorted(heard)[1] < 0.6 * CHECK_EVERY_S, f"TaskStarted heard after {heard} s"
        finally:
            follower.stop()
            follower.join(5)
