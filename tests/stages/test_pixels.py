"""When a stage that takes frames handed over on its host reads a task's JPEGs ahead from the broker
(stages/pixels.py `RingMisses`), as pure logic; what pose and annotate then read from the real broker is counted in
tests/test_outputs.py (`test_on_one_host_pose_and_annotate_take_frames_from_the_ring...`)."""

from __future__ import annotations

from posemesh.stages.pixels import MISSING_BATCHES_TO_READ_AHEAD, RingMisses


def test_a_task_whose_ring_gives_its_frames_is_read_on_demand():
    misses = RingMisses()
    assert misses.expects_ring("a")
    assert misses.batch("a", found=8, missed=0) is True


def test_one_batch_of_misses_is_not_enough_to_read_ahead_again_but_a_streak_is():
    """A task's first frames may come before its ring was made; a ring that stays empty means the stage before is
    on another host."""
    misses = RingMisses()
    for _ in range(MISSING_BATCHES_TO_READ_AHEAD - 1):
        assert misses.batch("a", found=1, missed=7) is None
        assert misses.expects_ring("a")
    assert misses.batch("a", found=0, missed=8) is False
    assert not misses.expects_ring("a")  # a partition of it that moves here is read ahead from the start
    assert misses.batch("a", found=0, missed=8) is False


def test_a_batch_fully_found_ends_the_streak_and_a_mostly_found_one_changes_nothing():
    misses = RingMisses()
    for _ in range(MISSING_BATCHES_TO_READ_AHEAD):
        misses.batch("a", found=0, missed=8)
    assert misses.batch("a", found=5, missed=3) is None  # mostly found, not all: as before (read ahead)
    assert not misses.expects_ring("a")
    assert misses.batch("a", found=8, missed=0) is True
    assert misses.expects_ring("a")


def test_tasks_are_counted_apart_and_a_forgotten_one_starts_over():
    misses = RingMisses()
    for _ in range(MISSING_BATCHES_TO_READ_AHEAD):
        misses.batch("a", found=0, missed=8)
    assert not misses.expects_ring("a") and misses.expects_ring("b")
    misses.forget("a")
    assert misses.expects_ring("a")
