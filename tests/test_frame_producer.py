"""The frame producer (posemesh.mesh.frames.FrameProducer). Its back-pressure: it waits while a frame would run more
than MAX_FRAMES_AHEAD ahead of the last stage, and never for good; and the gateway's count it follows
(posemesh.gateway.lifecycle.FinishedSoFar). Pure logic: the counts are plain functions, and the producer's Kafka
producer points at a port where nothing listens (nothing is sent). Then a frame too large for a record, against
the real local broker, and a cancelled producer's Kafka client, in a process of its own."""

from __future__ import annotations

import logging
import threading
import time

from posemesh.gateway.lifecycle import FinishedSoFar
from posemesh.mesh import frames, kafka, names
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import make_settings, media
from tests.helpers import make_clip


def producer(finished) -> frames.FrameProducer:
    return frames.FrameProducer(tpb.Task(task_id="t1"), None, {"bootstrap.servers": "127.0.0.1:9"}, 4, 80,
                                on_progress=None, on_done=None, on_error=None, frames_finished=finished, max_ahead=8)


def test_it_waits_until_the_last_stage_catches_up():
    done = [0]
    threading.Timer(0.5, lambda: done.__setitem__(0, 10)).start()
    start = time.monotonic()
    producer(lambda: done[0])._wait_for_the_pipeline(16)
    assert 0.4 < time.monotonic() - start < 5.0


def test_a_count_that_stands_still_stops_the_waiting_until_it_moves(monkeypatch, caplog):
    """Progress reports can be lost (a worker's report queue full, a follower that started late): back-pressure
    then stops waiting after STUCK_S, rather than hold the task until the stall limit fails it, and says so
    once; once the count moves again, it paces again."""
    monkeypatch.setattr(frames, "STUCK_S", 0.6)
    done = [0]
    p = producer(lambda: done[0])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="posemesh.frames"):
        p._wait_for_the_pipeline(64)
        assert 0.5 < time.monotonic() - start < 5.0
        start = time.monotonic()
        p._wait_for_the_pipeline(72)  # still stuck: no second wait, no second warning
        assert time.monotonic() - start < 0.3
    assert len([r for r in caplog.records if "no progress" in r.getMessage()]) == 1
    done[0] = 64  # it moved: frame 72 is within the window, frame 80 is not
    start = time.monotonic()
    p._wait_for_the_pipeline(72)
    assert time.monotonic() - start < 0.3
    threading.Timer(0.4, lambda: done.__setitem__(0, 72)).start()
    start = time.monotonic()
    p._wait_for_the_pipeline(80)
    assert 0.3 < time.monotonic() - start < 0.6 + 0.5


def test_a_cancelled_task_stops_waiting():
    p = producer(lambda: 0)
    threading.Timer(0.3, p.cancelled.set).start()
    start = time.monotonic()
    p._wait_for_the_pipeline(64)
    assert time.monotonic() - start < 5.0 < frames.STUCK_S


class FlakyStore:
    """A task store that does not answer while `away`."""

    def __init__(self):
        self.away, self.done = False, 0

    def frames_done(self, task_id: str, stage: str) -> int:
        if self.away:
            raise ConnectionError("the task store is away")
        return self.done


def test_the_gateway_keeps_the_last_count_while_the_task_store_is_away(caplog):
    """The store briefly away: the upload neither fails nor runs past its window (the last count stands), and
    that is said once."""
    store = FlakyStore()
    finished = FinishedSoFar(store, "t1")
    store.done = 10
    assert finished() == 10
    store.away = True
    with caplog.at_level(logging.WARNING, logger="posemesh.gateway"):
        assert [finished(), finished()] == [10, 10]
    assert len([r for r in caplog.records if "does not answer" in r.getMessage()]) == 1
    store.away, store.done = False, 20
    assert finished() == 20


def test_a_frame_too_large_for_a_record_fails_its_task_at_once_saying_what_to_change(broker, tmp_path):
    """A frame whose JPEG is more than the producer may send (a noisy 4K picture at a high quality: 20 MB at 95)
    fails its task with what a person can change, instead of "decoding failed" or a producer that keeps trying."""
    settings = make_settings(broker, tmp_path)
    task = tpb.Task(task_id=names.new_task_id())
    task.video.fps = 25.0
    topic = kafka.task_topic(kafka.RAW_FRAMES, task.task_id)
    kafka.create_topics(kafka.admin(settings), [kafka.TopicSpec(topic, 4, {})])
    clip = make_clip(media("towncentre_1080p_302f.mp4"), tmp_path / "clip.mp4", 3)  # 1080p: ~180 kB at quality 80
    config = {**kafka.producer_config(settings, "test-too-large"), "message.max.bytes": 100_000}
    errors, ended = [], threading.Event()
    producer = frames.FrameProducer(task, clip, config, 4, 80, on_progress=lambda first, last: None,
                                    on_done=lambda count: ended.set(),
                                    on_error=lambda message: (errors.append(message), ended.set()))
    producer.start()
    try:
        assert ended.wait(60)
        [message] = errors
        assert message.startswith("frame 0 takes 0.") and "more than the 0.10 MiB the message broker takes" in message
        assert "scale the video down" in message and "POSEMESH_JPEG_QUALITY, 80 now" in message
        producer.join(30)
        assert not producer.is_alive()
    finally:
        producer.cancelled.set()
        kafka.delete_topics(kafka.admin(settings), [topic])


LETS_GO = """
import gc, os, sys, time
from pathlib import Path
from posemesh.mesh import frames
from posemesh.v1 import task_service_pb2 as tpb

def kafka_threads():
    count = 0
    for t in os.listdir("/proc/self/task"):
        try:
            count += open(f"/proc/self/task/{t}/comm").read().startswith("rdk:")
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            pass
    return count

task = tpb.Task(task_id="t1")
task.video.fps = 25.0
p = frames.FrameProducer(task, Path(sys.argv[1]), {"bootstrap.servers": "127.0.0.1:9"}, 4, 80,
                         on_progress=lambda first, last: None, on_done=None, on_error=None)
p.start()
deadline = time.monotonic() + 60
while len(p.producer) < 40 and time.monotonic() < deadline:
    time.sleep(0.05)
held = len(p.producer)
p.cancelled.set()
p.join(30)
print("held", held, "alive", p.is_alive())
with_it = kafka_threads()
del p
frames.kafka.SPARE_PRODUCERS.clear()  # the next task's producer, made ahead: not the cancelled one
gc.collect()
time.sleep(1.0)
print("threads", with_it, kafka_threads())
"""


def test_a_cancelled_frame_producer_lets_go_of_its_kafka_client():
    """A task's producer dropped with records still unsent (a cancelled task; a broker that never answered) must
    take its librdkafka client with it: each record holds its delivery callback, and a callback that held the
    producer kept it, its threads and its broker connections alive as long as the gateway (a CI run ended with
    hundreds). Its own process: librdkafka's threads are counted."""
    import subprocess
    import sys

    from tests.conftest import media

    out = subprocess.run([sys.executable, "-c", LETS_GO, str(media("vtest_opencv_480x360.mp4"))],
                         capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert int(lines["held"].split()[0]) >= 40 and lines["held"].split()[-1] == "False", out.stdout + out.stderr
    with_it, after = (int(n) for n in lines["threads"].split())
    assert with_it > 0 and after == 0, out.stdout
