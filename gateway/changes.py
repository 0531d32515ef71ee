"""Task changes as an asyncio feed: how WatchTask streams wait without holding a thread each.

The task store calls `changed(task_id)` from whatever thread made the change; the feed hands that to the
event loop, which wakes only the streams watching that task. Two hundred idle watchers cost two hundred
small events, not two hundred threads.

A stream subscribes before it first reads its task and stays subscribed until it ends, so a change that lands
while it reads or sends is still seen at its next wait. (A waiter that subscribed only for each wait missed a
change made between its read and its wait, and slept the whole poll interval: a task's completion reached its
watcher 1.6-2.0 s late in each of three timed uploads, the last progress report waking it just before.)
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Subscription:
    """One stream's interest in one task: set by every change of it since the last wait."""

    def __init__(self):
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the task changed since the last wait (at once if it already has) or `timeout` passes."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass
        self.event.clear()  # before the caller reads the task: a change after this read wakes the next wait


class ChangeFeed:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.subscriptions: dict[str, set[Subscription]] = defaultdict(set)

    def changed(self, task_id: str | None) -> None:
        """Thread-safe: a task changed (None: possibly any task)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, task_id)

    def _wake(self, task_id: str | None) -> None:
        targets = [task_id] if task_id is not None else list(self.subscriptions)
        for tid in targets:
            for subscription in self.subscriptions.get(tid, ()):
                subscription.event.set()

    @contextmanager
    def subscribe(self, task_id: str) -> Iterator[Subscription]:
        """Changes of `task_id` from now until the block ends (on the event loop's thread)."""
        subscription = Subscription()
        self.subscriptions[task_id].add(subscription)
        try:
            yield subscription
        finally:
            self.subscriptions[task_id].discard(subscription)
            if not self.subscriptions[task_id]:
                del self.subscriptions[task_id]
