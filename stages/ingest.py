"""The ingest stage: uploads decoded into raw_frames_<task> by any number of replicas (POSEMESH_INGEST=stage).

The gateway probes an upload (it still refuses bad input itself, at once), stores it in the blob store,
announces the task and writes an IngestJob to posemesh.ingest, keyed by task. The replicas are one consumer
group over that topic: the replica holding a job's partition decodes the upload with mesh/frames.py's frame
producer (JPEG frames, then the end of stream) and tells the gateway on posemesh.events what it did: progress
(the "decode" step), what decoded (SourceRead) and failures. A replica decodes up to POSEMESH_INGEST_MAX_JOBS
uploads at once; while it has that many, its partitions are paused (the others' replicas go on).

Exactly once, as in the stages: a job's offset is committed only once its end of stream is on the broker
(what is committed is the lowest offset of the partition whose job is not finished). A replica that dies
leaves its jobs uncommitted; the group gives its partitions to another, which reads the jobs again and reads
back how far each task's raw_frames_<task> got (stream_so_far): a closed stream is done; otherwise the upload
is decoded again and sending goes on after the frames that are out, every one of them. The few frames sent
twice (the dead replica's in flight) have the same index and content: the stages drop repeats by index.

Back-pressure, as the gateway's producer has it: at most POSEMESH_MAX_FRAMES_AHEAD frames ahead of the detect
stage, read here from detect's committed offsets on raw_frames_<task> (a replica has no task store).

A job stops as soon as its task ends (TaskEnded on posemesh.control) and is skipped when its run is older than
the task's (the broker lost its data and the task is run again under a new epoch).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, start_http_server

from posemesh.mesh import kafka, media, tracing
from posemesh.mesh.frames import Decoded, FrameProducer, stream_so_far
from posemesh.mesh.pipeline import INGEST
from posemesh.mesh.settings import Settings
from posemesh.stages.control import ControlFollower
from posemesh.stages.control_api import ControlApi
from posemesh.stages.reporting import Reporter
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import stage_service_pb2 as spb

log = logging.getLogger("posemesh.ingest")

FRAMES = Counter("posemesh_ingest_frames_total", "Frames of uploads decoded (sent, or found out already)")
JOBS = Counter("posemesh_ingest_jobs_total", "Jobs finished here", ["outcome"])  # decoded, failed, skipped, stopped

POLL_S = 0.2
# How often a decoding ahead of the detect stage asks the broker how far detect got.
CONSUMED_EVERY_S = 0.25
# How long a replica waits for posemesh.control's replay before it takes jobs: a job of a task that ended
# meanwhile must be recognised as such, not decoded again.
CATCH_UP_S = 30.0
EVENT_WAIT_S = kafka.MESSAGE_TIMEOUT_S + kafka.DELIVERY_MARGIN_S
# What fails around a decoding (the read-back, the upload's fetch) is tried this often, RETRY_S apart and more.
ATTEMPTS, RETRY_S = 3, 2.0


class DetectConsumed:
    """How many of a task's frames the detect stage has taken: the sum of its group's committed offsets on
    raw_frames_<task>, asked at most every CONSUMED_EVERY_S (a repeat sent after a take-over counts too, so
    this can run a few frames ahead of the truth: the bound loosens by that much, never tightens)."""

    def __init__(self, settings: Settings, group: str, task_id: str, partitions: int):
        self.consumer = Consumer({**kafka.consumer_config(settings, group, f"ingest-lag-{task_id[:12]}")})
        self.partitions = [TopicPartition(kafka.task_topic(kafka.RAW_FRAMES, task_id), p) for p in range(partitions)]
        self.value, self.asked = 0, 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self.asked >= CONSUMED_EVERY_S:
            self.asked = now
            try:
                committed = self.consumer.committed(self.partitions, timeout=5)
                self.value = sum(max(tp.offset, 0) for tp in committed)
            except KafkaException as exc:  # the broker is busy or away: keep the last answer
                log.debug("detect's offsets not read: %s", exc)
        return self.value

    def close(self) -> None:
        self.consumer.close()


@dataclass
class Run:
    """One run (task and epoch) being decoded here. Its jobs are committed once it is `finished`."""

    job: pb.IngestJob
    producer: FrameProducer | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    failure: str = ""
    decoded: Decoded | None = None

    @property
    def task_id(self) -> str:
        return self.job.task.task_id

    def cancel(self) -> None:
        self.cancelled.set()
        if self.producer is not None:
            self.producer.cancelled.set()


class IngestWorker:
    def __init__(self, settings: Settings, control_port: int = 0, metrics_port: int = 0):
        self.metrics_port = metrics_port
        self.settings = settings
        self.worker_id = f"ingest-{socket.gethostname()}-{os.getpid()}"
        self.control = ControlFollower(settings, self.worker_id)
        self.reporter = Reporter(self.worker_id, INGEST)
        self.blobs = settings.blob_store()
        self.lock = threading.Lock()
        self.runs: dict[tuple[str, int], Run] = {}  # (task, epoch) -> its run here
        self.jobs: dict[int, dict[int, Run]] = {}  # partition -> offset -> the run that job is part of
        self.assigned: set[int] = set()
        self.paused = False
        self.halt = threading.Event()
        self.started_at = time.time()
        self.frames_decoded = 0
        self.api = ControlApi(self, control_port)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        self.control.start()
        self.api.start()
        if self.metrics_port:
            start_http_server(self.metrics_port, addr=self.settings.control_host)
        self.reporter.start()
        if not self.control.caught_up.wait(CATCH_UP_S):
            log.warning("posemesh.control not replayed within %.0f s: taking jobs anyway", CATCH_UP_S)
        try:
            while not self.halt.is_set():
                try:
                    self._session(self.control.generation)
                except Exception:
                    log.exception("ingest session ended")
                    self.halt.wait(1.0)
        finally:
            self.reporter.stop()
            self.api.stop()
            self.control.stop()

    def group_name(self) -> str:
        """One group per life of the broker's data, as the stages' (stages/worker.py)."""
        return f"{self.settings.group_prefix}-{INGEST}-{(self.control.incarnation or '')[:8]}"

    def _session(self, generation: int) -> None:
        """Take jobs until the broker's data is lost (a new generation) or the worker stops."""
        kafka.ensure_shared_topics(self.settings)
        # Jobs come seconds apart at most: a held fetch of FOLLOWER_FETCH_WAIT_MS costs an idle broker less, and
        # a job at most that much delay.
        consumer = Consumer(kafka.follower_config(self.settings, self.group_name(), self.worker_id))
        events = kafka.Sender(_producer(self.settings, self.worker_id))
        self.reporter.attach(events.producer)
        consumer.subscribe([kafka.INGEST_TOPIC], on_assign=self._assigned, on_revoke=self._revoked)
        self.paused = False
        try:
            while not self.halt.is_set() and self.control.generation == generation:
                full = self._running() >= self.settings.ingest_max_jobs
                if full != self.paused and self.assigned:
                    parts = [TopicPartition(kafka.INGEST_TOPIC, p) for p in self.assigned]
                    (consumer.pause if full else consumer.resume)(parts)
                    self.paused = full
                msg = consumer.poll(POLL_S)
                if msg is not None:
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consume: %s", msg.error())
                    else:
                        self._take(msg.partition(), msg.offset(), msg.value())
                self._stop_ended()
                self._commit(consumer)
                self.reporter.reading_tasks(sorted({r.task_id for r in self.runs.values() if not r.finished.is_set()}))
                events.producer.poll(0)
        finally:
            for run in list(self.runs.values()):
                run.cancel()
            self.reporter.attach(None)
            events.flush(5)
            consumer.close()
            with self.lock:
                self.runs.clear()
                self.jobs.clear()
                self.assigned.clear()

    def _assigned(self, _consumer, partitions) -> None:
        with self.lock:
            self.assigned = {tp.partition for tp in partitions}
            self.paused = False  # a new assignment is not paused
            gone = [p for p in self.jobs if p not in self.assigned]
            for p in gone:  # another replica does these jobs now
                for run in self.jobs.pop(p).values():
                    if not any(run in jobs.values() for jobs in self.jobs.values()):
                        run.cancel()
                        self.runs.pop((run.task_id, run.job.epoch), None)
        log.info("ingest partitions %s", sorted(self.assigned))

    def _revoked(self, _consumer, _partitions) -> None:
        # The eager protocol takes every partition away before it hands them out again: runs go on until the
        # assignment says who has their partitions now (it is most often this worker again).
        with self.lock:
            self.assigned = set()

    def _running(self) -> int:
        return sum(1 for r in self.runs.values() if not r.finished.is_set())

    def _take(self, partition: int, offset: int, value: bytes) -> None:
        try:
            job = pb.IngestJob.FromString(value)
        except Exception:  # noqa: BLE001 - not a job: nothing to do, commit past it
            log.warning("posemesh.ingest[%d] offset %d is not an IngestJob: skipped", partition, offset)
            job = None
        key = (job.task.task_id, job.epoch) if job else None
        with self.lock:
            run = self.runs.get(key) if key else None
            if run is None:
                run = Run(job or pb.IngestJob())
                if job is None or self._nothing_to_do(job):
                    run.finished.set()
                    JOBS.labels("skipped").inc()
                else:
                    self.runs[key] = run
                    threading.Thread(target=self._decode, args=(run,), name=f"ingest-{key[0][:12]}",
                                     daemon=True).start()
            self.jobs.setdefault(partition, {})[offset] = run

    def _nothing_to_do(self, job: pb.IngestJob) -> bool:
        """The job's task ended, or a newer run of it replaced this one."""
        started, _reserved = self.control.lookup(job.task.task_id)
        _live, ended = self.control.snapshot()
        return job.task.task_id in ended or (started is not None and started.epoch > job.epoch)

    def _stop_ended(self) -> None:
        for run in list(self.runs.values()):
            if not run.cancelled.is_set() and not run.finished.is_set() and self._nothing_to_do(run.job):
                log.info("task %s ended or runs again: this run's decoding stops", run.task_id)
                run.cancel()

    def _commit(self, consumer: Consumer) -> None:
        """Per partition, past every job whose run is finished, up to the first that is not."""
        with self.lock:
            offsets = []
            for partition, jobs in self.jobs.items():
                if partition not in self.assigned:
                    continue
                done = []
                for offset in sorted(jobs):
                    if not jobs[offset].finished.is_set():
                        break
                    done.append(offset)
                if done:
                    offsets.append(TopicPartition(kafka.INGEST_TOPIC, partition, done[-1] + 1))
                    for offset in done:
                        run = jobs.pop(offset)
                        if run.finished.is_set() and not any(run in j.values() for j in self.jobs.values()):
                            self.runs.pop((run.task_id, run.job.epoch), None)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # a rebalance took the partition: its new holder does the job again
                log.warning("ingest commit failed: %s", exc)

    # ------------------------------------------------------------------ one upload

    def _decode(self, run: Run) -> None:
        """Decode the run's upload, going on after the frames that are out. What fails around the decoding
        (reading back where the frames got, fetching the upload) is tried again, ATTEMPTS times; the decoding
        itself reports its own failures (a broken upload fails the task, saying where)."""
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    self._decode_once(run)
                    return
                except Exception as exc:  # noqa: BLE001 - the broker or the blob store failed
                    if run.cancelled.is_set():
                        return
                    log.warning("task %s: decoding failed (attempt %d of %d): %s", run.task_id, attempt, ATTEMPTS,
                                exc)
                    if attempt == ATTEMPTS:
                        self._fail(run, f"the upload could not be decoded ({exc})")
                    elif run.cancelled.wait(RETRY_S * attempt):
                        return
        finally:
            run.finished.set()  # done, failed, or stopped because its task ended: its job is committed
            JOBS.labels("failed" if run.failure else "stopped" if run.cancelled.is_set() else "decoded").inc()

    def _decode_once(self, run: Run) -> None:
        job, task_id, settings = run.job, run.task_id, self.settings
        partitions = kafka.partitions_for(kafka.RAW_FRAMES, settings)
        so_far = stream_so_far(kafka.consumer_config(settings, f"{self.worker_id}-resume", self.worker_id),
                               task_id, job.epoch, partitions)
        if so_far.closed:
            log.info("task %s: its frames are out already (%d)", task_id, so_far.frames)
            return
        if so_far.frames:
            log.info("task %s: going on after the %d frames an earlier replica sent", task_id, so_far.frames)
        consumed = DetectConsumed(settings, f"{settings.group_prefix}-detect-{(self.control.incarnation or '')[:8]}",
                                  task_id, partitions)
        try:
            with self.blobs.local_copy(job.upload_key) as path:
                if path is None:
                    self._fail(run, "the upload is not in the blob store any more; please upload again")
                    return
                producer = FrameProducer(
                    job.task, path, kafka.producer_config(settings, self.worker_id), partitions,
                    settings.jpeg_quality, epoch=job.epoch,
                    on_progress=lambda first, last: self._progress(run, first, last),
                    on_decoded=lambda decoded: self._read(run, decoded, produced=False),
                    on_done=lambda count: self._read(run, None, produced=True, count=count),
                    on_error=lambda message: self._fail(run, message),
                    frames_consumed=consumed, max_ahead=settings.max_frames_ahead,
                    limits=media.Limits.from_settings(settings), trace=self.control.trace(task_id),
                    start_at=so_far.frames, client="ingest")
                run.producer = producer
                if run.cancelled.is_set():
                    return
                producer.run()  # on this thread: the producer's delivery callbacks are served here
        finally:
            consumed.close()

    def _progress(self, run: Run, first: int, last: int) -> None:
        self.frames_decoded += last - first + 1
        FRAMES.inc(last - first + 1)
        for index in range(first, last + 1):
            self.reporter.done(run.task_id, index, run.job.epoch, None)

    def _read(self, run: Run, decoded: Decoded | None, produced: bool, count: int = 0) -> None:
        """Tell the gateway what decoded (before the end of stream), then that the frames are all out."""
        if decoded is not None:
            run.decoded = decoded
        decoded = run.decoded or Decoded(count, None)
        read = pb.SourceRead(task_id=run.task_id, epoch=run.job.epoch, frame_count=decoded.frame_count,
                             warning=decoded.warning, produced=produced)
        if decoded.duration_s is not None:
            read.duration_s = decoded.duration_s
        self._event(run, pb.WorkerEvent(worker_id=self.worker_id, stage=INGEST, source_read=read))

    def _fail(self, run: Run, message: str) -> None:
        run.failure = message
        self._event(run, pb.WorkerEvent(worker_id=self.worker_id, stage=INGEST, failure=pb.TaskFailure(
            task_id=run.task_id, error_message=message, epoch=run.job.epoch)))

    def _event(self, run: Run, event: pb.WorkerEvent) -> None:
        """On the run's own producer (its callbacks are served on this thread), waited for: what decoded
        reaches the gateway before the end of stream can reach any stage. One that cannot be delivered while
        librdkafka keeps it is lost: the broker is gone that long, and the gateway's stall limit ends the task."""
        producer = run.producer
        if producer is None:  # failed before decoding: a producer of its own
            sender = kafka.Sender(_producer(self.settings, f"{self.worker_id}-failure"))
        else:
            sender = producer.sender
        sender.send(kafka.EVENTS_TOPIC, event.SerializeToString())
        if not sender.delivered(EVENT_WAIT_S, give_up=run.cancelled.is_set) and not run.cancelled.is_set():
            log.error("task %s: an event for the gateway was not delivered (%s)", run.task_id,
                      sender.errors[0] if sender.errors else "timed out")

    # ------------------------------------------------------------------ the control API

    def problem(self) -> str:
        return self.control.broker_problem

    def status(self) -> spb.GetStatusResponse:
        problem = self.problem()
        tasks = [spb.StageTask(task_id=r.task_id, frames_done=self.reporter.done_count.get(r.task_id, 0),
                               frames_total=r.job.task.video.frame_count, failure=r.failure)
                 for r in list(self.runs.values())]
        return spb.GetStatusResponse(worker_id=self.worker_id, stage=INGEST, frames_processed=self.frames_decoded,
                                     tasks=tasks, uptime_s=time.time() - self.started_at, serving=not problem,
                                     problem=problem, consumer_group=self.group_name())

    def stop_task_here(self, task_id: str) -> bool:
        """An operator stops a task's decoding here: the task fails, saying so."""
        runs = [r for r in list(self.runs.values()) if r.task_id == task_id and not r.finished.is_set()]
        for run in runs:
            run.cancel()
            self._fail(run, f"its decoding was stopped by an operator on {self.worker_id}")
            run.finished.set()
        return bool(runs)

    def stop(self, *_args) -> None:
        self.halt.set()


def _producer(settings: Settings, client_id: str):
    from confluent_kafka import Producer

    return Producer(kafka.producer_config(settings, client_id))


def serve(settings: Settings | None = None, control_port: int = 0, metrics_port: int = 0) -> None:
    """Run an ingest worker until SIGTERM/SIGINT. Stopping is as safe as dying: its unfinished jobs are
    not committed, and the replica that gets them next goes on after the frames that are out."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    faulthandler.enable(all_threads=True)
    tracing.setup(f"posemesh-{INGEST}")
    worker = IngestWorker(settings or Settings(), control_port, metrics_port)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    try:
        worker.run()
    finally:
        tracing.shutdown()
