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

from posemesh.mesh.at_rest import private_file

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
    must stop doing them (both on this thread only, so in order), and `each_round()` while it holds them.

    The duty rounds run on a thread of their own (`rounds`): a round can take seconds (a take-over reads the
    broker back), and a renewal waiting behind it could let the lease lapse under a live holder."""

    def __init__(self, store, gateway: str, on_gain, on_loss, each_round=None):
        super().__init__(name="duties", daemon=True)
        self.store, self.gateway = store, gateway
        self.on_gain, self.on_loss, self.each_round = on_gain, on_loss, each_round
        self.holding = False
        self.renewed = 0.0  # monotonic time the last successful renewal of the duties lease began
        self.halt = threading.Event()
        self.rounder = threading.Thread(target=self._rounds, name="duty-rounds", daemon=True)

    def start(self) -> None:
        super().start()
        self.rounder.start()

    def renew(self) -> None:
        """One renewal: both leases, the duties taken or given up as the store says."""
        # A lease runs from when the store stamped it, which is before the call returns: age it from here.
        began = time.monotonic()
        try:
            self.store.hold_lease(GATEWAY_LEASE + self.gateway, self.gateway, LEASE_TTL_S)
            held = self.store.hold_lease(DUTIES_LEASE, self.gateway, LEASE_TTL_S)
            if held:
                self.renewed = began
        except Exception as exc:  # noqa: BLE001 - the store is away: the duties stop before the lease lapses
            log.warning("could not renew the gateway's leases (%s)", exc.__class__.__name__)
            held = self.holding and time.monotonic() - self.renewed < HOLD_FOR_S
        if held and not self.holding:
            log.info("gateway %s takes the mesh duties (events, sweep, webhooks, take-overs)", self.gateway)
            self.holding = True
            self.on_gain()
        elif self.holding and not held:
            log.warning("gateway %s gives the mesh duties up", self.gateway)
            self.holding = False
            self.on_loss()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.renew()
            except Exception:  # the next round tries again
                log.exception("lease renewal failed")
            self.halt.wait(RENEW_S)

    def _rounds(self) -> None:
        while not self.halt.wait(RENEW_S):
            # Only while the last renewal is fresh: a holder whose store stopped answering does no duty.
            if self.holding and time.monotonic() - self.renewed < HOLD_FOR_S and self.each_round is not None:
                try:
                    self.each_round()
                except Exception:  # the next round tries again
                    log.exception("duties round failed")

    def stop(self) -> None:
        """Give both leases up (the gateway stops): another gateway takes the duties at once."""
        self.halt.set()
        for thread in (self.rounder, self):
            if thread.is_alive():
                thread.join(10)
        if self.holding:
            self.holding = False
            self.on_loss()
        for name in (DUTIES_LEASE, GATEWAY_LEASE + self.gateway):
            try:
                self.store.release_lease(name, self.gateway)
            except Exception:  # noqa: BLE001 - it lapses by itself
                log.warning("could not give the lease %s up; it lapses in %.0f s", name, LEASE_TTL_S)
