"""Reserved task ids (gateway/reservations.py): the bookkeeping, with a stand-in for the topic manager
(the real topics and their readers are exercised in test_gateway and test_resilience)."""

from __future__ import annotations

import time

from posemesh.gateway.reservations import Reservations
from posemesh.v1 import task_service_pb2 as tpb


class Topics:
    """Records what Reservations asks of the topic manager."""

    def __init__(self):
        self.created, self.reserved, self.ended = [], [], []
        self.orphans = {}
        self.fail_after = None  # publish_reserved fails once this many have been published

    def create(self, task_id):
        self.created.append(task_id)

    def publish_reserved(self, task_id):
        if self.fail_after is not None and len(self.reserved) >= self.fail_after:
            raise RuntimeError("could not publish to posemesh.control")
        self.reserved.append(task_id)

    def publish_ended(self, task_id, state):
        self.ended.append((task_id, state))


def test_ids_are_made_announced_taken_and_given_back():
    topics = Topics()
    r = Reservations(topics, count=3, quiet_s=0.2)
    r.maintain()
    assert len(r.ready) == 3 and topics.created == topics.reserved == r.ready
    first = r.take()
    assert first == topics.created[0] and first in r and first not in r.ready
    r.give_back(first)  # the upload was refused: the id is reserved again, first in line
    assert r.ready[0] == first and not r.lent
    taken = r.take()
    r.used(taken)  # a task exists now: no longer a reservation
    assert taken not in r
    r.give_back(taken)  # a late give-back of a used id changes nothing
    assert taken not in r.ready


def test_refills_wait_until_no_task_has_started_for_the_quiet_time():
    topics = Topics()
    r = Reservations(topics, count=2, quiet_s=0.3)
    r.maintain()
    r.used(r.take())
    r.maintain()
    assert len(r.ready) == 1, "refilled in the middle of a burst of new tasks"
    time.sleep(0.35)
    r.maintain()
    assert len(r.ready) == 2 and len(topics.created) == 3
    # An upload still streaming holds its id: it counts, so no extra id is made for it.
    held = r.take()
    time.sleep(0.35)
    r.maintain()
    assert len(r.ready) == 1 and held in r.lent and len(topics.created) == 3


class Store:
    """What Reservations asks of the task store: where reservations are recorded, and whether tasks run."""

    def __init__(self):
        self.reserved, self.running = set(), 0

    def add_reserved(self, task_id, gateway):
        self.reserved.add(task_id)

    def drop_reserved(self, task_ids):
        self.reserved -= set(task_ids)

    def any_active(self):
        return self.running > 0


def test_while_tasks_run_a_refill_waits_for_them_unless_none_is_left():
    topics, store = Topics(), Store()
    r = Reservations(topics, count=2, quiet_s=0.1, store=store, gateway="gw")
    r.maintain()
    assert len(r.ready) == 2 and store.reserved == set(r.ready)
    r.used(r.take())
    store.running = 1
    time.sleep(0.15)
    r.maintain()
    assert len(r.ready) == 1, "refilled while a task ran, with an id still in reserve"
    store.running = 0  # the task ended
    r.maintain()
    assert len(r.ready) == 2 and len(topics.created) == 3
    r.used(r.take())
    r.used(r.take())
    store.running = 2
    time.sleep(0.15)
    r.maintain()  # none left: the next task would pay the joins at its start, so they are paid now
    assert len(r.ready) == 2 and len(topics.created) == 5


def test_none_left_means_a_fresh_id_and_broker_loss_or_shutdown_give_them_up():
    topics = Topics()
    r = Reservations(topics, count=1, quiet_s=10)
    r.maintain()
    assert r.take() is not None and r.take() is None  # none left: the task makes its own topics
    r.forget()  # the broker lost its data (and the topics)
    assert not r.ready and not r.lent
    r = Reservations(topics, count=2, quiet_s=0)
    r.maintain()
    ids = list(r.ready)
    r.release()
    assert [t for t, _s in topics.ended] == ids and all(s == tpb.TASK_STATE_CANCELLED for _t, s in topics.ended)
    assert not r.ready


def test_an_id_that_could_not_be_announced_is_left_to_the_orphan_sweep():
    topics = Topics()
    topics.fail_after = 1
    r = Reservations(topics, count=3, quiet_s=0)
    try:
        r.maintain()
    except RuntimeError:
        pass
    assert r.ready == topics.reserved and len(r.ready) == 1  # the announced one is kept
    assert list(topics.orphans) == [topics.created[1]]  # made but unannounced: deleted by the sweep
