"""Where a new run's IngestJob goes (gateway/placement.py): pure logic, with a clock of the test's."""

import random

from posemesh.gateway.placement import LIVENESS_S, RECENT_S, IngestPlacement


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def placement(partitions=8):
    clock = Clock()  # both clocks: the replicas' send times and this gateway's
    return IngestPlacement(partitions, clock=clock, wall=clock, rng=random.Random(7)), clock


def test_no_replica_heard_means_keyed_by_task():
    p, clock = placement()
    assert p.choose("t1") is None
    p.heard("a", clock.now, [], [])  # a replica holding no partition takes no job
    assert p.choose("t1") is None


def test_a_new_job_goes_to_the_replica_with_the_fewest_tasks():
    p, clock = placement()
    p.heard("a", clock.now, ["x1", "x2", "x3"], [0, 1, 2, 3])
    p.heard("b", clock.now, ["y1"], [4, 5, 6, 7])
    assert p.choose("t1") in (4, 5, 6, 7)


def test_jobs_placed_between_heartbeats_count_so_a_burst_is_spread():
    """Eight uploads at once, two idle replicas, no heartbeat in between: four each, not eight on one."""
    p, clock = placement()
    p.heard("a", clock.now, [], [0, 1, 2, 3])
    p.heard("b", clock.now, [], [4, 5, 6, 7])
    chosen = [p.choose(f"t{i}") for i in range(8)]
    assert sum(c < 4 for c in chosen) == 4
    assert sorted(chosen) == list(range(8))  # and over each replica's partitions (a rebalance moves partitions)


def test_a_heartbeat_that_lists_a_placed_task_counts_it_once():
    p, clock = placement()
    p.heard("a", clock.now, [], [0])
    p.heard("b", clock.now, [], [1])
    first = p.choose("t1")
    owner, other = ("a", "b") if first == 0 else ("b", "a")
    clock.now += 0.5
    p.heard(owner, clock.now, ["t1"], [first])  # the replica took it: listed, no longer a placement of ours
    p.heard(other, clock.now, [], [1 - first])
    assert p.choose("t2") == 1 - first  # 1 task against 0, not 2 against 0
    clock.now += 0.5
    p.heard(other, clock.now, ["t2"], [1 - first])
    assert p.choose("t3") in (0, 1)  # one each: either


def test_placements_not_listed_stop_counting_after_a_while():
    p, clock = placement()
    p.heard("a", clock.now, [], [0])
    p.heard("b", clock.now, [], [1])
    p.choose("t1")
    p.choose("t2")
    clock.now += RECENT_S
    p.heard("a", clock.now, ["x"], [0])  # neither placement listed (their tasks ended already, say)
    p.heard("b", clock.now, [], [1])
    assert p.choose("t3") == 1


def test_a_replica_not_heard_from_gets_nothing():
    p, clock = placement()
    p.heard("a", clock.now, ["x1", "x2"], [0, 1])
    clock.now += LIVENESS_S + 1
    p.heard("b", clock.now, ["y1", "y2", "y3"], [2, 3])  # busier, but alive
    assert p.choose("t1") in (2, 3)
    p.forget()  # the broker lost its data: nobody is known until they say again
    assert p.choose("t2") is None


def test_old_heartbeats_replayed_at_start_up_are_no_news():
    """The events reader replays posemesh.events from its saved offset: a replica dead for a minute must not look
    alive (and idle) for the next LIVENESS_S seconds."""
    p, clock = placement()
    p.heard("dead", clock.now - 60, [], [0, 1, 2, 3])
    p.heard("alive", clock.now, ["x1", "x2", "x3"], [4, 5, 6, 7])
    assert {p.choose(f"t{i}") for i in range(4)} <= {4, 5, 6, 7}


def test_a_replica_that_lost_its_partitions_in_a_rebalance_gets_nothing_until_it_has_some():
    p, clock = placement()
    p.heard("a", clock.now, [], [0, 1, 2, 3])
    p.heard("b", clock.now, ["x1", "x2"], [4, 5, 6, 7])
    p.heard("a", clock.now + 0.5, [], [])  # revoked: eager rebalancing takes every partition first
    assert p.choose("t1") in (4, 5, 6, 7)


def test_a_late_heartbeat_changes_nothing_and_partitions_out_of_range_are_ignored():
    p, clock = placement(partitions=4)
    p.heard("a", clock.now, [], [0, 1, 9])
    p.heard("a", clock.now - 1, ["x1", "x2"], [2])  # older: dropped
    assert all(p.choose(f"t{i}") in (0, 1) for i in range(4))
