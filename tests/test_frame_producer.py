"""The frame producer's back-pressure (posemesh.mesh.frames.FrameProducer): it waits while a frame would run more
than MAX_FRAMES_AHEAD ahead of the last stage, and never for good. The count it follows is a plain function here
(pure logic); the producer is a real one on the real broker, though nothing is sent."""

from __future__ import annotations

import threading
import time

from posemesh.mesh import frames, kafka
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import make_settings


def producer(broker, tmp_path, consumed) -> frames.FrameProducer:
    settings = make_settings(broker, tmp_path)
    return frames.FrameProducer(tpb.Task(task_id="t1"), tmp_path / "none.mp4", kafka.producer_config(settings, "test"),
                                4, 80, on_progress=None, on_done=None, on_error=None, frames_consumed=consumed,
                                max_ahead=8)


def test_it_waits_until_the_last_stage_catches_up(broker, tmp_path):
    done = [0]
    threading.Timer(0.5, lambda: done.__setitem__(0, 10)).start()
    start = time.monotonic()
    producer(broker, tmp_path, lambda: done[0])._wait_for_the_pipeline(16)
    assert 0.4 < time.monotonic() - start < 5.0


def test_a_count_that_cannot_be_read_is_asked_again(broker, tmp_path):
    """The task store briefly away: the producer neither fails the upload nor sends past the window; it asks again."""
    answers = iter([RuntimeError("the task store is away"), RuntimeError("still away"), 10])
    asked = []

    def consumed() -> int:
        answer = next(answers, 10)
        asked.append(answer)
        if isinstance(answer, Exception):
            raise answer
        return answer

    start = time.monotonic()
    producer(broker, tmp_path, consumed)._wait_for_the_pipeline(18)  # 18 - 10 <= 8 once 10 is read
    assert len(asked) == 3 and time.monotonic() - start < 2.0


def test_a_count_that_never_moves_does_not_stop_the_task(broker, tmp_path, monkeypatch):
    """Progress reports can be lost (a worker's report queue full, a follower that started late): back-pressure
    then lets the next frames in after STUCK_S, rather than hold the task until the stall limit fails it."""
    monkeypatch.setattr(frames, "STUCK_S", 0.6)
    start = time.monotonic()
    producer(broker, tmp_path, lambda: 0)._wait_for_the_pipeline(64)
    assert 0.5 < time.monotonic() - start < 5.0


def test_a_cancelled_task_stops_waiting(broker, tmp_path):
    p = producer(broker, tmp_path, lambda: 0)
    threading.Timer(0.3, p.cancelled.set).start()
    start = time.monotonic()
    p._wait_for_the_pipeline(64)
    assert time.monotonic() - start < 5.0 < frames.STUCK_S
