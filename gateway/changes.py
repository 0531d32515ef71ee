"""Task changes as an asyncio feed: how WatchTask streams wait without holding a thread each.

The task store calls `changed(task_id)` from whatever thread made the change; the feed hands that to the
event loop, which wakes only the streams watching that task. Two hundred idle watchers cost two hundred
small futures, not two hundred threads.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class ChangeFeed:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def changed(self, task_id: str | None) -> None:
        """Thread-safe: a task changed (None: possibly any task)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, task_id)

    def _wake(self, task_id: str | None) -> None:
        targets = [task_id] if task_id is not None else list(self.waiters)
        for tid in targets:
            for event in self.waiters.get(tid, ()):
                event.set()

    async def wait(self, task_id: str, timeout: float) -> None:
        """Until the task changes or `timeout` passes (a change just before the call may be missed: callers
        re-read the task after each wait, and the timeout bounds the delay)."""
        event = asyncio.Event()
        self.waiters[task_id].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiters[task_id].discard(event)
            if not self.waiters[task_id]:
                del self.waiters[task_id]
