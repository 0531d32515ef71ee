"""The clock of a live task's lag (posemesh.mesh.live.FinishedClock): when each frame was first seen finished
by the annotate stage, looked at by a thread of its own while frames are in flight, so that a camera that
sends nothing for a while does not make the frames finished meanwhile look late. Pure logic: the count of
finished frames is a counter here, the camera a port where nothing answers, and the reader's Kafka producer
points at a port where nothing listens (nothing is sent). The real mesh's is in tests/test_live.py."""

from __future__ import annotations

import threading
import time

from posemesh.mesh.frames import FINISHED_EVERY_S
from posemesh.mesh.live import FinishedClock, LiveConfig, LiveSource, Source
from posemesh.v1 import task_service_pb2 as tpb


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
    finished, stop = Counter(), threading.Event()
    clock = FinishedClock(finished)
    follower = threading.Thread(target=clock.follow, args=(lambda: 3, stop), daemon=True)  # frames 0-3 in flight
    follower.start()
    try:
        time.sleep(0.2)
        finished.count = 4
        done = time.monotonic()
        time.sleep(2.0)  # the camera is quiet: the reader looks again only at its next frame
        assert clock.look() == 4
        assert clock.finished_at(3) - done < 1.0, "stamped when the reader looked, not when the frames finished"
    finally:
        stop.set()
        follower.join(2)
    assert not follower.is_alive()


def test_the_follower_does_not_look_with_nothing_in_flight_or_all_of_it_seen():
    finished, stop, newest = Counter(), threading.Event(), [None]
    clock = FinishedClock(finished)
    follower = threading.Thread(target=clock.follow, args=(lambda: newest[0], stop), daemon=True)
    follower.start()
    try:
        time.sleep(5 * FINISHED_EVERY_S)
        assert finished.asked == 0  # nothing in flight
        finished.count, newest[0] = 3, 2
        wait = time.monotonic() + 5
        while clock.count < 3 and time.monotonic() < wait:
            time.sleep(0.01)
        assert clock.count == 3
        asked = finished.asked
        time.sleep(5 * FINISHED_EVERY_S)
        assert finished.asked == asked  # frames 0-2 are all seen finished: no more looks
    finally:
        stop.set()
        follower.join(2)


def test_a_live_reader_counts_the_lag_to_when_annotate_finished_not_to_its_cameras_next_frame():
    """The reader's own lag, with its follower started by run(): no camera answers (it tries again with
    back-off, as for a camera gone quiet) while the one frame in flight is finished."""
    finished = Counter()
    reader = LiveSource(tpb.Task(task_id="t1", video=tpb.VideoInfo(fps=25.0)), Source.of("rtsp://127.0.0.1:9/none"),
                        tpb.RTSP_TRANSPORT_TCP, {"bootstrap.servers": "127.0.0.1:9"}, 1,
                        LiveConfig(outage_s=60.0, connect_timeout_s=1.0), annotated=finished,
                        on_status=lambda *_: None, on_end=lambda *_: None)
    arrived = time.monotonic()
    reader.arrivals.append((0, arrived))
    reader.index = 1
    reader.start()
    try:
        time.sleep(0.3)
        finished.count = 1
        time.sleep(2.0)
        reader._follow_the_mesh(time.monotonic(), reader.finished.look())  # what the camera's next frame does first
        assert reader.status.lag_s < 1.0, f"the lag read {reader.status.lag_s:.2f} s for a frame finished after 0.3 s"
    finally:
        reader.detach()  # leaves the (empty) stream open: nothing to flush
        reader.join(10)
    assert not reader.is_alive()


def test_frames_finished_after_the_cameras_last_one_are_in_the_status_before_the_end():
    """After the camera's last frame the status follows the frames still in flight (it said the lag of the last
    frame out before them, for as long as the task ran on). The camera never answers: the reader tries again
    until its outage limit (2 s) and then closes the stream (`on_closing` comes just before the end of stream,
    which goes to a broker that is not there and is given up after 0.5 s)."""
    finished, said, closing = Counter(), [], []
    reader = LiveSource(tpb.Task(task_id="t2", video=tpb.VideoInfo(fps=25.0)), Source.of("rtsp://127.0.0.1:9/none"),
                        tpb.RTSP_TRANSPORT_TCP, {"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 500}, 1,
                        LiveConfig(outage_s=2.0, connect_timeout_s=0.5, max_lag_s=2.0), annotated=finished,
                        on_status=lambda status, published: said.append((time.monotonic(), status.lag_s)),
                        on_end=lambda *_: None, on_closing=lambda *_: closing.append(time.monotonic()))
    started = time.monotonic()
    reader.arrivals.extend([(0, started), (1, started)])
    reader.index = 2
    reader.start()
    try:
        time.sleep(0.5)
        finished.count = 1  # frame 0 out at 0.5 s, while the camera is quiet
        time.sleep(0.7)
        finished.count = 2  # frame 1 out at 1.2 s
        reader.join(10)
        assert not reader.is_alive() and closing
        before_end = [lag for at, lag in said if at <= closing[0]]
        assert 1.1 <= before_end[-1] < 1.6, said  # frame 1's lag: not frame 0's, not 0 (never measured)
        assert any(0.4 <= lag < 0.9 for _, lag in said), said  # frame 0's, said while frame 1 was in flight
    finally:
        reader.detach()
        reader.join(10)
