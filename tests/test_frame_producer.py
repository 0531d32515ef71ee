"""The frame producer's back-pressure (posemesh.mesh.frames.FrameProducer): it waits while a frame would run more
than MAX_FRAMES_AHEAD ahead of the last stage, and never for good; and the gateway's count it follows
(posemesh.gateway.lifecycle.FinishedSoFar). Pure logic: the counts are plain functions, and the producer's Kafka
producer points at a port where nothing listens (nothing is sent)."""

from __future__ import annotations

import logging
import threading
import time

from posemesh.gateway.lifecycle import FinishedSoFar
from posemesh.mesh import frames
from posemesh.v1 import task_service_pb2 as tpb


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
