"""A stage worker: one member of its stage's consumer group, running one Stage.

One frame's way through a worker:

1. The ControlFollower says which tasks are live; the worker reads their input topics (InputReader).
2. A record arrives from any of them. It is kept if its task is live here and the record belongs to the
   task's current run (epoch); its index is de-duplicated as it enters a pool (posemesh.stages.pools).
3. A batch leaves the pool and `Stage.process` does the work. An exception is narrowed down to its task
   and frame: that task is failed (TaskFailure, naming the stage and frame), the rest goes on, and the
   task's records are skipped from then on (never retried forever).
4. Outputs go to the next topic and are flushed; only then are their inputs' offsets committed
   (Recovery.RESUME stages: once the stage's checkpoint covers them). Output that cannot be delivered
   makes the worker start over from the committed offsets, as a crash would, without dying.
5. End of stream: unordered stages pass it on at once; ordered ones finish the task when its last frame
   is through (`finish_task`), then pass it on.
6. Progress (frame indices), results and failures go to posemesh.events (Reporter).

What differs between ordered and unordered stages (the pool, end of stream, how a failure is narrowed down,
what a flush lets commit, recovery when partitions move, polling) is the stage's flow
(posemesh.stages.flows); this loop is the same for every stage.

When the broker loses its data (ControlFollower.generation changes) the worker drops every task's state
and its Kafka clients and starts over: the gateway runs those tasks again under a new epoch.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Producer
from google.protobuf.message import DecodeError
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram, start_http_server

from posemesh.mesh import kafka, pipeline, records, tracing
from posemesh.mesh.settings import Settings
from posemesh.stages.base import FrameItem, Stage, TaskInfo
from posemesh.stages.control import ControlFollower
from posemesh.stages.control_api import ControlApi
from posemesh.stages.flows import by_task, describe, flow_for
from posemesh.stages.pixels import RawFrames
from posemesh.stages.pools import Pooled
from posemesh.stages.reading import InputReader
from posemesh.stages.reporting import Reporter
from posemesh.stages.shared_pictures import PictureKey, SharedPictures
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import stage_service_pb2 as spb

log = logging.getLogger("posemesh.stage")

FRAMES = PromCounter("posemesh_stage_frames_total", "Frames processed", ["stage"])
DUPLICATES = PromCounter("posemesh_stage_duplicates_total", "Redelivered frames dropped by index", ["stage"])
FAILURES = PromCounter("posemesh_stage_task_failures_total", "Tasks this worker failed", ["stage"])
RESETS = PromCounter("posemesh_stage_resets_total", "Times the worker started over", ["stage", "reason"])
PRODUCERS_RENEWED = PromCounter("posemesh_stage_producers_renewed_total",
                                "Producers replaced after writing to POSEMESH_PRODUCER_TOPICS_MAX topics", ["stage"])
BATCH = Histogram("posemesh_stage_batch_frames", "Frames per processed batch", ["stage"],
                  buckets=(1, 2, 4, 8, 16, 32, 64))
PROCESS_SECONDS = Histogram("posemesh_stage_process_seconds", "Stage.process time per batch", ["stage"])
LOOP_STALL_S = 120.0
JOIN_PATIENCE_S = 10.0  # a join that takes longer than this is not waited for
# Each join costs about a second on the local broker: a burst of task starts is taken in one join, once
# no control event came for SUBSCRIBE_SETTLE_S (and at most SUBSCRIBE_SETTLE_MAX_S after the first).
SUBSCRIBE_SETTLE_S = 0.15
SUBSCRIBE_SETTLE_MAX_S = 0.5
# Letting go of ended tasks' topics is a join too: tasks ending close together are let go of in one, at
# least this long after the first of them (their topics are deleted that much later); while other tasks run, up
# to Settings.ended_topics_hold_s after it.
REMOVAL_BATCH_S = 5.0
FLUSH_TIMEOUT_S = 30.0
# How long an idle replica's step waits (a control change ends the wait at once). A rebalance another member
# starts reaches it through its consumer's callbacks (revoke, then assign), each served after a wait: the
# group's join can wait up to twice this much longer for it.
IDLE_WAIT_S = 0.25


class StageWorker:
    def __init__(self, stage: Stage, settings: Settings, control_port: int = 0, metrics_port: int = 0,
                 worker_id: str | None = None):
        self.stage, self.settings = stage, settings
        self.spec = stage.spec
        self.worker_id = worker_id or f"{stage.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.metrics_port = metrics_port
        self.batch = settings.max_batch(stage.name, stage.max_batch)
        self.running = threading.Event()
        self.control = ControlFollower(settings, self.worker_id)
        self.reporter = Reporter(self.worker_id, stage.name)
        self.api = ControlApi(self, control_port)
        stage.emit = self._emit
        stage.fetch_pixels = lambda items: self.pixels.fill(self._find_jpegs(items))
        # Decoded frames and JPEGs handed from a stage to a later one on this host (stages/shared_pictures.py).
        self.takes_pictures = pipeline.takes_shared_pictures(stage.name)
        self.takes_jpegs = pipeline.takes_shared_jpegs(stage.name)
        self.shared = None
        if settings.shared_pictures_dir and (self.spec.shares_pictures or self.takes_pictures
                                             or self.spec.shares_jpegs or self.takes_jpegs):
            self.shared = SharedPictures(Path(settings.shared_pictures_dir), settings.shared_pictures_mb << 20,
                                         owner=self.takes_pictures, frames_ahead=settings.max_frames_ahead)
            if self.spec.shares_pictures:
                stage.share = self._share
        self.control_port = self.api.port
        self.reader: InputReader | None = None  # made once the broker's incarnation is known (_open_kafka)
        self.generation = 0
        self.resets = 0
        self.assignments = 0  # of the consumers before the latest reset
        self.answered = False  # whether any of its consumers' groups has answered yet (problem())
        self.subscription_changes = 0  # likewise
        self.frames_processed = 0
        self.batches = 0
        self.started_at = time.time()
        self.loop_seen = time.monotonic()
        self.locally_stopped: set[str] = set()
        self.subscribed_at = 0.0
        self.removal_since = 0.0  # when the first ended task still subscribed was seen (0: none)
        self.removal_due = 0.0  # when the pending look at letting go of them is due
        self.change_seen = 0.0  # when the first control change not yet applied was seen
        self.last_event = 0.0  # when the latest control event was seen
        # Topics of ended tasks are let go of with the next join that adds topics (the gateway's new reservations
        # once the mesh is idle: posemesh.gateway.reservations), or else once no task has started (or been
        # reserved) for this long and no task this stage reads still runs, or Settings.ended_topics_hold_s after
        # the first of them ended (_apply_subscription).
        self.removal_quiet_s = settings.reserve_quiet_s + 1.0
        self.events_seen = 0
        self.holds_seen: tuple | None = None  # what _hold_until_started last worked from
        self._clear_state()

    def _clear_state(self) -> None:
        self.tasks: dict[str, TaskInfo] = {}
        self.failed: dict[str, str] = {}
        self.duplicates: Counter = Counter()
        self.flow = flow_for(self.stage, self.batch, self._fail, self._send, self._task_running)
        # Records of a reserved task whose TaskStarted the control follower has not read yet (the frames
        # can overtake it: two consumers): (task id, message), taken in once it has.
        self.early: list[tuple[str, object]] = []
        self.unflushed = False  # records sent since the last flush

    # ------------------------------------------------------------------ life

    def run(self) -> None:
        kafka.ensure_shared_topics(self.settings)
        self.stage.setup(self.settings)
        if self.shared is not None and self.takes_pictures:
            self.shared.sweep()  # rings of this host's replicas that died
        self.control.start()
        self.api.start()
        if self.metrics_port:
            start_http_server(self.metrics_port, addr=self.settings.control_host)
        self.running.set()  # from here stop() also ends the wait for the broker
        if not self._wait_for_incarnation():
            self.api.stop()
            self.control.stop()
            return
        self._open_kafka()
        self.reporter.start()
        log.info("%s ready (control port %s)", self.worker_id, self.control_port)
        try:
            while self.running.is_set():
                self.loop_seen = time.monotonic()
                if self.control.generation != self.generation:
                    self._reset("broker_lost", "the broker lost its data")
                    continue
                self._apply_subscription()
                self._hold_until_started()
                if self.early:
                    self._take_in_early()
                self._take_in(self._idle_poll() if self._idle() else self.flow.poll(self.reader))
                self._step()
                self._renew_a_full_producer()
                # What the heartbeats say this worker reads follows every (re)assignment at once: the
                # gateway deletes a finished task's topics as soon as nobody lists it.
                self.reporter.reading_tasks(self._reading_tasks())
        finally:
            self._shutdown()

    def stop(self, *_args) -> None:
        self.running.clear()

    def _idle(self) -> bool:
        """Nothing to read (every partition this replica owns is held or paused: reserved ids, the idle
        topic), nothing pooled, sent or waiting, no join under way, no control change to apply."""
        return not (self.reader.flowing or self.flow.pool.pooled() or self.flow.to_mark or self.unflushed
                    or self.early or self.reader.joining or self.control.changed.is_set())

    def _idle_poll(self) -> list:
        """An idle replica's step: wait for a control change (a task starting wakes it at once) for at most
        IDLE_WAIT_S, then serve the consumer's callbacks. The 20 steps a second of a working replica cost an
        idle stack about 1% of a core per worker (bench/idle.py)."""
        self.control.changed.wait(IDLE_WAIT_S)
        return self.reader.poll(1, 0)

    def _wait_for_incarnation(self) -> bool:
        """Wait until the control follower knows the broker's incarnation, which names the consumer group
        (group_name); False when the worker was stopped first. A worker that made its consumer before
        that (a restarted replica, while the follower's first look at the broker was under way) joined a
        group of its own, `<prefix>-<stage>-`, next to its peers' group, and did every task a second time."""
        while self.control.incarnation is None:
            if not self.running.is_set():
                return False
            self.loop_seen = time.monotonic()  # waiting for the broker is not a stalled loop
            time.sleep(0.1)
        return True

    def _open_kafka(self) -> None:
        if self.control.incarnation is None:
            raise RuntimeError("the consumer group is named after the broker's incarnation, not known yet")
        self.generation = self.control.generation
        self._new_producer()
        self.reader = InputReader(self.settings, self.group_name(), self.worker_id, self.stage.recovery,
                                  self._on_revoked, self._on_assigned)
        # A stage after the first that needs pixels reads them from raw_frames by reference.
        self.pixels = RawFrames(self.settings, self.worker_id) if self._fetches_pixels else None
        self.control.changed.set()  # subscribe afresh

    def _new_producer(self) -> None:
        # A worker writes only to topics made before it writes to them: a task's pipeline topics before its
        # TaskStarted, its live topic before the ViewersChanged that asks for live frames, the shared ones at
        # start-up (a topic not in the producer's metadata yet is looked up at once). Its reset replaces the
        # producer when the broker lost its data: the periodic metadata refresh tells it nothing.
        self.producer = Producer({**kafka.producer_config(self.settings, self.worker_id), **kafka.QUIET_METADATA,
                                  "error_cb": lambda err: log.warning("producer: %s", err)})
        # A Sender per producer: the late delivery errors of a producer replaced by a reset stay with it.
        self.sender = kafka.Sender(self.producer)
        self.reporter.attach(self.producer)

    def _renew_a_full_producer(self) -> None:
        """Replace the producer once it has written to PRODUCER_TOPICS_MAX topics, between two steps with
        everything it sent acknowledged: librdkafka asks the broker for the metadata of every topic a producer
        ever wrote to, for as long as it lives, deleted topics included (confluentinc/librdkafka#4214), and a
        worker writes a topic or two for every task (bench/README.md, "Stale topics"). What the heartbeat
        thread may have queued on the old one meanwhile is flushed on the side, not waited for."""
        if self.unflushed or len(self.sender.topics) < self.settings.producer_topics_max:
            return
        old, written = self.producer, len(self.sender.topics)
        self._new_producer()
        _on_the_side(lambda: old.flush(5), 0, "the replaced producer's flush")
        PRODUCERS_RENEWED.labels(self.stage.name).inc()
        log.info("%s: a new producer (the last wrote to %d topics)", self.worker_id, written)

    @property
    def _fetches_pixels(self) -> bool:
        return self.spec.pixels and self.spec.reads != pipeline.PIXELS_TOPIC

    def group_name(self) -> str:
        return self.control.group_name(self.stage.name)

    def _reset(self, reason: str, why: str) -> None:
        """Start over as a restarted process would: no task state, new Kafka clients, inputs read again
        from the committed offsets (or from the start, when the broker lost its data)."""
        log.warning("%s: starting over (%s)", self.worker_id, why)
        RESETS.labels(self.stage.name, reason).inc()
        self.resets += 1
        for task_id in list(self.tasks):
            self.stage.drop_task(task_id)
        self.reporter.attach(None)
        try:  # what the old producer still holds is dropped, not delivered: those inputs are redone
            self.producer.purge(blocking=False)
        except Exception:  # noqa: BLE001
            pass
        # After a broker loss the old consumer belongs to a group nobody will use again: it is dropped on the
        # side without leaving that group. Otherwise it must be gone before the new one joins the same group.
        self.assignments += self.reader.assignments
        self.subscription_changes += self.reader.subscription_changes
        reader = self.reader  # after a broker loss its group is gone: dropped without leaving it
        self._let_go(reader, reader.abandon if reason == "broker_lost" else reader.close,
                     0.0 if reason == "broker_lost" else 15.0, "the old consumer's close")
        if self.pixels is not None:
            _on_the_side(self.pixels.close, 5.0, "the old pixel reader's close")
        if self.shared is not None:  # the new consumer's assignments make (or find) the rings again
            self.shared.close()
        self._clear_state()
        self._open_kafka()
        log.info("%s: new Kafka clients, consumer group %s", self.worker_id, self.group_name())

    def _let_go(self, reader: InputReader, end: Callable[[], None], wait_s: float, what: str) -> None:
        """End a consumer (`end`: one of its close/leave/abandon) on the side, waiting at most `wait_s`, so a
        worker never hangs with a client that cannot close. Its callbacks must not touch this worker's new
        state, so they are cut off first."""
        reader.on_revoked = reader.on_assigned = lambda _tps: None
        _on_the_side(end, wait_s, what)

    def _shutdown(self) -> None:
        self.running.clear()
        self.api.stop()
        for task_id in list(self.tasks):
            self.stage.drop_task(task_id)
        try:  # the process exits next: the group is left, the clients are not destroyed (bounded either way)
            self._let_go(self.reader, self.reader.leave, 10.0, "leaving the consumer group")
        finally:
            self.reporter.reading_tasks([])
            self.reporter.flush_progress()
            self.reporter.heartbeat()
            self.reporter.stop()
            try:
                self.producer.flush(5)
            except KafkaException as exc:  # a fatal producer error at exit: nothing left to save
                log.warning("final flush: %s", exc)
            self.control.stop()
            try:
                self.stage.close()
            finally:
                if self.shared is not None:
                    self.shared.close()

    # ------------------------------------------------------------------ which topics to read

    def _apply_subscription(self) -> None:
        if not self.control.changed.is_set():
            self.change_seen = 0.0
            return
        if not self.control.caught_up.is_set():
            return  # the control history is still being read: which tasks are live is not known yet
        now = time.monotonic()
        self.change_seen = self.change_seen or now
        if self.control.events != self.events_seen:
            self.events_seen, self.last_event = self.control.events, now
        if now - self.last_event < SUBSCRIBE_SETTLE_S and now - self.change_seen < SUBSCRIBE_SETTLE_MAX_S:
            return  # tasks often start in bursts: one join for the burst, not one per task
        if self.reader.joining and now - self.subscribed_at < JOIN_PATIENCE_S:
            return  # a join is under way: the change goes in once it is done (all at once)
        self.control.changed.clear()
        self.change_seen = 0.0
        live, _ended = self.control.snapshot()
        # Reserved task ids are read before their task starts: it then needs no join (gateway/reservations.py).
        wanted_tasks = [t for t in [*live, *self.control.reserved_tasks()] if t not in self.locally_stopped]
        for task_id in [t for t in set(self.tasks) | set(self.failed) if t not in live or t in self.locally_stopped]:
            self._forget(task_id)
        if self.pixels is not None:
            for task_id in self.pixels.reading_tasks() - set(wanted_tasks):
                self.pixels.drop_task(task_id)  # ended (or a reservation given up) before its frames came here
            for task_id in wanted_tasks:
                count = kafka.partitions_for(pipeline.PIXELS_TOPIC, self.settings)
                self.pixels.prepare(task_id, count)
                if not self._wants_pixels(task_id):  # no read-ahead while reserved, nor once it says no pixels
                    self.pixels.warm(task_id, list(range(count)), on=False)
        wanted = [kafka.task_topic(self.spec.reads, t) for t in wanted_tasks]
        if wanted:
            try:
                existing = set(self.producer.list_topics(timeout=5).topics)
            except Exception:  # noqa: BLE001 - the broker is away: look again in a second, reading what it reads now
                _later(1.0, self.control.changed.set)
                return
            missing = [t for t in wanted if t not in existing]
            wanted = [t for t in wanted if t in existing]
            if missing:  # a topic not visible yet: look again shortly
                _later(0.2, self.control.changed.set)
        current = set(self.reader.task_topics)
        if set(wanted) < current:
            # Only ended tasks to let go of (their partitions are held meanwhile: _hold_until_started). That join
            # stops every task of the group for a second, so it waits: for other tasks ending soon (one join for
            # them all); until tasks stop starting; and, while tasks this stage reads still run, until they end
            # too or `ended_topics_hold_s` has passed. It usually rides along with the gateway's next
            # reservations, made once the mesh is idle (one join for both).
            now = time.monotonic()
            self.removal_since = self.removal_since or now
            wait = max(self.removal_quiet_s - (now - self.control.last_start),
                       REMOVAL_BATCH_S - (now - self.removal_since))
            if any(t in live for t in wanted_tasks):  # a TaskEnded wakes this up again
                wait = max(wait, self.settings.ended_topics_hold_s - (now - self.removal_since))
            if wait > 0:
                due = now + wait + 0.05
                if not now < self.removal_due <= due:  # else a look already due no later comes back to this
                    self.removal_due = due
                    _later(due - now, self.control.changed.set)
                return
        self.removal_since = 0.0
        if self.reader.subscribe(wanted):
            self.subscribed_at = time.monotonic()
            log.info("reading %d task topics", len(self.reader.task_topics))
        self.reporter.reading_tasks(self._reading_tasks())

    def _hold_until_started(self) -> None:
        """A reserved task id's topics are read only once its TaskStarted is: until then nothing is fetched
        from them (an idle stack's CPU), and on the start its input and its pixels' read-ahead begin at once.
        Likewise an ended task's topics, which the worker may keep subscribed for a while (_apply_subscription).
        Worked out again only when a control event, a subscription or an assignment may have changed it."""
        with self.control.lock:  # an event counted is an event applied (ControlFollower._apply holds the lock)
            events = self.control.events
        seen = (self.reader, events, self.reader.subscription_changes, self.reader.assignments)
        if seen == self.holds_seen:
            return
        topics = set(self.reader.task_topics) | {tp[0] for tp in self.reader.owned} - {kafka.IDLE_TOPIC}
        held = {t for t in topics if self.control.started(kafka.task_of_topic(t)) is None}
        try:
            released = self.reader.hold(held)
        except KafkaException as exc:  # tried again on the next step
            log.warning("holding reserved tasks' topics: %s", exc)
            return
        self.holds_seen = seen
        if released:
            self._warm_pixels(released, on=True)

    def _warm_pixels(self, tps: set, on: bool) -> None:
        """Read ahead the raw frames behind the input partitions this replica now owns (or stop)."""
        if self.pixels is None:
            return
        count = kafka.partitions_for(pipeline.PIXELS_TOPIC, self.settings)
        for topic, partition in tps:
            task_id = kafka.task_of_topic(topic)
            if task_id:
                wanted = on and self._wants_pixels(task_id)
                if wanted and self._takes_shared():
                    # On one host the frames come from the task's ring: reading them ahead fetched a task's first
                    # 50 or so frames from the broker for nothing before the first batch found the ring.
                    self.pixels.expect_handover(task_id)
                self.pixels.warm(task_id, self.flow.raw_partitions(partition, count), wanted)
                self._ring(task_id, wanted)

    def _takes_shared(self) -> bool:
        """Whether this stage takes frames (decoded, or their JPEGs) that an earlier one on this host handed over."""
        return self.shared is not None and (self.takes_pictures or self.takes_jpegs)

    def _ring(self, task_id: str, wanted: bool) -> None:
        """A stage that takes shared pictures: make the task's ring on this host (or remove it). Its frames' JPEGs
        are read from the broker only for the frames it misses, ahead only if it keeps missing them
        (RawFrames.handed_over)."""
        if self.shared is None or not self.takes_pictures:
            return
        started = self.control.started(task_id)
        if wanted and started is not None:
            self.shared.make(task_id, started.video.width, started.video.height, started.video.frame_count)
        else:
            self.shared.remove(task_id)

    def _wants_pixels(self, task_id: str) -> bool:
        """Stage.needs_pixels for a started task, from its TaskStarted; a reserved one reads nothing yet."""
        started = self.control.started(task_id)
        if started is None:
            return False
        return self.stage.needs_pixels(TaskInfo(task_id, options=started.options,
                                                viewers=self.control.viewers.get(task_id, 0)))

    def _on_revoked(self, tps: set) -> None:
        """Partitions moved to another replica (or their task ended): their frames are its now."""
        self._warm_pixels(tps, on=False)
        self.early = [(t, m) for t, m in self.early if (m.topic(), m.partition()) not in tps]
        for task_id in self.flow.revoked(tps):
            self._drop_task_state(task_id)
        self.reporter.reading_tasks(self._reading_tasks())

    def _on_assigned(self, fresh: set) -> None:
        self._warm_pixels(fresh, on=True)
        for task_id in self.flow.assigned(fresh):
            self._drop_task_state(task_id)
        self.reporter.reading_tasks(self._reading_tasks())

    def _reading_tasks(self) -> list[str]:
        tasks = set(self.reader.reading_tasks())
        if self.pixels is not None:
            tasks |= self.pixels.reading_tasks()
        return sorted(tasks)

    def _drop_task_state(self, task_id: str) -> None:
        if self.tasks.pop(task_id, None) is not None:
            self.stage.drop_task(task_id)
        self.flow.drop_task(task_id)

    def _forget(self, task_id: str) -> None:
        """The task ended (or was stopped here): nothing of it stays on this worker."""
        self._drop_task_state(task_id)
        if self.pixels is not None:  # before the gateway may delete its raw_frames topic
            self.pixels.drop_task(task_id)
        if self.shared is not None:
            if self.takes_pictures:
                self.shared.remove(task_id)
            else:
                self.shared.forget(task_id)
        self.failed.pop(task_id, None)
        self.duplicates.pop(task_id, None)
        self.reporter.forget(task_id)

    def stop_task_here(self, task_id: str) -> bool:
        was_active = self.control.started(task_id) is not None and task_id not in self.locally_stopped
        self.locally_stopped.add(task_id)
        self.control.changed.set()
        return was_active

    # ------------------------------------------------------------------ records in

    def _task_running(self, task_id: str) -> bool:
        """The task has started and has not failed here."""
        return task_id not in self.failed and self.control.started(task_id) is not None

    def _take_in(self, msgs) -> None:
        for msg in msgs:
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume: %s", error)
                continue
            tp, offset = (msg.topic(), msg.partition()), msg.offset()
            try:
                record = pb.StageRecord.FromString(msg.value())
            except DecodeError:
                log.error("undecodable record at %s[%d]@%d: skipped", tp[0], tp[1], offset)
                self.reader.done(tp, offset)
                continue
            started, reserved = self.control.lookup(record.task_id)
            if started is None and reserved:
                self.early.append((record.task_id, msg))  # its TaskStarted is on the way: kept, not dropped
                continue
            task = self._task_for(record, started)
            if task is None:
                self.reader.done(tp, offset)  # ended, stopped, failed, or a record of an older run
                continue
            if record.HasField("end_of_stream"):
                task.total = record.end_of_stream.total_frames
                self.reporter.set_total(task.task_id, task.total)
                self.flow.end_of_stream(record, tp, offset)
                continue
            if not self.flow.add(Pooled(FrameItem(task, record.frame), tp, offset)):
                self._duplicate(task.task_id, tp, offset)

    def _take_in_early(self) -> None:
        """Records that overtook their task's TaskStarted, once the control follower has read it."""
        known, waiting = [], []
        for task_id, msg in self.early:
            (waiting if self.control.is_reserved(task_id) else known).append((task_id, msg))
        if known:
            log.info("%d records taken in once their TaskStarted was read", len(known))
            self.early = waiting
            self._take_in([m for _t, m in known])

    def _task_for(self, record: pb.StageRecord, started: pb.TaskStarted | None) -> TaskInfo | None:
        task_id = record.task_id
        if task_id in self.locally_stopped or task_id in self.failed:
            return None
        if started is None or record.epoch < started.epoch:
            return None
        task = self.tasks.get(task_id)
        if task is not None and task.epoch >= record.epoch:
            return task
        if task is not None:  # the task runs again (the broker lost its topics): nothing of the old run counts
            log.info("task %s: run %d replaces run %d", task_id, record.epoch, task.epoch)
            self._drop_task_state(task_id)
        task = TaskInfo(task_id, epoch=record.epoch, options=started.options, video=started.video,
                        live=started.live, publish_url=started.publish_url, trace=self.control.trace(task_id))
        self.tasks[task_id] = task
        log.info("task %s: first record in (index %d)", task_id, record.frame.index)
        self.flow.task_started(task)
        return task

    def _duplicate(self, task_id: str, tp, offset: int) -> None:
        self.duplicates[task_id] += 1
        DUPLICATES.labels(self.stage.name).inc()
        self.reader.done(tp, offset)

    # ------------------------------------------------------------------ one step of work

    def _step(self) -> None:
        ready = self.flow.take()
        for entry in ready:  # who watches a task's frames live, as of now
            entry.item.task.viewers = self.control.viewers.get(entry.item.task_id, 0)
        done = self._process(ready) if ready else []
        results = self.flow.end_step(self.tasks)
        # Progress and results travel in the same flush as the outputs, before the commit: a report can
        # be repeated (the union absorbs it) but never lost after its frames were committed.
        if done or self.flow.to_mark or results or self.unflushed:
            self.reporter.flush_progress()
            self.unflushed = True
        for result in results:
            self.reporter.result(result)
        if self.unflushed and not self._flush():
            return
        self.flow.commit(self.reader)

    def _process(self, ready: list[Pooled]) -> list[Pooled]:
        """Run a batch; returns the entries done, whose outputs are sent and progress noted."""
        t0 = time.perf_counter()
        if self.pixels is not None:
            ready = self._fill_pixels(ready)
        t1 = time.perf_counter()
        try:
            with tracing.batch(self.stage.name, ready):
                done = self.flow.run(ready)
        finally:
            PROCESS_SECONDS.labels(self.stage.name).observe(time.perf_counter() - t1)
        t2 = time.perf_counter()
        self.frames_processed += len(done)
        self.batches += 1
        FRAMES.labels(self.stage.name).inc(len(done))
        BATCH.labels(self.stage.name).observe(len(ready))
        for entry in done:
            task = entry.item.task
            if self.reporter.done_count.get(task.task_id, 0) == 0:
                log.info("task %s: first frame processed (index %d, batch of %d; pixels %.0f ms, work %.0f ms)",
                         task.task_id, entry.index, len(ready), (t1 - t0) * 1000, (t2 - t1) * 1000)
            self.reporter.done(task.task_id, entry.index, task.epoch, task.total)
            frame = entry.item.frame
            if self.spec.reads == pipeline.PIXELS_TOPIC:  # where later stages find this frame's pixels
                frame.source.partition, frame.source.offset = entry.tp[1], entry.offset
                if self.shared is not None and self.spec.shares_jpegs and frame.jpeg:
                    self.shared.put_jpeg(task.task_id, _picture_key(entry.item), frame.jpeg)
            frame.ClearField("jpeg")  # the pixels enter Kafka once: only raw_frames carries them
            if self.spec.writes:
                self._send(records.frame_record(task.task_id, task.options, task.epoch, frame))
            self.flow.processed(entry)
        return done

    def _fill_pixels(self, ready: list[Pooled]) -> list[Pooled]:
        """Fetch the pixels of the batch's frames that need them (Stage.needs_pixels); a task whose pixels
        cannot be read fails, the others go on."""
        try:
            self.pixels.fill(self._find_shared([e.item for e in ready if self.stage.needs_pixels(e.item.task)]))
            return ready
        except Exception:  # noqa: BLE001 - narrowed down to tasks below
            log.warning("reading pixels for a batch failed; retrying task by task", exc_info=True)
        kept = []
        for task_id, entries in by_task(ready).items():
            try:
                self.pixels.fill(self._find_shared([e.item for e in entries
                                                    if self.stage.needs_pixels(e.item.task)]))
                kept += entries
            except Exception as exc:  # noqa: BLE001
                self._fail(task_id, f"reading the pixels of frame {entries[0].index}: {describe(exc)}")
        return kept

    def _find_shared(self, items: list[FrameItem]) -> list[FrameItem]:
        """Point each frame at its picture in the task's ring, where an earlier stage on this host left it, or
        else give it the JPEG left there; the frames that are in neither, whose JPEG must be fetched."""
        if not self._takes_shared():
            return items
        missing, found, missed = [], Counter(), Counter()
        for item in items:
            frame = item.frame
            if frame.jpeg or not frame.HasField("source"):
                missing.append(item)  # nothing to look for: fill() takes or refuses it
                continue
            if self.takes_pictures and item.shared_picture is None:
                item.shared_picture = self.shared.find(item.task_id, _picture_key(item), frame.width, frame.height)
            if item.shared_picture is not None or self._take_jpeg(item):
                found[item.task_id] += 1
            else:
                missing.append(item)
                missed[item.task_id] += 1
        for task_id in (found | missed).keys():
            self.pixels.handed_over(task_id, found[task_id], missed[task_id])
        return missing

    def _find_jpegs(self, items: list[FrameItem]) -> list[FrameItem]:
        """Give each frame the JPEG an earlier stage on this host left in its task's ring; the frames whose
        JPEG is not there."""
        if self.shared is None or not self.takes_jpegs:
            return items
        return [item for item in items if not self._take_jpeg(item)]

    def _take_jpeg(self, item: FrameItem) -> bool:
        """Whether the frame has its JPEG now, taken from its task's ring if it had none."""
        frame = item.frame
        if self.takes_jpegs and not frame.jpeg and frame.HasField("source"):
            frame.jpeg = self.shared.jpeg(item.task_id, _picture_key(item)) or b""
        return bool(frame.jpeg)

    def _share(self, item: FrameItem, picture) -> None:
        """Stage.share: the frame's full decode into its task's ring on this host, if there is one."""
        if item.frame.HasField("source"):
            self.shared.put(item.task_id, _picture_key(item), picture)

    def _fail(self, task_id: str, message: str) -> None:
        """This task cannot go on: tell the gateway, drop its state, skip its records from now on."""
        if task_id in self.failed:
            return
        task = self.tasks.get(task_id)
        epoch = task.epoch if task else 0
        log.error("task %s failed in %s: %s", task_id, self.stage.name, message)
        FAILURES.labels(self.stage.name).inc()
        self.failed[task_id] = message
        self.reporter.failure(task_id, epoch, message)
        self.flow.task_failed(task_id, self.reader)
        self._drop_task_state(task_id)

    # ------------------------------------------------------------------ records out

    def _send(self, record: pb.StageRecord) -> None:
        """A record onto the stage's output topic of its task."""
        partitions = kafka.partitions_for(self.spec.writes, self.settings)
        self._produce(kafka.task_topic(self.spec.writes, record.task_id), record.SerializeToString(),
                      records.partition_of(record, partitions))

    def _emit(self, prefix: str, task: TaskInfo, data: bytes) -> None:
        """Stage.emit: a record onto another topic of the task, delivered with the step's flush."""
        self._produce(kafka.task_topic(prefix, task.task_id), data, 0)

    def _produce(self, topic: str, data: bytes, partition: int) -> None:
        """A producer that failed for good (a broker that lost its data answers an idempotent producer's next
        records with OUT_OF_ORDER_SEQUENCE_NUMBER, fatal) refuses every record: kept as a delivery error, so
        the step's flush starts over with new clients, as for an error reported at delivery (CI run 72: raised
        here, it killed a pose worker)."""
        try:
            self.sender.send(topic, data, partition)
        except (KafkaException, SystemError) as exc:
            self.sender.keep_error(exc)
        self.unflushed = True

    def _flush(self) -> bool:
        """Wait until every output is acknowledged. If that fails (the broker is away, or lost its data),
        start over from the committed offsets rather than die: nothing is committed past an undelivered
        output. Waits in short slices so a broker reset is acted on at once."""
        def lost() -> bool:
            return self.control.generation != self.generation

        try:
            remaining = self.sender.flush(FLUSH_TIMEOUT_S, give_up=lambda: lost() or bool(self.sender.errors))
        except (KafkaException, SystemError) as exc:  # a fatal producer error (e.g. the broker forgot us)
            self._reset("undelivered", f"the producer failed: {exc}")
            return False
        if remaining == 0 and not self.sender.errors:
            self.unflushed = False
            return True
        if lost():
            self._reset("broker_lost", "the broker lost its data")
        else:  # delivery errors, or the deadline passed
            self._reset("undelivered", f"{remaining} outputs undelivered, errors {self.sender.errors[:2]}")
        return False

    # ------------------------------------------------------------------ status

    def problem(self) -> str:
        """Why this worker cannot do its work now ("" when it can)."""
        if self.control.broker_problem:
            return self.control.broker_problem
        if self.reader is None:
            return "connecting to the broker"
        stage_problem = self.stage.problem() or self.stalled()
        if stage_problem:
            return stage_problem
        # Until its group first answers, the worker reads nothing (about a second on the local broker, more on a
        # large Apache Kafka group): ready only then, so that a rollout or `posemesh up` waits for it. Once said,
        # it stays said (a reset's new consumer is a rejoin, not a first join).
        self.answered = self.answered or self.assignments + self.reader.assignments > 0
        if not self.answered:
            return f"joining consumer group {self.group_name()}"
        return ""

    def stalled(self) -> str:
        """Why this worker's own loop is not working ("" when it is): what a restart could mend (liveness)."""
        stalled = time.monotonic() - self.loop_seen
        if self.running.is_set() and stalled > LOOP_STALL_S:
            return f"the work loop has not turned for {stalled:.0f} s"
        return ""

    def status(self) -> spb.GetStatusResponse:
        tasks = [spb.StageTask(task_id=t, frames_done=self.reporter.done_count.get(t, 0),
                               frames_total=info.total or 0, duplicates_dropped=self.duplicates.get(t, 0))
                 for t, info in list(self.tasks.items())]
        tasks += [spb.StageTask(task_id=t, failure=m) for t, m in list(self.failed.items())]
        problem = self.problem()
        return spb.GetStatusResponse(
            worker_id=self.worker_id, stage=self.stage.name, frames_processed=self.frames_processed,
            batches=self.batches, mean_batch_size=self.frames_processed / self.batches if self.batches else 0.0,
            tasks=tasks, uptime_s=time.time() - self.started_at, serving=not problem, problem=problem,
            resets=self.resets, assignments=self.assignments + (self.reader.assignments if self.reader else 0),
            subscription_changes=self.subscription_changes + (self.reader.subscription_changes if self.reader else 0),
            consumer_group=self.group_name() if self.reader else "",
            pixel_frames_read=self.pixels.reads if self.pixels else 0,
            pixel_bytes_read=self.pixels.bytes_read if self.pixels else 0,
            pictures_shared=self.shared.put_count + self.shared.taken_count if self.shared else 0,
            jpegs_shared=self.shared.jpegs_put + self.shared.jpegs_taken if self.shared else 0,
            reading_tasks=self.reporter.reading)


def _later(delay_s: float, action: Callable[[], None]) -> None:
    """`action` after `delay_s`, on a daemon timer: a pending one must not hold a stopping worker's exit."""
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.start()


def _picture_key(item: FrameItem) -> PictureKey:
    frame = item.frame
    return PictureKey(item.task.epoch, frame.index, frame.source.partition, frame.source.offset)


def _on_the_side(work: Callable[[], None], wait_s: float, what: str) -> None:
    """Run `work` (closing a Kafka client) on a thread of its own and wait at most `wait_s` for it: librdkafka
    can wait forever inside a close, and a worker must never hang with it. Not waited for at all at 0."""
    thread = threading.Thread(target=work, name="close-client", daemon=True)
    t0 = time.monotonic()
    thread.start()
    if wait_s <= 0:
        return
    thread.join(wait_s)
    if thread.is_alive():
        log.error("%s did not finish within %.0f s; leaving it behind (every thread's stack follows)", what, wait_s)
        faulthandler.dump_traceback(all_threads=True)
    else:
        log.info("%s took %.1f s", what, time.monotonic() - t0)
