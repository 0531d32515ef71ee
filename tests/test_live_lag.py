"""The clock of a live task's lag (posemesh.mesh.live.FinishedClock): when each frame was first seen finished
by the annotate stage, looked at by a thread of its own while frames are in flight, so that a camera that
sends nothing for a while does not make the frames finished meanwhile look late. Pure logic: the count of
finished frames is a counter here (the real mesh's is in tests/test_live.py)."""

from __future__ import annotations

import threading
import time

from posemesh.mesh.live import FINISHED_LOOK_S, FinishedClock


class Counter:
    """What annotate has finished, and how often it was asked."""

    def __init__(self):
        self.count, self.asked = 0, 0

    def __call__(self) -> int:
        self.asked += 1
        return self.count


def test_each_frame_is_stamped_when_its_count_was_first_seen():
    finished = Counter()
    clock = FinishedClock(finished)
    finished.count = 2
    before = time.monotonic()
    assert clock.look() == 2
    after = time.monotonic()
    time.sleep(0.05)
    assert clock.look() == 2  # seen again: its stamp stays the first one
    finished.count = 5
    assert clock.look() == 5
    assert before <= clock.finished_at(0) == clock.finished_at(1) <= after
    assert clock.finished_at(2) == clock.finished_at(4) > after


def test_a_count_read_lower_again_does_not_go_back():
    finished = Counter()
    clock = FinishedClock(finished)
    finished.count = 7
    assert clock.look() == 7
    finished.count = 3  # a store that answered with an older count
    assert clock.look() == 7


def test_frames_finished_while_the_camera_is_quiet_are_stamped_then_not_at_its_next_frame():
    finished, in_flight, stop = Counter(), [True], threading.Event()
    clock = FinishedClock(finished)
    follower = threading.Thread(target=clock.follow, args=(lambda: in_flight[0], stop), daemon=True)
    follower.start()
    try:
        time.sleep(0.2)
        finished.count = 4
        done = time.monotonic()
        time.sleep(1.5)  # the camera is quiet: the reader looks again only at its next frame
        assert clock.look() == 4
        assert clock.finished_at(3) - done < 0.5, "stamped when the reader looked, not when the frames finished"
    finally:
        stop.set()
        follower.join(2)
    assert not follower.is_alive()


def test_nothing_in_flight_is_not_looked_at():
    finished, stop = Counter(), threading.Event()
    clock = FinishedClock(finished)
    follower = threading.Thread(target=clock.follow, args=(lambda: False, stop), daemon=True)
    follower.start()
    time.sleep(5 * FINISHED_LOOK_S)
    stop.set()
    follower.join(2)
    assert finished.asked == 0
