"""Where consumed frames wait until a batch takes them, and where redelivered frames are dropped.

Kafka interleaves partitions (and so tasks and frame indices) as it likes; the pools decide what is
processed next:

- `LowestFirstPool` (unordered stages: detect, pose): a batch takes the lowest indices of each task,
  taking from the tasks in turn, so the frame a user waits for next comes first and no task starves.
  A frame waits up to HOLD_S for a lower index still missing (another partition is behind). A task's
  first frame goes alone: its first result then comes one model call after it arrives.
- `SequencePool` (ordered stages: track, annotate): frames of a task leave strictly in index order, from
  the task's next expected index.

Both remember each frame's partition and offset (commits) and drop indices they have already had. Which
one a stage gets is its flow's choice (posemesh.stages.flows).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from posemesh.stages.base import FrameItem

TP = tuple[str, int]
HOLD_S = 0.25


@dataclass
class Pooled:
    item: FrameItem
    tp: TP
    offset: int

    @property
    def index(self) -> int:
        return self.item.frame.index


class IndexSet:
    """A growable bitmap of frame indices (a long task's worth costs a few kilobytes)."""

    def __init__(self) -> None:
        self.bits = bytearray()

    def add(self, index: int) -> bool:
        """Adds `index`; False when it was there already."""
        byte, bit = divmod(index, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte - len(self.bits) + 1 + len(self.bits) // 2))
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        return True

    def discard(self, index: int) -> None:
        byte, bit = divmod(index, 8)
        if byte < len(self.bits):
            self.bits[byte] &= ~(1 << bit) & 0xFF

    def __contains__(self, index: int) -> bool:
        byte, bit = divmod(index, 8)
        return byte < len(self.bits) and bool(self.bits[byte] >> bit & 1)

    def first_missing(self, start: int = 0) -> int:
        i = start
        while i in self:
            i += 1
        return i


class Pool(Protocol):
    def add(self, entry: Pooled) -> bool: ...

    def take(self, batch: int) -> list[Pooled]: ...

    def drop_task(self, task_id: str) -> None: ...


@dataclass
class _Unordered:
    seen: IndexSet = field(default_factory=IndexSet)
    low: int = 0  # the lowest index not seen yet
    waiting: dict[int, Pooled] = field(default_factory=dict)
    since: float = 0.0  # when the oldest waiting frame arrived
    taken: int = 0


class _TaskPools:
    """Frames waiting per task (`tasks[task_id].waiting`, index -> Pooled): what both pools share."""

    def __init__(self) -> None:
        self.tasks: dict = {}

    def drop_task(self, task_id: str) -> None:
        self.tasks.pop(task_id, None)

    def pooled(self) -> int:
        return sum(len(t.waiting) for t in self.tasks.values())


class LowestFirstPool(_TaskPools):
    tasks: dict[str, _Unordered]

    def add(self, entry: Pooled) -> bool:
        """Pools a frame; False when its index was seen already (a redelivery)."""
        task = self.tasks.setdefault(entry.item.task_id, _Unordered())
        if not task.seen.add(entry.index):
            return False
        if entry.index == task.low:
            task.low = task.seen.first_missing(task.low)
        if not task.waiting:
            task.since = time.monotonic()
        task.waiting[entry.index] = entry
        return True

    def _runnable(self, task: _Unordered, now: float) -> bool:
        return bool(task.waiting) and (min(task.waiting) < task.low or now - task.since >= HOLD_S)

    def ready(self) -> bool:
        now = time.monotonic()
        return any(self._runnable(t, now) for t in self.tasks.values())

    def take(self, batch: int) -> list[Pooled]:
        now = time.monotonic()
        runnable = [(tid, t) for tid, t in self.tasks.items() if self._runnable(t, now)]
        starting = [t for _tid, t in runnable if t.taken == 0 and 0 in t.waiting]
        if starting:  # first frames alone: a new task's first result does not wait for a batch of crops
            taken = [t.waiting.pop(0) for t in starting]
            for t in starting:
                t.taken += 1
            return taken
        taken: list[Pooled] = []
        while runnable and len(taken) < batch:
            for entry in list(runnable):
                _tid, task = entry
                taken.append(task.waiting.pop(min(task.waiting)))
                task.taken += 1
                if not task.waiting:
                    runnable.remove(entry)
                if len(taken) == batch:
                    break
        return taken

    def discard_partitions(self, tps: set[TP]) -> None:
        """The partitions moved to another replica: their waiting frames are its to do now. They are
        forgotten as if never seen, so they are not dropped as duplicates should they come back."""
        for task in self.tasks.values():
            for index in [i for i, e in task.waiting.items() if e.tp in tps]:
                del task.waiting[index]
                task.seen.discard(index)
                task.low = min(task.low, index)

    def waiting_by_partition(self) -> Counter:
        counts: Counter = Counter()
        for task in self.tasks.values():
            for entry in task.waiting.values():
                counts[entry.tp] += 1
        return counts


@dataclass
class _Sequence:
    next_index: int = 0
    waiting: dict[int, Pooled] = field(default_factory=dict)
    taken: int = 0


class SequencePool(_TaskPools):
    tasks: dict[str, _Sequence]

    def start_at(self, task_id: str, index: int) -> None:
        """The task continues from `index` (after a replay reset or from a checkpoint)."""
        task = self.tasks.setdefault(task_id, _Sequence())
        task.next_index = index
        task.waiting = {i: e for i, e in task.waiting.items() if i >= index}

    def add(self, entry: Pooled) -> bool:
        """Pools a frame; False when it comes before the next expected index or is waiting already."""
        task = self.tasks.setdefault(entry.item.task_id, _Sequence())
        if entry.index < task.next_index or entry.index in task.waiting:
            return False
        task.waiting[entry.index] = entry
        return True

    def take(self, batch: int) -> list[Pooled]:
        """Up to `batch` frames that continue their tasks' sequences, taken from the tasks in turn, the
        tasks that have had the fewest frames first: a new task's first frame does not wait behind
        another task's backlog."""
        taken: list[Pooled] = []
        ready = sorted((t for t in self.tasks.values() if t.next_index in t.waiting), key=lambda t: t.taken)
        while ready and len(taken) < batch:
            for task in list(ready):
                taken.append(task.waiting.pop(task.next_index))
                task.next_index += 1
                task.taken += 1
                if task.next_index not in task.waiting:
                    ready.remove(task)
                if len(taken) == batch:
                    break
        return taken

    def next_index(self, task_id: str) -> int:
        task = self.tasks.get(task_id)
        return task.next_index if task else 0

