"""What differs between ordered and unordered stages, one strategy class each. The worker
(posemesh.stages.worker) runs the flow `flow_for` picks for its stage and never asks which one it is.

- `UnorderedFlow` (detect, pose): a task's frames are spread over several partitions and replicas.
  LowestFirstPool; an end-of-stream record is passed on in the same step; a failing batch is narrowed
  down task by task, then frame by frame; a partition with a backlog in the pool is paused (flow control);
  a new task's partitions are read first until they give a frame.
- `OrderedFlow` (track, Recovery.REPLAY): one partition per task, so one replica owns a task. SequencePool;
  frames run one at a time (the stage's state must see each once); the end-of-stream record is held until
  the task's last frame is through, then `finish_task` runs and the stage's own end of stream goes out; a
  task that moves to or away from this replica loses its state here (the new owner reads it from frame 0).
- `ResumeFlow` (annotate, Recovery.RESUME): an OrderedFlow whose stage keeps durable checkpoints. A task
  continues from the stage's `resume_index`, and a processed frame's input is done only once the stage's
  `durable_index` covers it, or when its task finishes or fails.

Every flow owns its pool and the commit rule: which inputs may be marked done once the step's outputs are
flushed (`to_mark`, and ResumeFlow's `held`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable

from posemesh.mesh import kafka, records, tracing
from posemesh.stages.base import Recovery, ServiceUnavailable, Stage, TaskInfo
from posemesh.stages.pools import TP, LowestFirstPool, Pool, Pooled, SequencePool
from posemesh.stages.reading import InputReader
from posemesh.v1 import pipeline_pb2 as pb

log = logging.getLogger("posemesh.stage")

NEW_TASK_BOOST_S = 5.0

Fail = Callable[[str, str], None]  # (task id, message): the task cannot go on (the worker reports and drops it)
Send = Callable[[pb.StageRecord], None]  # a record onto the stage's output topic, delivered with the step's flush


class Flow(ABC):
    """What the worker's loop asks of its stage's flow. A worker that starts over (a reset) makes a new one."""

    pool: Pool

    def __init__(self, stage: Stage, batch: int, fail: Fail, send: Send):
        self.stage, self.batch = stage, batch
        self.fail, self.send = fail, send
        # Inputs whose outputs have been sent: done once the step's flush has them acknowledged.
        self.to_mark: list[tuple[TP, int]] = []

    # ------------------------------------------------------------------ records in

    @abstractmethod
    def poll(self, reader: InputReader) -> list:
        """The next records from the input topics."""

    def task_started(self, task: TaskInfo) -> None:  # noqa: B027 - only ordered flows place a task's start
        """The first record of the task's current run has arrived here."""

    @abstractmethod
    def end_of_stream(self, record: pb.StageRecord, tp: TP, offset: int) -> None:
        """The task's end-of-stream record (the worker has taken its total)."""

    def add(self, entry: Pooled) -> bool:
        """Pools a frame; False when it is a redelivery (the worker counts it as a duplicate)."""
        return self.pool.add(entry)

    # ------------------------------------------------------------------ one step

    def take(self) -> list[Pooled]:
        return self.pool.take(self.batch)

    @abstractmethod
    def run(self, ready: list[Pooled]) -> list[Pooled]:
        """`Stage.process` on the batch; a failure fails the task it is narrowed down to (`fail`) and the
        others go on. Returns the entries done."""

    def processed(self, entry: Pooled) -> None:
        """The stage has done the entry and its output has been sent: the input is done with the flush."""
        self.to_mark.append((entry.tp, entry.offset))

    @abstractmethod
    def end_step(self, tasks: dict[str, TaskInfo]) -> list[pb.TaskResult]:
        """After the batch, before the flush: what the step sends besides the frames' outputs. Returns the
        results to report (finished tasks)."""

    def commit(self, reader: InputReader) -> None:
        """The step's outputs are acknowledged: mark done what they cover, and commit."""
        self._mark_done(reader)
        reader.commit()

    def _mark_done(self, reader: InputReader) -> None:
        for tp, offset in self.to_mark:
            reader.done(tp, offset)
        self.to_mark = []

    # ------------------------------------------------------------------ tasks coming and going

    @abstractmethod
    def raw_partitions(self, partition: int, count: int) -> list[int]:
        """The partitions of raw_frames (of `count`) that hold the pixels of this input partition's frames."""

    @abstractmethod
    def revoked(self, tps: set[TP]) -> set[str]:
        """These partitions moved to another replica (or their task ended). Returns the tasks whose state on
        this worker must go."""

    def assigned(self, fresh: set[TP]) -> set[str]:
        """These partitions are new to this replica. Returns the tasks whose state on this worker must go."""
        return set()

    def drop_task(self, task_id: str) -> None:
        self.pool.drop_task(task_id)

    def task_failed(self, task_id: str, reader: InputReader) -> None:  # noqa: B027 - only ResumeFlow holds inputs
        """The task failed here (the worker then drops it): inputs still held for it are done now, as a
        failed task is not redone."""


