"""Where a worker's input partitions start after a rebalance (stages/reading.py `start_offsets`), as pure logic;
the consumer itself is tested on the real broker in tests/test_runtime.py."""

from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING

from posemesh.stages.base import Recovery
from posemesh.stages.reading import start_offsets

A, B, C = ("rtmpose_a", 0), ("rtmpose_b", 0), ("rtmpose_c", 0)


def test_a_partition_kept_through_a_rebalance_continues_at_our_position():
    starts, fresh = start_offsets({A, B}, owned={A}, positions={A: 18}, recovery=Recovery.REPLAY)
    assert starts == {A: 18, B: OFFSET_BEGINNING} and fresh == {B}


def test_a_partition_owned_but_never_read_is_fresh_and_a_replay_stage_reads_it_from_the_start():
    """CI: a track replica owned a task's partition through a broker stall without reading it, then got it
    back after its session timed out; it started at the other replica's commit (frame 18) with no tracker
    state and waited forever for frames 0-17."""
    starts, fresh = start_offsets({A}, owned={A}, positions={}, recovery=Recovery.REPLAY)
    assert starts == {A: OFFSET_BEGINNING} and fresh == {A}


def test_other_recoveries_start_fresh_partitions_at_the_groups_commit():
    for recovery in (Recovery.REDO, Recovery.RESUME):
        starts, fresh = start_offsets({A, B, C}, owned={A, B}, positions={A: 7}, recovery=recovery)
        assert starts == {A: 7} and fresh == {B, C}


def test_a_position_of_a_partition_not_owned_before_does_not_count():
    """A position left from an earlier ownership is not ours to continue from: the partition is fresh."""
    starts, fresh = start_offsets({A}, owned=set(), positions={A: 5}, recovery=Recovery.REPLAY)
    assert starts == {A: OFFSET_BEGINNING} and fresh == {A}
