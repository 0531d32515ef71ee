"""Several gateways, one mesh: which gateway is alive, and which one does what must happen once.

Every gateway holds the lease `gateway:<id>` in the task store while it runs (renewed every RENEW_S; it
lapses LEASE_TTL_S after the gateway dies). Its id is kept in its data directory, so a gateway restarted on
the same directory is the same gateway and takes back the tasks it owns.

One gateway at a time also holds `mesh-duties` and, while it does, does what must happen once per mesh:
it applies posemesh.events to the store (progress, results, failures), sweeps (topics deleted after the
hand-off, orphans among them; stalled tasks failed; overdue live endings), delivers webhooks, and takes
over the tasks of a gateway whose lease lapsed (posemesh.gateway.lifecycle: `take_over`). When it stops it
gives the lease up, and another gateway takes the duties at its next renewal; when it dies, once the lease
lapses.

Every gateway does the rest for itself: it takes uploads and cameras, publishes the frames of the tasks
it owns, reserves task ids, and answers every call about every task (the store is shared, and its
notifications wake the watchers on every gateway).

One gateway on SQLite holds both leases from its start: nothing changes on one machine. Leases are
written with the gateways' clocks: on several hosts, keep them in step (NTP) to well under LEASE_TTL_S.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

from posemesh.gateway.at_rest import private_file

log = logging.getLogger("posemesh.gateway")

GATEWAY_LEASE = "gateway:"  # + the gateway's id
DUTIES_LEASE = "mesh-duties"
LEASE_TTL_S = 10.0
RENEW_S = 2.0
# The duties are dropped once the lease was last renewed this long ago (the store cannot be reached), before
# it can lapse and another gateway take them: never two gateways at once.
HOLD_FOR_S = LEASE_TTL_S - 2 * RENEW_S


def gateway_id(data_dir: Path) -> str:
    """This gateway's id: made once, kept in its data directory."""
    path = data_dir / "gateway-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        made = uuid.uuid4().hex[:16]
        path.write_text(made + "\n")
        private_file(path)
        return made


class Duties(threading.Thread):
    """Renews this gateway's leases; runs `on_gain()` when it takes the mesh duties and `on_loss()` when it
    must stop doing them, and `each_round()` while it holds them. `on_cut_off()` when its own lease could not
    be renewed for HOLD_FOR_S (another gateway may take its tasks over before long: their frames must stop
    here first, or a camera would have two readers publishing under the same indices), `on_back()` once it
    is renewed again (the tasks still its own go on).

    Three threads, so that nothing slow delays a renewal or its checks: this one renews (two small writes),
    `watch` sees a renewal go stale even when the store does not answer at all (a call that hangs), and
    `rounds` does the duties (a take-over reads the broker for seconds)."""

    def __init__(self, store, gateway: str, on_gain, on_loss, each_round=None, on_cut_off=None, on_back=None):
        super().__init__(name="duties", daemon=True)
        self.store, self.gateway = store, gateway
        self.on_gain, self.on_loss, self.each_round = on_gain, on_loss, each_round
        self.on_cut_off, self.on_back = on_cut_off, on_back
        self.holding = False
        self.cut_off = False
        self.renewed = 0.0  # monotonic time the duties lease was last renewed
        self.own_renewed = time.monotonic()  # ... and this gateway's own lease
        self.lock = threading.Lock()  # the transitions of `holding` and `cut_off`
        self.halt = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="duties-watch", daemon=True)
        self.rounder = threading.Thread(target=self._rounds, name="duty-rounds", daemon=True)

    def start(self) -> None:
        super().start()
        self.watcher.start()
        self.rounder.start()

    def renew(self) -> None:
        """One renewal: both leases, the duties taken or given up as the store says."""
        try:
            self.store.hold_lease(GATEWAY_LEASE + self.gateway, self.gateway, LEASE_TTL_S)
            self.own_renewed = time.monotonic()
            held = self.store.hold_lease(DUTIES_LEASE, self.gateway, LEASE_TTL_S)
            if held:
                self.renewed = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - the store is away: the duties stop before the lease lapses
            log.warning("could not renew the gateway's leases (%s)", exc.__class__.__name__)
            held = None  # not known: `check` decides by the age of the last renewal
        if held is True:
            self._gain()
        elif held is False:
            self._lose()
        self.check()

    def check(self) -> None:
        """Leases renewed too long ago (the store is away or does not answer): the duties stop, and this
        gateway's frames; both before the leases can lapse and another gateway take over."""
        now = time.monotonic()
        if self.holding and now - self.renewed >= HOLD_FOR_S:
            self._lose()
        late = now - self.own_renewed >= HOLD_FOR_S
        with self.lock:
            change, self.cut_off = late != self.cut_off, late
        if change and late:
            log.warning("gateway %s could not renew its lease for %.0f s: its tasks' frames stop here (another "
                        "gateway may take them over)", self.gateway, now - self.own_renewed)
            if self.on_cut_off is not None:
                self.on_cut_off()
        elif change:
            log.info("gateway %s renews its lease again: its own tasks go on", self.gateway)
            if self.on_back is not None:
                self.on_back()

    def _gain(self) -> None:
        with self.lock:
            gained, self.holding = not self.holding, True
        if gained:
            log.info("gateway %s takes the mesh duties (events, sweep, webhooks, take-overs)", self.gateway)
            self.on_gain()

    def _lose(self) -> None:
        with self.lock:
            lost, self.holding = self.holding, False
        if lost:
            log.warning("gateway %s gives the mesh duties up", self.gateway)
            self.on_loss()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.renew()
            except Exception:  # the next round tries again
                log.exception("lease renewal failed")
            self.halt.wait(RENEW_S)

    def _watch(self) -> None:
        while not self.halt.wait(RENEW_S / 4):
            try:
                self.check()
            except Exception:
                log.exception("lease check failed")

    def _rounds(self) -> None:
        while not self.halt.wait(RENEW_S):
            if self.holding and not self.cut_off and self.each_round is not None:
                try:
                    self.each_round()
                except Exception:  # the next round tries again
                    log.exception("duties round failed")

    def stop(self) -> None:
        """Give both leases up (the gateway stops): another gateway takes the duties at once."""
        self.halt.set()
        for thread in (self, self.watcher, self.rounder):
            if thread.is_alive():
                thread.join(10)
        self._lose()
        for name in (DUTIES_LEASE, GATEWAY_LEASE + self.gateway):
            try:
                self.store.release_lease(name, self.gateway)
            except Exception:  # noqa: BLE001 - it lapses by itself
                log.warning("could not give the lease %s up; it lapses in %.0f s", name, LEASE_TTL_S)
