"""Task ids whose topics are made before their upload arrives, so a new task does not wait for group joins.

A stage worker reads a task's topic as a member of its stage's consumer group; a topic added to a group's
subscription costs a rebalance, about a second on every stage (on the local broker at least 1 s whatever
the session timeout), during which the whole group reads nothing. Paid when a task starts, it sits between
the upload and its first annotated frame, and a task arriving while a join is under way pays two.

So the gateway keeps a few task ids reserved: their per-task topics exist and a TaskReserved event on
posemesh.control has every worker subscribe to them. An upload takes a reserved id (TaskStarted follows as
for any task) and its frames flow into partitions the groups already hold. Reservations are made again only
once no task has started for `quiet_s`: the joins they cost then fall between bursts of new tasks, not in
the middle of one, and, while some are left, only once no task is running (a top-up's joins would stop every
stage for the running tasks). With none left, a task makes its own topics as before.

A reservation the gateway gives up (shutdown) is announced ended; its topics are then deleted like any
orphan's, after the workers let go (posemesh.gateway.topics). Reservations are written in the task store
with the gateway that made them, so that the gateway holding the mesh duties does not take another live
gateway's reserved topics for orphans; a dead gateway's are orphans once its lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time

from posemesh.gateway.topics import TopicManager
from posemesh.mesh import names
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")


class Reservations:
    def __init__(self, topics: TopicManager, count: int, quiet_s: float, store=None, gateway: str = ""):
        self.topics, self.count, self.quiet_s = topics, count, quiet_s
        # Where reservations are recorded with this gateway's id (gateway/duties.py): the task store (None:
        # not recorded, for the bookkeeping's own tests).
        self.store, self.gateway = store, gateway
        self.lock = threading.Lock()
        self.ready: list[str] = []  # reserved ids: topics made and announced
        self.lent: set[str] = set()  # taken by an upload that has not made its task yet
        self.last_taken = 0.0

    def take(self) -> str | None:
        """A reserved task id for a new task, or None (the task makes its own topics)."""
        with self.lock:
            self.last_taken = time.monotonic()
            if not self.ready:
                return None
            task_id = self.ready.pop(0)
            self.lent.add(task_id)
            return task_id

    def give_back(self, task_id: str) -> None:
        """The upload that took `task_id` made no task (refused, or a retry of an earlier upload): its
        topics are untouched, so the id stays reserved."""
        with self.lock:
            if task_id in self.lent:
                self.lent.discard(task_id)
                self.ready.insert(0, task_id)

    def used(self, task_id: str) -> None:
        """A task exists under `task_id` now: from here on it is that task's to end and clean up."""
        with self.lock:
            self.lent.discard(task_id)

    def __contains__(self, task_id: str) -> bool:
        with self.lock:
            return task_id in self.ready or task_id in self.lent

    def maintain(self) -> None:
        """Top the reservations up, between bursts of new tasks (called by the gateway's sweep)."""
        with self.lock:
            missing = self.count - len(self.ready) - len(self.lent)
            if missing <= 0 or time.monotonic() - self.last_taken < self.quiet_s:
                return
            some_left = bool(self.ready)
        # While tasks run, a top-up's joins stop every stage for them (a towncentre upload: both cores idle for
        # a second, 5 s in): it waits until the mesh is idle, unless no reserved id is left, when the next task
        # would pay those joins itself at its start.
        if some_left and self.store is not None and self.store.any_active():
            return
        made = []
        try:
            for _ in range(missing):
                task_id = names.new_task_id()
                if self.store is not None:  # before its topics: they are never an orphan's
                    self.store.add_reserved(task_id, self.gateway)
                try:
                    self.topics.create(task_id)
                    self.topics.publish_reserved(task_id)
                except Exception:
                    # No worker heard of it: its topics (if any were made) go with the next sweep.
                    self.topics.orphans.setdefault(task_id, time.time())
                    raise
                made.append(task_id)
        finally:
            with self.lock:
                self.ready += made
            if made:
                log.info("reserved %d task ids (topics made, workers subscribed)", len(made))

    def forget(self) -> None:
        """The broker lost its data: the reserved topics are gone; new ones are made at the next maintain."""
        with self.lock:
            gone, self.ready, self.lent = [*self.ready, *self.lent], [], set()
        self._drop(gone)

    def release(self) -> None:
        """Give every unused reservation up (the gateway stops): workers let go of the topics, and the next
        gateway deletes them as orphans."""
        with self.lock:
            ids, self.ready = self.ready, []
        for task_id in ids:
            try:
                self.topics.publish_ended(task_id, tpb.TASK_STATE_CANCELLED)
            except Exception:  # noqa: BLE001 - the broker is away; the next gateway finds them as orphans
                log.warning("could not release reserved task id %s", task_id)
        self._drop(ids)

    def _drop(self, task_ids: list[str]) -> None:
        if self.store is not None:
            self.store.drop_reserved(task_ids)
