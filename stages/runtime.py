"""The runtime every stage worker shares. A stage is one subclass of `Stage`; this module does the rest.

One frame's path through a worker:

1. The control reader learns from `posemesh.control` which tasks exist; the worker subscribes (as a
   member of the consumer group `posemesh-<stage>`) to the input topic of each live task.
2. `consume()` hands over up to `max_batch` records from any of those topics, so a batch mixes frames
   of several tasks: one Triton call serves them all.
3. Redelivered frames are dropped by index. Ordered stages (track, annotate) first put frames back in
   index order per task.
4. `Stage.process(frames)` does the work, adding to each frame in place.
5. Outputs are produced to the next topic and flushed; only then are the inputs' offsets committed
   (annotate commits when the task's files are final). A crash therefore redelivers, never loses.
6. Progress, results and heartbeats go to `posemesh.events` for the gateway.

Topic deletion hand-off: on `TaskEnded` the worker drops the task's topic from its subscription and
stops listing the task in its heartbeats; the gateway deletes the topics only once no live worker
lists the task (deleting a topic under a reader crashes the reader on the local broker).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram, start_http_server

from posemesh import kafka
from posemesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import stage_service_pb2 as spb
from posemesh.v1 import stage_service_pb2_grpc as spb_grpc
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.stages.offsets import OffsetBook

log = logging.getLogger("posemesh.stage")

HOLD_S = 0.25
FRAMES = Counter("posemesh_stage_frames_total", "Frames processed", ["stage"])
DUPLICATES = Counter("posemesh_stage_duplicates_total", "Redelivered frames dropped by index", ["stage"])
BATCH = Histogram("posemesh_stage_batch_frames", "Frames per processed batch", ["stage"],
                  buckets=(1, 2, 4, 8, 16, 32, 64))
PROCESS_SECONDS = Histogram("posemesh_stage_process_seconds", "Stage.process time per batch", ["stage"])


@dataclass
class FrameItem:
    """One frame inside a worker, with the task context a stage needs."""

    task_id: str
    options: tpb.TaskOptions
    frame: pb.Frame


@dataclass
class TaskContext:
    """What a worker knows of one task: from the control topic and from the records themselves."""

    task_id: str
    video: tpb.VideoInfo = field(default_factory=tpb.VideoInfo)
    options: tpb.TaskOptions = field(default_factory=tpb.TaskOptions)
    total: int | None = None  # from end-of-stream
    fps: float = 0.0
    next_index: int = 0  # ordered stages: the next index to process
    buffer: dict = field(default_factory=dict)  # index -> (frame item, tp, offset): consumed, not processed
    seen: set = field(default_factory=set)  # unordered stages: indices already consumed
    low: int = 0  # unordered stages: the lowest index not consumed yet
    pool_since: float = 0.0  # when the oldest frame now in `buffer` arrived
    held: list = field(default_factory=list)  # offsets whose output exists only when the task finishes
    eos_offset: tuple | None = None
    frames_done: int = 0
    duplicates: int = 0
    finished: bool = False


class Stage(ABC):
    """Subclass this to add a stage: say what you read and write, and implement `process`."""

    name: str = ""
    input_prefix: str = ""
    output_prefix: str | None = None
    # Process a task's frames in index order (one worker owns the task: its topic has one partition).
    ordered: bool = False
    # Offsets are committed when finish_task returns, not per frame (the output is a whole file).
    commit_at_task_end: bool = False
    max_batch: int = 16

    def batch_frames(self) -> int:
        """Frames per batch: POSEMESH_<STAGE>_MAX_BATCH or the class default. Bigger batches feed the
        model better (GPUs); smaller ones reach the first result sooner (CPUs)."""
        return int(os.environ.get(f"POSEMESH_{self.name.upper()}_MAX_BATCH", self.max_batch))

    def setup(self, settings: Settings) -> None:
        """Connect to Triton and the like; called once before the first frame."""

    @abstractmethod
    def process(self, items: list[FrameItem], tasks: dict[str, TaskContext]) -> None:
        """Do this stage's work on a batch of frames (any tasks), adding results to each frame in place."""

    def finish_task(self, task: TaskContext) -> pb.TaskResult | None:
        """Ordered stages: every frame of the task has been processed. Return a result to report."""
        return None

    def drop_task(self, task_id: str) -> None:
        """Forget a task (cancelled, moved to another worker): release its resources, delete partial output."""

    def close(self) -> None:
        """Release resources at shutdown."""


