"""Per-user admission: no user can take more than a fair share of the gateway.

- Active tasks: queued + running tasks plus uploads still being received count against
  MAX_ACTIVE_TASKS_PER_USER, checked and reserved atomically when an upload starts, so twenty parallel
  uploads cannot all slip under a limit of eight.
- Open streams: WatchTask, DownloadResult and Upload streams a user holds open at once
  (MAX_STREAMS_PER_USER).
Refusals are RESOURCE_EXHAUSTED with a message saying which limit and what to do.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager


class LimitExceeded(Exception):
    """A per-user limit would be exceeded; str() is the message for the caller."""


class UserLimits:
    def __init__(self, max_active_tasks: int, max_streams: int, count_active):
        self.max_active_tasks, self.max_streams = max_active_tasks, max_streams
        self.count_active = count_active  # user -> queued + running tasks in the store
        self.lock = threading.Lock()
        self.receiving: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()

    @contextmanager
    def upload_slot(self, user: str):
        """Held while an upload is received and its task created; the task then counts as active itself."""
        with self.lock:
            active = self.count_active(user) + self.receiving[user]
            if active >= self.max_active_tasks:
                raise LimitExceeded(f"you have {active} tasks queued, running or uploading; at most "
                                    f"{self.max_active_tasks} are allowed: wait for one to finish or cancel one")
            self.receiving[user] += 1
        try:
            yield
        finally:
            with self.lock:
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
