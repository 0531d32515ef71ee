"""Per-user admission: no user can take more than a fair share of the gateway.

- Active tasks: queued + running tasks plus uploads still being received count against
  MAX_ACTIVE_TASKS_PER_USER, checked and reserved atomically when an upload (or live task) starts, so
  twenty parallel uploads cannot all slip under a limit of eight. `task_slot` is the one way in. The slot
  is a row in the task store (`TaskStore.admit`, one write transaction with the count), so the limit holds
  across every gateway sharing a store; a held slot is renewed every SLOT_RENEW_S and lapses SLOT_TTL_S
  after its gateway stops renewing it (a gateway that died mid-upload frees its users' slots by itself).
- Open streams: WatchTask, WatchFrames, DownloadResult and Upload streams a user holds open at once
  (MAX_STREAMS_PER_USER), held by the stream-limit interceptor (gateway/interceptors.py) around every
  streaming call.
Refusals are RESOURCE_EXHAUSTED with a message saying which limit and what to do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import Counter
from contextlib import asynccontextmanager, contextmanager

from posemesh.gateway.blocking import store_call

log = logging.getLogger("posemesh.gateway")

SLOT_TTL_S = 120.0  # a slot no gateway renews lapses after this
SLOT_RENEW_S = 30.0


class LimitExceeded(Exception):
    """A per-user limit would be exceeded; str() is the message for the caller."""


class UserLimits:
    def __init__(self, max_active_tasks: int, max_streams: int, store):
        self.max_active_tasks, self.max_streams = max_active_tasks, max_streams
        self.store = store  # gateway/store.py TaskStore: where admission slots are held
        self.lock = threading.Lock()  # the counts and slots here; never held across anything that waits
        self.receiving: Counter[str] = Counter()  # this gateway's slots per user (for tests and stats)
        self.slots: set[str] = set()  # this gateway's slots in the store, renewed until given back
        self.streams: Counter[str] = Counter()
        self.stopped = threading.Event()
        self.renewer = threading.Thread(target=self._renew, name="admission-slots", daemon=True)
        self.renewer.start()

    @asynccontextmanager
    async def task_slot(self, user: str):
        """Held while an upload is received (or a camera probed) and its task created; the task then counts
        as active itself."""
        slot = uuid.uuid4().hex
        active = await store_call(self.store.admit, user, slot, self.max_active_tasks, SLOT_TTL_S)
        if active is not None:
            raise LimitExceeded(f"you have {active} tasks queued, running or uploading; at most "
                                f"{self.max_active_tasks} are allowed: wait for one to finish or cancel one")
        with self.lock:
            self.receiving[user] += 1
            self.slots.add(slot)
        try:
            yield
        finally:
            with self.lock:
                self.slots.discard(slot)
                self.receiving[user] -= 1
                if not self.receiving[user]:
                    del self.receiving[user]
            # Given back even when the call was cancelled (the client went away); at worst it lapses.
            await asyncio.shield(store_call(self.store.release_admission, slot))

    def _renew(self) -> None:
        while not self.stopped.wait(SLOT_RENEW_S):
            with self.lock:
                held = sorted(self.slots)
            try:
                self.store.renew_admissions(held, SLOT_TTL_S)
            except Exception:  # noqa: BLE001 - the store is closing, or a passing error: next round tries again
                if self.stopped.is_set():
                    return
                log.warning("could not renew %d admission slots", len(held), exc_info=True)

    def close(self) -> None:
        self.stopped.set()

    @contextmanager
    def stream_slot(self, user: str, what: str):
        with self.lock:
            if self.streams[user] >= self.max_streams:
                raise LimitExceeded(f"you have {self.streams[user]} streams open (uploads, watches, downloads); at "
                                    f"most {self.max_streams} are allowed: close one before opening {what}")
            self.streams[user] += 1
        try:
            yield
        finally:
            with self.lock:
                self.streams[user] -= 1
                if not self.streams[user]:
                    del self.streams[user]