class UnorderedFlow(Flow):
    def __init__(self, stage: Stage, batch: int, fail: Fail, send: Send, task_running: Callable[[str], bool]):
        super().__init__(stage, batch, fail, send)
        self.pool = LowestFirstPool()
        self.task_running = task_running  # whether a task has started and not failed here
        # End-of-stream records, passed on after the step's outputs. This replica cannot know when the task's
        # frames on other partitions and replicas are through; the next stage takes the total from it and
        # waits for the frames by index, whichever comes first.
        self.to_forward: list[tuple[pb.StageRecord, TP, int]] = []
        self.boost_since: dict[TP, float] = {}  # partitions of started tasks not heard from yet: since when
        self.batch_now = batch  # smaller while a new task's first frames are awaited

    def poll(self, reader: InputReader) -> list:
        pooled = self.pool.pooled()
        full = pooled >= self.batch and self.pool.ready()
        first = self._new_tasks_first(reader)
        return first + reader.poll(max(4 * self.batch - pooled, 1),
                                   0 if full or first else 0.02 if pooled else 0.05)

    def _new_tasks_first(self, reader: InputReader) -> list:
        """A new task's first frames, fetched before anything else. The local broker fills each fetch from
        one partition and librdkafka starts the next fetch at the following partition, so with tasks
        already flowing a new task's first frame came after 50-150 others (measured: 1-3 s at detect, as
        much again at pose). While a partition of a started task has given this replica nothing yet (for
        at most NEW_TASK_BOOST_S), each step first reads those partitions alone; the frame 0 found there
        then goes through alone (LowestFirstPool)."""
        # Partitions that have given nothing yet: mostly the reserved ids' (not started), else none.
        silent = {tp: kafka.task_of_topic(tp[0]) for tp in reader.owned - reader.positions.keys()}
        started = {t for t in set(silent.values()) - {None} if self.task_running(t)}
        starving = {tp for tp, task_id in silent.items() if task_id in started}
        if not starving and not self.boost_since:
            self.batch_now = self.batch
            return []
        now = time.monotonic()
        for tp in [tp for tp in self.boost_since if tp not in starving]:
            del self.boost_since[tp]
        boosted = {tp for tp in starving if now - self.boost_since.setdefault(tp, now) < NEW_TASK_BOOST_S}
        # Meanwhile batches are small, so the step comes back to look soon (a full batch of the other tasks
        # took 0.5-1 s here while the new task's first frame waited).
        self.batch_now = max(1, self.batch // 4) if boosted else self.batch
        return reader.poll_only(boosted, 4 * self.batch, 0.06) if boosted else []

    def end_of_stream(self, record: pb.StageRecord, tp: TP, offset: int) -> None:
        self.to_forward.append((record, tp, offset))

    def take(self) -> list[Pooled]:
        return self.pool.take(self.batch_now)

    def run(self, ready: list[Pooled]) -> list[Pooled]:
        """The whole batch in one call (models are fed best in batches); if it fails, task by task, then
        frame by frame within the failing task: that frame's task fails, the rest of the batch is done."""
        try:
            self.stage.process([e.item for e in ready])
            return ready
        except ServiceUnavailable as exc:
            for task_id in dict.fromkeys(e.item.task_id for e in ready):
                self.fail(task_id, str(exc))
            return []
        except Exception:  # noqa: BLE001 - narrowed down below
            log.warning("a batch of %d frames failed; retrying task by task", len(ready), exc_info=True)
        done = []
        for task_id, entries in by_task(ready).items():
            try:
                self.stage.process([e.item for e in entries])
                done += entries
                continue
            except ServiceUnavailable as exc:
                self.fail(task_id, str(exc))
                continue
            except Exception:  # noqa: BLE001 - narrowed down to a frame below
                pass
            for entry in entries:
                try:
                    self.stage.process([entry.item])
                    done.append(entry)
                except Exception as exc:  # noqa: BLE001 - this frame is the culprit
                    self.fail(task_id, f"frame {entry.index}: {describe(exc)}")
                    break
        return done

    def end_step(self, tasks: dict[str, TaskInfo]) -> list[pb.TaskResult]:
        for record, tp, offset in self.to_forward:
            self.send(record)
            self.to_mark.append((tp, offset))
        self.to_forward = []
        return []

    def commit(self, reader: InputReader) -> None:
        super().commit(reader)
        # One task's backlog must not crowd out the others: the local broker fills a fetch from one partition.
        reader.flow_control(self.pool.waiting_by_partition(), max(2, self.batch // 4))

    def raw_partitions(self, partition: int, count: int) -> list[int]:
        return [partition]  # a frame has the same partition on every topic of its task (by index)

    def revoked(self, tps: set[TP]) -> set[str]:
        # Only the frames of these partitions leave the pool (their new owner does them): the task's other
        # partitions, and what its frames did here, stay.
        self.pool.discard_partitions(tps)
        return set()


class OrderedFlow(Flow):
    def __init__(self, stage: Stage, batch: int, fail: Fail, send: Send):
        super().__init__(stage, batch, fail, send)
        self.pool = SequencePool()
        self.finished: set[str] = set()  # tasks whose finish_task ran: their frames are all through
        # A task's end-of-stream input, done with the step that finishes the task: committed earlier, a
        # replica taking the task over would never hear that it ended.
        self.eos_held: dict[str, tuple[TP, int]] = {}

    def poll(self, reader: InputReader) -> list:
        return reader.poll(4 * self.batch, 0.05)

    def start_index(self, task: TaskInfo) -> int:
        """The first index of the task on this replica: a replica that takes a task over reads it again
        from its first frame (Recovery.REPLAY)."""
        return 0

    def task_started(self, task: TaskInfo) -> None:
        start = self.start_index(task)
        self.pool.start_at(task.task_id, start)
        if start:
            log.info("task %s: continuing from frame %d (checkpoint)", task.task_id, start)

    def end_of_stream(self, record: pb.StageRecord, tp: TP, offset: int) -> None:
        self.eos_held[record.task_id] = (tp, offset)

    def add(self, entry: Pooled) -> bool:
        return entry.item.task_id not in self.finished and self.pool.add(entry)

    def run(self, ready: list[Pooled]) -> list[Pooled]:
        """Frame by frame: the stage's state must see every frame once, in order, so a failing batch cannot
        be tried again. A failing frame fails its task; its later frames in the batch are skipped."""
        done, failed = [], set()
        for entry in ready:
            task_id = entry.item.task_id
            if task_id in failed:
                continue
            try:
                self.stage.process([entry.item])
                done.append(entry)
            except Exception as exc:  # noqa: BLE001 - fails this task only
                failed.add(task_id)
                self.fail(task_id, str(exc) if isinstance(exc, ServiceUnavailable)
                          else f"frame {entry.index}: {describe(exc)}")
        return done

    def end_step(self, tasks: dict[str, TaskInfo]) -> list[pb.TaskResult]:
        """Finish every task whose last frame is through: `finish_task`, then the stage's own end of stream;
        the task's held inputs are done with this step's flush. (A failed task has no TaskInfo left.)"""
        results = []
        for task_id, task in list(tasks.items()):
            if task_id in self.finished or task.total is None or self.pool.next_index(task_id) < task.total:
                continue
            try:
                with tracing.child_span(f"posemesh.{self.stage.name}.finish", task.trace,
                                        {"posemesh.task_id": task_id}):
                    result = self.stage.finish_task(task)
            except Exception as exc:
                log.exception("finishing task %s failed", task_id)
                self.fail(task_id, f"finishing the task: {describe(exc)}")
                continue
            self.finished.add(task_id)
            if self.stage.spec.writes:
                self.send(records.end_of_stream_record(task_id, task.options, task.epoch, task.total, task.fps))
            self._release(task_id)
            if result is not None:
                result.epoch = task.epoch
                results.append(result)
        return results

    def _release(self, task_id: str) -> None:
        """The task finished: what was held for it is done with this step's flush."""
        if task_id in self.eos_held:
            self.to_mark.append(self.eos_held.pop(task_id))

    def raw_partitions(self, partition: int, count: int) -> list[int]:
        return list(range(count))  # the one input partition carries every frame of the task

    def revoked(self, tps: set[TP]) -> set[str]:
        return tasks_of(tps)

    def assigned(self, fresh: set[TP]) -> set[str]:
        # A task new to this replica starts from scratch (REPLAY) or from its checkpoint (RESUME).
        return tasks_of(fresh)

    def drop_task(self, task_id: str) -> None:
        super().drop_task(task_id)
        self.eos_held.pop(task_id, None)
        self.finished.discard(task_id)


class ResumeFlow(OrderedFlow):
    def __init__(self, stage: Stage, batch: int, fail: Fail, send: Send):
        super().__init__(stage, batch, fail, send)
        # Processed frames whose output is not durable yet, per task: (index, partition, offset).
        self.held: dict[str, list[tuple[int, TP, int]]] = defaultdict(list)

    def start_index(self, task: TaskInfo) -> int:
        return self.stage.resume_index(task)

    def processed(self, entry: Pooled) -> None:
        # The output is the stage's file, not the record sent: its input waits for the stage's checkpoint.
        self.held[entry.item.task_id].append((entry.index, entry.tp, entry.offset))

    def _release(self, task_id: str) -> None:
        for _index, tp, offset in self.held.pop(task_id, []):
            self.to_mark.append((tp, offset))
        super()._release(task_id)

    def _mark_done(self, reader: InputReader) -> None:
        super()._mark_done(reader)
        for task_id, entries in self.held.items():
            if not entries:
                continue
            durable = self.stage.durable_index(task_id)
            keep = []
            for index, tp, offset in entries:
                if index <= durable:
                    reader.done(tp, offset)
                else:
                    keep.append((index, tp, offset))
            self.held[task_id] = keep

    def task_failed(self, task_id: str, reader: InputReader) -> None:
        for _index, tp, offset in self.held.pop(task_id, []):
            reader.done(tp, offset)

    def drop_task(self, task_id: str) -> None:
        super().drop_task(task_id)
        self.held.pop(task_id, None)


def flow_for(stage: Stage, batch: int, fail: Fail, send: Send, task_running: Callable[[str], bool]) -> Flow:
    """The one place that looks at whether the stage is ordered and how it recovers."""
    if not stage.ordered:
        if stage.recovery is Recovery.RESUME:
            raise ValueError(f"stage {stage.name}: Recovery.RESUME needs an ordered stage")
        return UnorderedFlow(stage, batch, fail, send, task_running)
    if stage.recovery is Recovery.RESUME:
        return ResumeFlow(stage, batch, fail, send)
    return OrderedFlow(stage, batch, fail, send)


def tasks_of(tps: set[TP]) -> set[str]:
    return {kafka.task_of_topic(t) for t, _p in tps} - {None}


def by_task(entries: list[Pooled]) -> dict[str, list[Pooled]]:
    out: dict[str, list[Pooled]] = {}
    for entry in entries:
        out.setdefault(entry.item.task_id, []).append(entry)
    return out


def describe(exc: Exception) -> str:
    """An exception as a TaskFailure names it: its text, cut short."""
    text = str(exc) or exc.__class__.__name__
    return text if len(text) <= 300 else text[:300] + "..."
