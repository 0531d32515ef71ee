"""gateway/duties.py's timing, on a stand-in store whose lease writes can be made slow or failing (pure logic:
when the duties are taken, given up and done). tests/test_gateways.py runs real gateways on PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest

from posemesh.gateway import duties
from tests.helpers import wait_for


class LeaseStore:
    """Lease writes that succeed, take `delay_s`, or fail while `down` is set (the store cannot be reached)."""

    def __init__(self):
        self.down = threading.Event()
        self.delay_s = 0.0
        self.writes: list[float] = []
        self.released: list[str] = []

    def hold_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        time.sleep(self.delay_s)
        if self.down.is_set():
            raise ConnectionError("the store cannot be reached")
        self.writes.append(time.monotonic())
        return True

    def release_lease(self, name: str, owner: str) -> None:
        self.released.append(name)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(duties, "RENEW_S", 0.1)
    monkeypatch.setattr(duties, "HOLD_FOR_S", 0.6)


def test_a_slow_duty_round_does_not_hold_the_renewals_up(quick):
    """A round that takes seconds (a take-over reading the broker back) runs beside the renewals."""
    store, said = LeaseStore(), []
    in_round = threading.Event()

    def slow_round():
        in_round.set()
        time.sleep(1.5)
    d = duties.Duties(store, "g1", lambda: said.append("gain"), lambda: said.append("loss"), each_round=slow_round)
    d.renew()
    d.start()
    try:
        wait_for(in_round.is_set, 5, 0.02, "a duty round")
        t0 = time.monotonic()
        time.sleep(1.0)
        during = [w for w in store.writes if w > t0]
        assert len(during) >= 8, f"{len(during)} lease writes in the second a round ran"
        assert said == ["gain"]
    finally:
        d.stop()
    assert said == ["gain", "loss"] and set(store.released) == {duties.DUTIES_LEASE, duties.GATEWAY_LEASE + "g1"}


def test_the_duties_stop_before_the_lease_can_lapse_and_come_back_with_the_store(quick):
    store, said, rounds = LeaseStore(), [], []
    d = duties.Duties(store, "g1", lambda: said.append("gain"), lambda: said.append("loss"),
                      each_round=lambda: rounds.append(time.monotonic()))
    d.renew()
    d.start()
    try:
        store.down.set()
        down_at = time.monotonic()
        wait_for(lambda: "loss" in said, 5, 0.02, "the duties to be given up")
        assert duties.HOLD_FOR_S - 0.2 <= time.monotonic() - down_at < duties.LEASE_TTL_S / 2
        quiet = len(rounds)
        time.sleep(0.5)
        assert len(rounds) == quiet, "no duty round without the lease"
        store.down.clear()
        wait_for(lambda: said == ["gain", "loss", "gain"], 5, 0.02, "the duties to be taken again")
    finally:
        d.stop()


def test_a_lease_is_aged_from_when_its_renewal_began(quick):
    """The store stamps a lease when the write starts: a renewal that returns late must not count as fresher."""
    store = LeaseStore()
    d = duties.Duties(store, "g1", lambda: None, lambda: None)
    store.delay_s = 0.3
    began = time.monotonic()
    d.renew()
    assert began <= d.renewed < began + 0.05
