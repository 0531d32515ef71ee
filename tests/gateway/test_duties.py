"""gateway/duties.py's timing, on a stand-in store whose lease writes can be made to hang (pure logic: when
the duties and the frames stop and start again). tests/test_gateways.py cuts a real gateway off from a real
PostgreSQL server."""

from __future__ import annotations

import threading
import time

import pytest

from posemesh.gateway import duties
from tests.helpers import wait_for


class HangingStore:
    """Lease writes that succeed, or hang while `cut` is set (a store the network cut off answers nothing)."""

    def __init__(self):
        self.cut = threading.Event()
        self.released: list[str] = []

    def hold_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        while self.cut.is_set():
            time.sleep(0.01)
        return True

    def release_lease(self, name: str, owner: str) -> None:
        self.released.append(name)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(duties, "RENEW_S", 0.1)
    monkeypatch.setattr(duties, "HOLD_FOR_S", 0.6)


def test_a_gateway_cut_off_from_its_store_stops_its_duties_and_frames_in_time_and_goes_on_after(quick):
    store, said = HangingStore(), []
    rounds = []
    d = duties.Duties(store, "g1", lambda: said.append("gain"), lambda: said.append("loss"),
                      each_round=lambda: rounds.append(time.monotonic()),
                      on_cut_off=lambda: said.append("cut off"), on_back=lambda: said.append("back"))
    d.renew()
    d.start()
    try:
        assert said == ["gain"]
        wait_for(lambda: len(rounds) >= 2, 5, 0.05, "duty rounds")
        store.cut.set()  # the renewal thread now hangs in its call: the watch must see it
        cut_at = time.monotonic()
        wait_for(lambda: "cut off" in said, 5, 0.02, "the cut-off")
        waited = time.monotonic() - cut_at
        assert said == ["gain", "loss", "cut off"]  # duties first, then the frames; both before the lease lapses
        assert duties.HOLD_FOR_S - 0.25 <= waited < duties.LEASE_TTL_S / 2
        rounds_then = len(rounds)
        time.sleep(0.5)
        assert len(rounds) == rounds_then, "no duty round while cut off"
        store.cut.clear()
        wait_for(lambda: "back" in said and said.count("gain") == 2, 5, 0.02, "renewal to resume")
        assert said[:3] == ["gain", "loss", "cut off"] and sorted(said[3:]) == ["back", "gain"]
    finally:
        d.stop()
    assert said[-1] == "loss" and set(store.released) == {duties.DUTIES_LEASE, duties.GATEWAY_LEASE + "g1"}