class StageWorker:
    def __init__(self, stage: Stage, settings: Settings, control_port: int = 0, metrics_port: int = 0,
                 worker_id: str | None = None):
        self.stage, self.settings = stage, settings
        self.worker_id = worker_id or f"{stage.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.control_port, self.metrics_port = control_port, metrics_port
        self.running = threading.Event()
        self.lock = threading.Lock()
        self.tasks: dict[str, TaskContext] = {}
        self.live: dict[str, pb.TaskStarted] = {}  # from the control topic: tasks that have not ended
        self.ended: dict[str, int] = {}  # task -> terminal TaskState
        self.locally_stopped: set[str] = set()
        self.subscribed: list[str] = []
        self.owned: set[tuple[str, int]] = set()
        self.positions: dict[tuple, int] = {}
        self.previously_owned: set = set()
        self.book = OffsetBook()
        self.frames_processed = 0
        self.batches = 0
        self.started_at = time.time()
        self._control_changed = threading.Event()
        self._reported: dict[str, int] = {}
        self._delivery_errors: list = []
        self._partition_cache: dict[str, int] = {}
        self.paused: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ set-up and shutdown

    def run(self) -> None:
        kafka.ensure_shared_topics(self.settings)
        self.stage.setup(self.settings)
        group = f"{self.settings.group_prefix}-{self.stage.name}"
        self.consumer = Consumer(kafka.consumer_config(self.settings, group, self.worker_id))
        self.producer = Producer({**kafka.producer_config(self.settings, self.worker_id),
                                  "error_cb": lambda err: log.warning("producer: %s", err)})
        self.running.set()
        control_thread = threading.Thread(target=self._read_control, name="control", daemon=True)
        control_thread.start()
        server = self._start_control_server()
        if self.metrics_port:
            start_http_server(self.metrics_port, addr=os.environ.get("POSEMESH_CONTROL_HOST", "127.0.0.1"))
        log.info("%s ready (control port %s)", self.worker_id, self.control_port)
        last_report = 0.0
        batch = self.stage.batch_frames()
        try:
            while self.running.is_set():
                self._apply_subscription()
                if not self.subscribed:
                    time.sleep(0.05)
                    msgs = []
                else:
                    # Keep a pool of up to 4 batches to choose from; wait for more only when short of one.
                    pooled = self.pooled()
                    full = pooled >= batch and self.ready_to_run()
                    msgs = self.consumer.consume(num_messages=max(4 * batch - pooled, 1),
                                                 timeout=0 if full else 0.02 if pooled else 0.05)
                if msgs or self.pooled():
                    self._handle(msgs, batch)
                    self._flow_control(batch)
                if time.monotonic() - last_report > 0.5:
                    self._report()
                    last_report = time.monotonic()
        finally:
            self.running.clear()
            self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            for task_id in list(self.tasks):
                self.stage.drop_task(task_id)
            try:
                self.consumer.close()  # leaves the group: partitions move to the other workers at once
            finally:
                self.subscribed = []
                self._heartbeat()
                self.producer.flush(5)
                self.stage.close()
                server.stop(1)

    def stop(self, *_args) -> None:
        self.running.clear()

    def _start_control_server(self) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        spb_grpc.add_StageServiceServicer_to_server(StageServiceServicer(self), server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = os.environ.get("POSEMESH_CONTROL_HOST", "127.0.0.1")  # 0.0.0.0 under Kubernetes probes
        self.control_port = server.add_insecure_port(f"{host}:{self.control_port}")
        server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("posemesh.v1.StageService", health_pb2.HealthCheckResponse.SERVING)
        return server

    # ------------------------------------------------------------------ control: which tasks to read

    def _read_control(self) -> None:
        """Replay posemesh.control from the start, then follow it: the set of live tasks."""
        consumer = Consumer({**kafka.consumer_config(self.settings, f"{self.worker_id}-control", self.worker_id + "-c"),
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition(kafka.CONTROL_TOPIC, 0, OFFSET_BEGINNING)])
        try:
            while self.running.is_set():
                msg = consumer.poll(0.1)
                if msg is None or msg.error():
                    continue
                event = pb.ControlEvent.FromString(msg.value())
                with self.lock:
                    if event.HasField("started") and event.task_id not in self.ended:
                        self.live[event.task_id] = event.started
                    elif event.HasField("ended"):
                        self.live.pop(event.task_id, None)
                        self.ended[event.task_id] = event.ended.state
                self._control_changed.set()
        finally:
            consumer.close()

    def _apply_subscription(self) -> None:
        if not self._control_changed.is_set():
            return
        self._control_changed.clear()
        with self.lock:
            wanted_tasks = [t for t in self.live if t not in self.locally_stopped]
            gone = [t for t in self.tasks if t not in self.live or t in self.locally_stopped]
        existing = set(self.consumer.list_topics(timeout=10).topics) if wanted_tasks else set()
        wanted = sorted(kafka.task_topic(self.stage.input_prefix, t) for t in wanted_tasks)
        wanted = [t for t in wanted if t in existing]
        for task_id in gone:
            self._forget_task(task_id)
        if wanted == self.subscribed:
            return
        if wanted:
            self.consumer.subscribe(wanted, on_assign=self._on_assign, on_revoke=self._on_revoke)
        else:
            self.consumer.unsubscribe()
            self.owned = set()
            self.paused = set()
        self.subscribed = wanted
        log.info("reading %d task topics", len(wanted))
        self._heartbeat()
        if len(wanted) < len(wanted_tasks):  # a topic not visible yet: look again shortly
            threading.Timer(0.2, self._control_changed.set).start()

    def _on_revoke(self, consumer, partitions) -> None:
        self.previously_owned = {(p.topic, p.partition) for p in partitions}

    def _on_assign(self, consumer, partitions) -> None:
        now = {(p.topic, p.partition) for p in partitions}
        # A partition we keep through the rebalance resumes where we were, not at the last commit: the
        # frames in between are in our buffers or open files. Partitions that moved away are forgotten.
        for p in partitions:
            tp = (p.topic, p.partition)
            if tp in self.previously_owned and tp in self.positions:
                p.offset = self.positions[tp]
        for tp in self.previously_owned - now:
            self.book.forget(tp)
            self.positions.pop(tp, None)
            task_id = kafka.task_of_topic(tp[0])
            if self.stage.ordered and task_id in self.tasks:
                self._forget_task(task_id)
        self.owned = now
        consumer.assign(partitions)
        # librdkafka keeps a partition's pause flag through an eager revoke and re-assign; our flow
        # control starts afresh with every assignment, so every assigned partition starts resumed.
        if partitions:
            consumer.resume(partitions)
        self.paused = set()

    def _forget_task(self, task_id: str) -> None:
        if self.tasks.pop(task_id, None) is not None:
            self.stage.drop_task(task_id)
        self._reported.pop(task_id, None)

    # ------------------------------------------------------------------ the data path

    def _task(self, task_id: str, options: tpb.TaskOptions) -> TaskContext:
        task = self.tasks.get(task_id)
        if task is None:
            with self.lock:
                started = self.live.get(task_id)
            task = TaskContext(task_id, options=options)
            if started is not None:
                task.video.CopyFrom(started.video)
                task.fps = started.video.fps
            self.tasks[task_id] = task
        return task

    def _select(self, batch: int) -> list[tuple[FrameItem, tuple, int]]:
        """The frames to process now. Ordered stages: every frame that continues its task's sequence.
        Others: up to `batch` frames from the pool, the lowest indices of each task first, taking from
        the tasks in turn. Kafka interleaves partitions (and tasks) arbitrarily; this puts the frames a
        user waits for next (and every task) first."""
        ready = []
        if self.stage.ordered:
            for task in self.tasks.values():
                while task.next_index in task.buffer:
                    ready.append(task.buffer.pop(task.next_index))
                    task.next_index += 1
            return ready
        now = time.monotonic()
        waiting = [t for t in self.tasks.values() if self._runnable(t, now)]
        # A task that has produced nothing yet sends its first frame alone: its first result comes one
        # model call after the frame, not one batch of crops after it.
        starting = [t for t in waiting if t.frames_done == 0 and min(t.buffer) == 0]
        if starting:
            return [t.buffer.pop(0) for t in starting]
        while waiting and len(ready) < batch:
            for task in list(waiting):
                ready.append(task.buffer.pop(min(task.buffer)))
                if not task.buffer:
                    waiting.remove(task)
                if len(ready) == batch:
                    break
        return ready

    @staticmethod
    def _runnable(task: TaskContext, now: float) -> bool:
        """Unordered stages: the task has pooled frames that may go now. While a lower frame of the task
        has not arrived (another partition is behind), its frames wait up to HOLD_S, so the frame a user
        waits for next is not overtaken."""
        return bool(task.buffer) and (min(task.buffer) < task.low or now - task.pool_since >= HOLD_S)

    def ready_to_run(self) -> bool:
        now = time.monotonic()
        return not self.stage.ordered and any(self._runnable(t, now) for t in self.tasks.values())

    def _flow_control(self, batch: int) -> None:
        """Fair share between partitions (and so tasks), whatever order the broker fills fetches in: the
        local broker fills each fetch from one partition at a time, and a partition late in its order
        starved for 10+ s under four uploads. A partition with frames waiting in the pool stops being
        fetched (pause) until they are processed (resume). Pausing keeps the position; nothing is skipped."""
        if self.stage.ordered:
            return
        waiting: dict[tuple, int] = defaultdict(int)
        for task in self.tasks.values():
            for _item, tp, _offset in task.buffer.values():
                waiting[tp] += 1
        cap = max(2, batch // 4)
        pause = [tp for tp in self.owned if waiting.get(tp, 0) >= cap and tp not in self.paused]
        resume = [tp for tp in self.paused if waiting.get(tp, 0) == 0 and tp in self.owned]
        if pause:
            self.consumer.pause([TopicPartition(t, p) for t, p in pause])
            self.paused.update(pause)
        if resume:
            self.consumer.resume([TopicPartition(t, p) for t, p in resume])
            self.paused.difference_update(resume)

    def pooled(self) -> int:
        return 0 if self.stage.ordered else sum(len(t.buffer) for t in self.tasks.values())

    def _handle(self, msgs, batch: int) -> None:
        forward_eos: list[tuple[pb.StageRecord, tuple, int]] = []
        for msg in msgs:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consume: %s", msg.error())
                continue
            tp, offset = (msg.topic(), msg.partition()), msg.offset()
            self.positions[tp] = offset + 1
            self.book.add(tp, offset)
            record = pb.StageRecord.FromString(msg.value())
            with self.lock:
                reading = record.task_id in self.live and record.task_id not in self.locally_stopped
            if not reading:
                self.book.done(tp, offset)  # task ended or stopped: nothing to produce
                continue
            task = self._task(record.task_id, record.options)
            if record.HasField("end_of_stream"):
                task.total = record.end_of_stream.total_frames
                task.fps = task.fps or record.end_of_stream.fps
                if self.stage.ordered:
                    task.eos_offset = (tp, offset)
                else:
                    forward_eos.append((record, tp, offset))
                continue
            item = FrameItem(record.task_id, record.options, record.frame)
            index = record.frame.index
            if self.stage.ordered:
                if index < task.next_index or index in task.buffer or task.finished:
                    self._duplicate(task, tp, offset)
                else:
                    task.buffer[index] = (item, tp, offset)
            elif index in task.seen:
                self._duplicate(task, tp, offset)
            else:
                task.seen.add(index)
                while task.low in task.seen:
                    task.low += 1
                if not task.buffer:
                    task.pool_since = time.monotonic()
                task.buffer[index] = (item, tp, offset)
        ready = self._select(batch)
        if ready and os.environ.get("POSEMESH_DEBUG_BATCHES") and self.batches < 12:
            log.info("batch %d: %s (pool %d)", self.batches, [i.frame.index for i, _t, _o in ready], self.pooled())
        first_frames = self._process(ready) if ready else []
        for record, tp, offset in forward_eos:
            self._produce(record)
        finished = [t for t in self.tasks.values() if self.stage.ordered and not t.finished
                    and t.total is not None and t.next_index >= t.total]
        results = []
        for task in finished:
            result = self.stage.finish_task(task)
            task.finished = True
            if self.stage.output_prefix:
                self._produce(pb.StageRecord(task_id=task.task_id, options=task.options,
                                             end_of_stream=pb.EndOfStream(total_frames=task.total, fps=task.fps)))
            if result is not None:
                results.append(result)
        self._flush()
        # The outputs exist now: mark their inputs done and commit.
        for _item, tp, offset in ready:
            if not self.stage.commit_at_task_end:
                self.book.done(tp, offset)
        for _record, tp, offset in forward_eos:
            self.book.done(tp, offset)
        for task in finished:
            for tp, offset in task.held + ([task.eos_offset] if task.eos_offset else []):
                self.book.done(tp, offset)
            task.held.clear()
        # A task's first frame and its final count are reported at once (time to first result is
        # what a user waits on); the rest every 0.5 s.
        for task in first_frames + finished:
            self._report_progress(task)
        for result in results:
            self._event(result=result)
        if results:
            self.producer.flush(10)
        self._commit()

    def _duplicate(self, task: TaskContext, tp, offset) -> None:
        task.duplicates += 1
        DUPLICATES.labels(self.stage.name).inc()
        if self.stage.commit_at_task_end and not task.finished:
            task.held.append((tp, offset))
        else:
            self.book.done(tp, offset)

    def _process(self, ready) -> list[TaskContext]:
        """Run the stage on a batch and produce its outputs; returns the tasks whose first frame this was."""
        items = [item for item, _tp, _off in ready]
        t0 = time.perf_counter()
        self.stage.process(items, self.tasks)
        PROCESS_SECONDS.labels(self.stage.name).observe(time.perf_counter() - t0)
        BATCH.labels(self.stage.name).observe(len(items))
        FRAMES.labels(self.stage.name).inc(len(items))
        self.frames_processed += len(items)
        self.batches += 1
        first_frames = []
        for item, tp, offset in ready:
            task = self.tasks[item.task_id]
            task.frames_done += 1
            if task.frames_done == 1:
                first_frames.append(task)
                log.info("task %s: first frame processed (index %d, batch of %d)", task.task_id,
                         item.frame.index, len(items))
            if self.stage.commit_at_task_end:
                task.held.append((tp, offset))
            if self.stage.output_prefix:
                self._produce(pb.StageRecord(task_id=item.task_id, options=item.options, frame=item.frame))
        return first_frames

    def _produce(self, record: pb.StageRecord) -> None:
        topic = kafka.task_topic(self.stage.output_prefix, record.task_id)
        partitions = self._partitions(topic)
        partition = record.frame.index % partitions if record.HasField("frame") else 0
        while True:
            try:
                self.producer.produce(topic, record.SerializeToString(), partition=partition,
                                      on_delivery=self._on_delivery)
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.05)

    def _partitions(self, topic: str) -> int:
        n = self._partition_cache.get(topic)
        if n is None:
            meta = self.producer.list_topics(topic, timeout=10).topics.get(topic)
            n = len(meta.partitions) if meta and meta.partitions else 1
            self._partition_cache[topic] = n
        return n

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._delivery_errors.append(err)

    def _flush(self) -> None:
        remaining = self.producer.flush(30)
        if remaining or self._delivery_errors:
            # Inputs stay uncommitted; crashing lets the supervisor restart us and Kafka redeliver them.
            raise RuntimeError(f"produce failed ({remaining} undelivered): {self._delivery_errors[:3]}")

    def _commit(self) -> None:
        offsets = [tp for tp in self.book.committable() if (tp.topic, tp.partition) in self.owned]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance took the partition: its new owner redoes the rest
            log.warning("commit failed: %s", exc)

    # ------------------------------------------------------------------ reporting

    def _event(self, progress: pb.TaskProgress | None = None, result: pb.TaskResult | None = None,
               heartbeat: pb.Heartbeat | None = None) -> None:
        event = pb.WorkerEvent(worker_id=self.worker_id, stage=self.stage.name)
        if progress is not None:
            event.progress.CopyFrom(progress)
        elif result is not None:
            event.result.CopyFrom(result)
        elif heartbeat is not None:
            event.heartbeat.CopyFrom(heartbeat)
        self.producer.produce(kafka.EVENTS_TOPIC, event.SerializeToString())

    def reading_tasks(self) -> list[str]:
        topics = set(self.subscribed) | {tp[0] for tp in self.owned}
        return sorted({kafka.task_of_topic(t) for t in topics} - {None})

    def _heartbeat(self) -> None:
        self._event(heartbeat=pb.Heartbeat(reading_tasks=self.reading_tasks()))
        self.producer.poll(0)

    def _report_progress(self, task: TaskContext) -> None:
        if self._reported.get(task.task_id) != task.frames_done:
            self._reported[task.task_id] = task.frames_done
            self._event(progress=pb.TaskProgress(task_id=task.task_id, frames_done=task.frames_done,
                                                 frames_total=task.total or 0))

    def _report(self) -> None:
        for task in list(self.tasks.values()):
            self._report_progress(task)
        self._heartbeat()
        self.producer.poll(0)
        # Tasks that ended everywhere: forget them here too (keeps memory flat on a long-running worker).
        with self.lock:
            for task_id in [t for t in self.tasks if t in self.ended]:
                self._forget_task(task_id)

    def status(self) -> spb.GetStatusResponse:
        tasks = [spb.StageTask(task_id=t.task_id, frames_done=t.frames_done, frames_total=t.total or 0,
                               duplicates_dropped=t.duplicates) for t in list(self.tasks.values())]
        return spb.GetStatusResponse(
            worker_id=self.worker_id, stage=self.stage.name, frames_processed=self.frames_processed,
            batches=self.batches, mean_batch_size=self.frames_processed / self.batches if self.batches else 0.0,
            tasks=tasks, uptime_s=time.time() - self.started_at)


class StageServiceServicer(spb_grpc.StageServiceServicer):
    """The same control API on every worker: status, tasks, and stopping one task here."""

    def __init__(self, worker: StageWorker):
        self.worker = worker

    def GetStatus(self, request, context):
        return self.worker.status()

    def ListStageTasks(self, request, context):
        return spb.ListStageTasksResponse(tasks=self.worker.status().tasks)

    def StopTask(self, request, context):
        if not kafka.TASK_ID_RE.match(request.task_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a task id: {request.task_id!r}")
        with self.worker.lock:
            was_active = request.task_id in self.worker.live and request.task_id not in self.worker.locally_stopped
            self.worker.locally_stopped.add(request.task_id)
        self.worker._control_changed.set()
        return spb.StopTaskResponse(was_active=was_active)


def serve(stage: Stage, settings: Settings | None = None, control_port: int = 0, metrics_port: int = 0) -> None:
    """Run a worker until SIGTERM/SIGINT."""
    worker = StageWorker(stage, settings or Settings(), control_port, metrics_port)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
