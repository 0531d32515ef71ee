"""Per-task topics: creation, the reader hand-off, and deletion.

Hand-off (deleting a topic under a reader crashes the reader on the local broker, and is rude on any):
1. When a task reaches a terminal state the gateway publishes TaskEnded on posemesh.control.
2. Every worker drops the task's topic from its subscription (a rebalance: tasks ending close together are
   dropped in one, and while other tasks it reads run, up to POSEMESH_ENDED_TOPICS_HOLD_S later; see
   stages/worker.py) and then stops listing the task in the heartbeats it sends every second (and within
   0.5 s of a change) on posemesh.events.
3. After `topic_delete_delay_s` (default 60 s, for late readers such as a worker catching up), the
   gateway deletes the task's five topics (raw_frames, yolox, rtmpose, bytetrack and, if a viewer made it,
   live: kafka.task_topics) once no worker heard from in the last LIVENESS_S seconds lists the
   task, and none has listed it for DELETE_GRACE_S. A worker that died is no reader: its consumer is gone
   with it. The grace covers what a heartbeat cannot say: a fetch already in flight when the worker let
   go of the topic, and a stale assignment handed out just after the heartbeat was written.
At start-up the gateway waits one liveness window (to hear every live worker) before deleting
anything, and treats per-task topics whose task is not live (unknown or finished) the same way.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Producer

from posemesh.gateway.placement import IngestPlacement
from posemesh.gateway.store import TaskStore, now_us
from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")

LIVENESS_S = 5.0
DELETE_GRACE_S = 2.0


class TopicManager:
    def __init__(self, settings: Settings, producer: Producer, store: TaskStore):
        self.settings, self.producer, self.store = settings, producer, store
        self.admin = kafka.admin(settings)
        self.lock = threading.Lock()
        self.publish_lock = threading.Lock()
        self.readers: dict[str, tuple[float, set[str]]] = {}  # worker -> (heard at, tasks it reads)
        self.waiting: dict[str, tuple[float, set[str]]] = {}  # ingest replica -> (heard at, tasks queued there)
        self.placement = IngestPlacement(settings.ingest_partitions)  # where new IngestJobs go
        self.last_listed: dict[str, float] = {}  # task -> when a heartbeat last listed it (monotonic, here)
        self.orphans: dict[str, float] = {}  # topics of unknown/finished tasks found on the broker
        self.local_readers = set  # () -> tasks whose topics the gateway itself reads (live views)
        self.is_reserved = lambda _task_id: False  # a reserved task id (gateway/reservations.py): not an orphan
        self.started = time.time()

    def create(self, task_id: str) -> None:
        kafka.create_topics(self.admin, kafka.task_topic_specs(task_id, self.settings))

    def on_broker(self) -> dict[str, list[str]]:
        """The per-task topics the broker has, by task id."""
        return kafka.list_task_topics(self.admin)

    def delete(self, task_id: str, timeout: float = 15.0) -> None:
        """Delete a task's topics now: after the hand-off (`sweep`), or those of a task no worker was told of."""
        kafka.delete_topics(self.admin, kafka.task_topics(task_id), timeout=timeout)

    def _control(self, event: pb.ControlEvent, headers: list | None = None) -> None:
        """`headers`: Kafka headers of the event's own record (a TaskStarted's carry its run's trace context)."""
        self._publish(kafka.CONTROL_TOPIC, kafka.control_records(event), headers)

    def _publish(self, topic: str, records: list[tuple[bytes, bytes | None]], headers: list | None = None,
                 partition: int | None = None) -> None:
        """Write `records` (key, value) and wait until the broker has them; `headers` go on the first; all on
        `partition` when given (else where their keys hash)."""
        failed: list = []  # delivery errors (a partition the topic does not have, say): flush() still returns 0

        def delivered(err, _msg) -> None:
            if err is not None:
                failed.append(err)
        where = {} if partition is None else {"partition": partition}
        # One thread at a time: several (uploads, the sweep, the broker watch) publish control events,
        # and a producer's flush must not run on two threads at once.
        with self.publish_lock:
            for i, (key, value) in enumerate(records):
                own = headers if i == 0 and headers else None  # the event's record, not its tombstones
                self.producer.produce(topic, value, key=key, headers=own, on_delivery=delivered, **where)
            try:
                remaining = self.producer.flush(10)
            except Exception as exc:  # noqa: BLE001 - a fatal producer error: the broker watch replaces it
                raise RuntimeError(f"could not publish to {topic} ({exc})") from None
            if failed:
                raise RuntimeError(f"could not publish to {topic} ({failed[0]})")
            if remaining:
                # Not sent later either: the caller undoes what the records were about (a task that could not
                # start), and a job delivered after that would have a replica decode a task that is gone.
                self.producer.purge()
                raise RuntimeError(f"could not publish to {topic}")

    def publish_ingest_job(self, job: pb.IngestJob, partition: int | None, headers: list | None = None) -> None:
        """Hand an upload or a camera to the ingest stage, on the run's `partition` (gateway/store.py's
        ingest_partition; None: where the task id hashes). Either way a run's jobs share a partition, and so a
        replica. `headers`: the run's trace context, as on its TaskStarted (the replica may read the job first)."""
        self._publish(kafka.INGEST_TOPIC, [(job.task.task_id.encode(), job.SerializeToString())], headers, partition)

    def publish_started(self, task: tpb.Task, epoch: int, *, publish_url: str, headers: list | None = None) -> None:
        self._control(pb.ControlEvent(task_id=task.task_id, started=pb.TaskStarted(
            options=task.options, video=task.video, epoch=epoch, live=task.HasField("live"), publish_url=publish_url)),
            headers)

    def publish_reserved(self, task_id: str) -> None:
        self._control(pb.ControlEvent(task_id=task_id, reserved=pb.TaskReserved()))

    def publish_viewers(self, task_id: str, count: int) -> None:
        self._control(pb.ControlEvent(task_id=task_id, viewers=pb.ViewersChanged(count=count)))

    def publish_source_stopped(self, task_id: str, reason: str, state: int = tpb.TASK_STATE_CANCELLED) -> None:
        self._control(pb.ControlEvent(task_id=task_id, source_stopped=pb.SourceStopped(reason=reason, state=state)))

    def publish_ended(self, task_id: str, state: int) -> None:
        self._control(pb.ControlEvent(task_id=task_id, ended=pb.TaskEnded(state=state)))

    def heartbeat(self, worker: str, sent_at: float, tasks: list[str], waiting: list[str] = (),
                  ingest_partitions: list[int] | None = None) -> None:
        """A worker's heartbeat; `ingest_partitions` from an ingest replica (empty while it holds none)."""
        if ingest_partitions is not None:
            self.placement.heard(worker, sent_at, tasks, ingest_partitions)
        with self.lock:
            known = self.readers.get(worker)
            if known is None or known[0] <= sent_at:
                self.readers[worker] = (sent_at, set(tasks))
                self.waiting[worker] = (sent_at, set(waiting))
            now = time.monotonic()
            for task_id in tasks:
                self.last_listed[task_id] = now

    def waiting_on_replicas(self) -> set[str]:
        """Tasks whose upload a live ingest replica (heard from in the last LIVENESS_S) has queued for a slot."""
        cutoff = time.time() - LIVENESS_S
        with self.lock:
            return set().union(*(tasks for at, tasks in self.waiting.values() if at >= cutoff))

    def forget_readers(self) -> None:
        """The broker lost its data: what workers said before is about topics that are gone."""
        with self.lock:
            self.readers.clear()
            self.waiting.clear()
            self.placement.forget()
            self.orphans.clear()
            self.last_listed.clear()

    def read_by_live_worker(self) -> set[str]:
        cutoff = time.time() - LIVENESS_S
        recent = time.monotonic() - DELETE_GRACE_S
        with self.lock:
            for worker in [w for w, (t, _) in self.readers.items() if t < cutoff]:
                del self.readers[worker]
            for task_id in [t for t, at in self.last_listed.items() if at < recent - 60]:
                del self.last_listed[task_id]
            listed = set().union(*(tasks for _t, tasks in self.readers.values())) if self.readers else set()
            return listed | {t for t, at in self.last_listed.items() if at >= recent}

    def find_orphans(self) -> list[str]:
        """Per-task topics on the broker whose task is not live: announce their end, delete them later."""
        found = []
        for task_id in self.on_broker():
            if task_id in self.orphans or self.is_reserved(task_id) or self.store.handles_topics_of(task_id):
                continue  # known already, reserved, an active task's, or an ended one's the normal path deletes
            self.publish_ended(task_id, tpb.TASK_STATE_CANCELLED)
            self.orphans.setdefault(task_id, time.time())
            found.append(task_id)
        self.store.drop_reserved(found)  # a dead gateway's reservations among them
        return found

    def sweep(self) -> list[str]:
        """Delete the topics whose time has come and that no live worker reads. Returns deleted task ids."""
        if time.time() - self.started < LIVENESS_S:
            return []  # not every live worker has been heard from yet
        due_us = now_us() - int(self.settings.topic_delete_delay_s * 1e6)
        candidates = self.store.tasks_with_topics_due(due_us) + list(self.orphans)
        if not candidates:
            return []
        busy = self.read_by_live_worker() | self.local_readers()
        deleted = []
        for task_id in candidates:
            if task_id in busy:
                log.debug("topics of %s still read by a live worker", task_id)
                continue
            self.delete(task_id)
            self.orphans.pop(task_id, None)
            self.store.mark_topics_deleted(task_id)
            deleted.append(task_id)
            log.info("deleted topics of task %s", task_id)
        return deleted
