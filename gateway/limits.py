"""Per-user admission: no user can take more than a fair share of the gateway.

- Active tasks: queued + running tasks plus uploads still being received count against
  MAX_ACTIVE_TASKS_PER_USER, checked and reserved atomically when an upload (or live task) starts, so
  twenty parallel uploads cannot all slip under a limit of eight. `task_slot` is the one way in; it counts
  the user's tasks in the store off the event loop.
- Open streams: WatchTask, WatchFrames, DownloadResult and Upload streams a user holds open at once
  (MAX_STREAMS_PER_USER), held by the stream-limit interceptor (gateway/interceptors.py) around every
  streaming call.
Refusals are RESOURCE_EXHAUSTED with a message saying which limit and what to do.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from contextlib import asynccontextmanager, contextmanager

from posemesh.gateway.blocking import store_call


class LimitExceeded(Exception):
    """A per-user limit would be exceeded; str() is the message for the caller."""


class UserLimits:
    def __init__(self, max_active_tasks: int, max_streams: int, count_active):
        self.max_active_tasks, self.max_streams = max_active_tasks, max_streams
        self.count_active = count_active  # user -> queued + running tasks in the store (blocking)
        self.lock = threading.Lock()  # the stream counts; never held across anything that waits
        self.admission = asyncio.Lock()  # one task admission at a time, across its count in the store
        self.receiving: Counter[str] = Counter()  # changed on the event loop only
        self.streams: Counter[str] = Counter()

    @asynccontextmanager
    async def task_slot(self, user: str):
        """Held while an upload is received (or a camera probed) and its task created; the task then counts
        as active itself. Admissions take turns, so none is counted without the others: the slots held are
        read before the store is counted, and every task made since was made under one of those slots."""
        async with self.admission:
            held = self.receiving[user]
            active = await store_call(self.count_active, user) + held
            if active >= self.max_active_tasks:
                raise LimitExceeded(f"you have {active} tasks queued, running or uploading; at most "
                                    f"{self.max_active_tasks} are allowed: wait for one to finish or cancel one")
            self.receiving[user] += 1
        try:
            yield
        finally:
            self.receiving[user] -= 1
            if not self.receiving[user]:
                del self.receiving[user]

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
