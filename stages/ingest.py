"""The ingest stage: uploads decoded and cameras read into raw_frames_<task> by any number of replicas
(POSEMESH_INGEST=stage).

The gateway probes an upload (it still refuses bad input itself, at once), stores it in the blob store,
announces the task and writes an IngestJob to posemesh.ingest, on a partition of the replica with the fewest
tasks (gateway/placement.py: the partitions each replica holds are in its heartbeats), the same partition for
every job of the run. The replicas are one consumer group over that topic: the replica holding a job's
partition decodes the upload with mesh/frames.py's frame producer (JPEG frames, then the end of stream) and
tells the gateway on posemesh.events what it did: progress (the "decode" step), what decoded (SourceRead) and
failures. A replica decodes up to POSEMESH_INGEST_MAX_JOBS uploads at once; the jobs after those wait in its
queue, which its heartbeats list (waiting_tasks): the gateway's stall limit (STALL_TIMEOUT_S) does not count
that wait.

Exactly once, as in the stages: a job's offset is committed only once its outcome is on the broker (the end
of stream and the gateway told, or the failure told; what is committed is the lowest offset of the partition
whose job is not finished). A replica that dies
leaves its jobs uncommitted; the group gives its partitions to another, which reads the jobs again and reads
back how far each task's raw_frames_<task> got (stream_so_far): a closed stream is done; otherwise the upload
is decoded again and sending goes on after the frames that are out, every one of them. The few frames sent
twice (the dead replica's in flight) have the same index and content: the stages drop repeats by index.

Back-pressure, as the gateway's producer has it: at most POSEMESH_MAX_FRAMES_AHEAD frames ahead of the last
stage (annotate), followed here through its progress on posemesh.events (AnnotatedSoFar; a replica has no task
store, and annotate's committed offsets lag by a whole video segment).

A job stops as soon as its task ends (TaskEnded on posemesh.control) and is skipped when its run is older than
the task's (the broker lost its data and the task is run again under a new epoch).

Cameras. A live task's job (LiveJob: the camera's URL, sealed with the gateways' key) is read by mesh/live.py's
live source on the replica holding its partition, at once (a camera cannot wait for a slot; the gateway's
per-user limits bound how many there are). What a gateway reading a camera writes to the task store itself
travels on posemesh.events instead: the status every half second (LiveRead; the gateway adds up the counts of
successive readers), the frames that went in (progress of the "decode" step) and the camera's end
(SourceEnded, before the end of stream, so before annotate can finish the task). The lag bound follows the
annotate stage as an upload's back-pressure does.
CancelTask reaches the camera as SourceStopped on posemesh.control. A replica that dies leaves the job
uncommitted: the next holder reads back where the stream stopped and opens the camera again, as a gateway that
took a live task over did. The job is committed once the camera's end is told, so jobs after it on its
partition are committed only then (done again after a take-over, they find their streams closed).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import Counter, start_http_server

from posemesh.mesh import given_boxes, kafka, media, records, tracing
from posemesh.mesh.at_rest import KeyFileError, SecretBox, Unreadable
from posemesh.mesh.frames import Decoded, FrameProducer, StreamSoFar, stream_so_far
from posemesh.mesh.live import LiveConfig, LiveSource, Source
from posemesh.mesh.pipeline import INGEST, LAST_STAGE
from posemesh.mesh.settings import Settings
from posemesh.stages.control import ControlFollower
from posemesh.stages.control_api import ControlApi
from posemesh.stages.reporting import Reporter
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import stage_service_pb2 as spb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.ingest")

FRAMES = Counter("posemesh_ingest_frames_total", "Frames of uploads decoded and of cameras sent")
JOBS = Counter("posemesh_ingest_jobs_total", "Jobs finished here", ["outcome"])  # decoded, failed, skipped, stopped

POLL_S = 0.2
# How long a replica waits for posemesh.control's replay before it takes jobs: a job of a task that ended
# meanwhile must be recognised as such, not decoded again.
CATCH_UP_S = 30.0
EVENT_WAIT_S = kafka.MESSAGE_TIMEOUT_S + kafka.DELIVERY_MARGIN_S
# What fails around a decoding (the read-back, the upload's fetch, telling the outcome) is tried again, first
# RETRY_S later, then twice as late each time up to RETRY_MAX_S, until the task ends (the broker or the blob
# store is away: the gateway's stall limit decides when a task has waited long enough).
RETRY_S, RETRY_MAX_S = 1.0, 30.0
# How long a stopping session waits for its cameras' readers: a read in progress (LiveConfig.read_timeout_s), then
# the flush of what they sent (mesh/live.py's DETACH_FLUSH_S).
CAMERA_STOP_S = 12.0


def reader_name(resumed_at: int, worker_id: str, now: float | None = None) -> str:
    """The name a camera's reader gives its LiveRead statuses. The gateway keeps the counts of the reader whose
    name sorts last and drops a late status of an earlier one (gateway/store.py's apply_live_read), so names
    sort by the frame the reader went on from: a reader that takes a camera over resumes after every frame
    its predecessors sent, whatever the hosts' clocks say. The clock only breaks a tie (a predecessor that
    sent no frame): a successor whose clock is behind such a predecessor's has its statuses dropped for its
    whole read. A new run of the task (a new epoch) starts the order again (TaskStore.new_run). The leading
    "@" sorts after the digits of the older names (the clock alone)."""
    return f"@{resumed_at:012d}/{time.time() if now is None else now:020.6f}/{worker_id}"


class AnnotatedSoFar:
    """How far the annotate stage got with the uploads and cameras read here, for their back-pressure and lag
    bound: the progress annotate reports on posemesh.events (what the gateway counts when it decodes itself),
    followed while a task is read here (one thread; gone a few seconds after the last). Annotate finishes a
    task's frames in index order (an ordered stage), so the newest index reported done, plus one, is how many it
    finished. A task taken over from a replica that died starts at the frames that went in before (`floor`):
    its earlier progress was not followed here, and counting those frames as finished lets in up to one window
    more while annotate still works on them (the bound can be passed that once)."""

    IDLE_S = 5.0
    POSITIONED_S = 5.0  # the longest follow() waits for a new follower to find the end of the events topic

    def __init__(self, settings: Settings, client_id: str):
        self.settings, self.client_id = settings, client_id
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, int], list] = {}  # (task, epoch) -> [frames annotate finished, follower]
        self.thread: threading.Thread | None = None
        self.started_at = 0.0
        self.halt = threading.Event()
        # Set once the follower reads from a known offset: a report sent after that is seen. A follower that
        # only asked for "the end" would find it at its first fetch, and miss the reports sent before then.
        self.positioned = threading.Event()

    def _ensure_thread(self) -> None:
        """Under the lock: a follower runs while a task is followed (one that failed is replaced, at most
        once a second)."""
        if self.thread is None and self.counts and not self.halt.is_set() and time.monotonic() - self.started_at > 1:
            self.started_at = time.monotonic()
            self.positioned.clear()
            self.thread = threading.Thread(target=self._run, name="annotated", daemon=True)
            self.thread.start()

    def follow(self, task_id: str, epoch: int, floor: int) -> object:
        """Follow a run's progress from `floor` on; returns the token that `forget` takes (a follower that
        started later for the same run is not forgotten by an earlier one that ends after it)."""
        token = object()
        with self.lock:
            self.counts[(task_id, epoch)] = [max(floor, self.counts.get((task_id, epoch), [0])[0]), token]
            self.started_at = 0.0  # a new task: no need to wait
            self._ensure_thread()
        self.positioned.wait(self.POSITIONED_S)  # before its frames go out, so none of their reports is missed
        return token

    def forget(self, task_id: str, epoch: int, token: object) -> None:
        with self.lock:
            if self.counts.get((task_id, epoch), [0, None])[1] is token:
                del self.counts[(task_id, epoch)]

    def __call__(self, task_id: str, epoch: int) -> int:
        with self.lock:
            self._ensure_thread()
            return self.counts.get((task_id, epoch), [0])[0]

    def _run(self) -> None:
        idle_since = time.monotonic()
        consumer = None
        try:
            consumer = Consumer(kafka.follower_config(self.settings, f"{self.client_id}-annotated", self.client_id))
            _, end = consumer.get_watermark_offsets(TopicPartition(kafka.EVENTS_TOPIC, 0), timeout=self.POSITIONED_S)
            consumer.assign([TopicPartition(kafka.EVENTS_TOPIC, 0, end)])
            self.positioned.set()
            while not self.halt.is_set():
                try:
                    msgs = consumer.consume(num_messages=500, timeout=0.2)
                except KafkaException as exc:  # the broker is away: the counts wait (the windows close)
                    log.warning("annotate's progress not read: %s", exc)
                    self.halt.wait(1.0)
                    continue
                for msg in msgs:
                    self._apply(msg)
                with self.lock:
                    if self.counts:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > self.IDLE_S:
                        self.thread = None  # decided under the lock: the next follow() starts another
                        return
        except Exception:
            log.exception("following annotate's progress failed")
        finally:
            with self.lock:
                if self.thread is threading.current_thread():
                    self.thread = None  # failed: the next follow() starts another
            if consumer is not None:
                consumer.close()

    def _apply(self, msg) -> None:
        if msg.error() or msg.value() is None:
            return
        try:
            event = pb.WorkerEvent.FromString(msg.value())
        except Exception:  # noqa: BLE001 - not a worker event: nothing to follow
            return
        if event.stage != LAST_STAGE or event.WhichOneof("event") != "progress" or not event.progress.done:
            return
        key = (event.progress.task_id, event.progress.epoch)
        newest = max(r.last for r in event.progress.done) + 1
        with self.lock:
            if key in self.counts and newest > self.counts[key][0]:
                self.counts[key][0] = newest

    def stop(self) -> None:
        self.halt.set()
        thread = self.thread
        if thread is not None:
            thread.join(5)


@dataclass
class Run:
    """One run (task and epoch) being decoded here. Its jobs are committed once it is `finished`: its outcome
    is on the broker, or its task ended (nothing to tell). Only its own thread sets `finished`."""

    job: pb.IngestJob
    producer: FrameProducer | None = None
    live: LiveSource | None = None  # a camera's reader, while it reads
    thread: threading.Thread | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    start_at: int = 0  # frames out already when it started (a take-over)
    failure: str = ""  # why it failed, once told
    stop_reason: str = ""  # an operator stopped it here (StopTask): the failure to tell
    retry: str = ""  # why this attempt could not finish (the broker, the blob store): tried again
    decoded: Decoded | None = None
    published: int = 0  # a camera: frames out (the next index), as last reported
    ended: pb.WorkerEvent | None = None  # a camera: its SourceEnded, once told (its stream is then closed)
    trace: object = None  # the run's trace context (posemesh.mesh.tracing), from its job's headers

    @property
    def task_id(self) -> str:
        return self.job.task.task_id

    @property
    def key(self) -> tuple[str, int]:
        return self.job.task.task_id, self.job.epoch

    @property
    def is_camera(self) -> bool:
        return self.job.HasField("live")

    @property
    def active(self) -> bool:
        """Its thread still runs (a cancelled one too, until it noticed)."""
        return self.thread is not None and self.thread.is_alive()

    def cancel(self) -> None:
        self.cancelled.set()
        producer = self.producer
        if producer is not None:
            producer.cancelled.set()
        live = self.live
        if live is not None:
            live.detach()  # the stream stays open for the next holder of the job (or nobody: the task ended)


class Undelivered(Exception):
    """What the gateway must hear of a run (what decoded, its end, its failure) did not reach the broker."""


class IngestWorker:
    def __init__(self, settings: Settings, control_port: int = 0, metrics_port: int = 0):
        settings.ingest_stage()  # a wrong POSEMESH_INGEST stops the process here, saying so
        self.settings, self.metrics_port = settings, metrics_port
        self.worker_id = f"ingest-{socket.gethostname()}-{os.getpid()}"
        self.control = ControlFollower(settings, self.worker_id)
        self.reporter = Reporter(self.worker_id, INGEST)
        self.blobs = settings.blob_store()
        self.lock = threading.Lock()
        self.runs: dict[tuple[str, int], Run] = {}  # (task, epoch) -> its run here
        self.queue: list[Run] = []  # runs waiting for one of the INGEST_MAX_JOBS slots
        self.jobs: dict[int, dict[int, Run]] = {}  # partition -> offset -> the run that job is part of
        self.annotated = AnnotatedSoFar(settings, self.worker_id)  # made again for every session
        self.assigned: set[int] = set()
        self.answered = False  # whether its group has answered yet (problem(): ready only then)
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
                # The group is named after the broker's incarnation (as the stages' are, stages/worker.py): a
                # replica that joined before knowing it would be in a group of its own and do every job twice.
                if self.control.incarnation is None:
                    self.halt.wait(0.1)
                    continue
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
        return self.control.group_name(INGEST)

    def _session(self, generation: int) -> None:
        """Take jobs until the broker's data is lost (a new generation) or the worker stops."""
        kafka.SPARE_PRODUCERS.clear()  # made against the broker as it was: a new session's frames use new ones
        kafka.ensure_shared_topics(self.settings)
        # After the broker answered: a session that fails before (no broker) and starts over makes none each time.
        FrameProducer.make_ready(kafka.producer_config(self.settings, self.worker_id), "ingest",
                                 self.settings.reserved_tasks)
        if self.settings.live_sources:  # cameras are allowed: this replica may read one
            LiveSource.make_ready(kafka.producer_config(self.settings, self.worker_id), "ingest")
        # Jobs come seconds apart at most: a held fetch of FOLLOWER_FETCH_WAIT_MS costs an idle broker less, and
        # a job at most that much delay.
        consumer = Consumer(kafka.follower_config(self.settings, self.group_name(), self.worker_id))
        events = kafka.Sender(_producer(self.settings, self.worker_id))
        self.annotated = AnnotatedSoFar(self.settings, self.worker_id)
        self.reporter.attach(events.producer)
        consumer.subscribe([kafka.INGEST_TOPIC], on_assign=self._assigned, on_revoke=self._revoked)
        try:
            while not self.halt.is_set() and self.control.generation == generation:
                msg = consumer.poll(POLL_S)
                if msg is not None:
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consume: %s", msg.error())
                    else:
                        self._take(msg.partition(), msg.offset(), msg.value(), msg.headers())
                self._stop_ended()
                self._stop_cameras()
                self._start_queued()
                self._commit(consumer)
                self._forget_done()
                # Running and queued: the gateway deletes no topic a live worker lists.
                self.reporter.reading_tasks(sorted({r.task_id for r in self.runs.values() if not r.finished.is_set()}))
                with self.lock:  # waiting for a slot is no stall (gateway/lifecycle.py's sweep)
                    self.reporter.waiting_tasks(sorted({r.task_id for r in self.queue}))
                    self.reporter.ingest_partitions(sorted(self.assigned))  # where gateways place new jobs
                events.producer.poll(0)
        finally:
            with self.lock:
                runs = list(self.runs.values())
                self.runs.clear()
                self.queue.clear()
                self.jobs.clear()
                self.assigned.clear()
            for run in runs:  # uncommitted: the next holder of their partitions does them
                run.cancel()
            # A camera's frames in flight go out before the process may exit: left half sent, some partitions
            # would have them and others not, a hole the next holder can only close the stream at.
            deadline = time.monotonic() + CAMERA_STOP_S
            for run in runs:
                if run.is_camera and run.thread is not None:
                    run.thread.join(max(0.0, deadline - time.monotonic()))
            self.annotated.stop()
            self.reporter.attach(None)
            events.flush(5)
            consumer.close()

    def _assigned(self, consumer, partitions) -> None:
        consumer.assign(partitions)
        with self.lock:
            self.assigned = {tp.partition for tp in partitions}
            self.answered = True
            for p in [p for p in self.jobs if p not in self.assigned]:  # another replica does these jobs now
                for run in self.jobs.pop(p).values():
                    if not any(run in jobs.values() for jobs in self.jobs.values()):
                        run.cancel()
                        self.runs.pop(run.key, None)
                        if run in self.queue:
                            self.queue.remove(run)
        log.info("ingest partitions %s", sorted(self.assigned))

    def _revoked(self, consumer, _partitions) -> None:
        # Answered here, as stages/reading.py does (left unanswered, confluent-kafka answers it holding the GIL,
        # and during close() that can wait forever: librdkafka #4041). The eager protocol takes every partition
        # away before handing them out again: runs go on until the assignment says who has their partitions now
        # (most often this worker again).
        consumer.unassign()
        with self.lock:
            self.assigned = set()

    def _take(self, partition: int, offset: int, value: bytes, headers: list | None = None) -> None:
        try:
            job = pb.IngestJob.FromString(value)
        except Exception:  # noqa: BLE001 - not a job: nothing to do, commit past it
            log.warning("posemesh.ingest[%d] offset %d is not an IngestJob: skipped", partition, offset)
            job = None
        with self.lock:
            run = self.runs.get((job.task.task_id, job.epoch)) if job else None
            if run is None:
                # The run's trace context comes with its job: this replica may read the job before its control
                # follower reads the run's TaskStarted.
                run = Run(job or pb.IngestJob(), trace=tracing.context_of(headers))
                if job is None or self._nothing_to_do(job):
                    run.finished.set()
                    JOBS.labels("skipped").inc()
                else:
                    self.runs[run.key] = run
                    self.queue.append(run)
            self.jobs.setdefault(partition, {})[offset] = run

    def _start_queued(self) -> None:
        """Uploads in their order while a slot is free; cameras at once."""
        with self.lock:
            running = sum(1 for r in self.runs.values() if r.active and not r.is_camera)
            for run in list(self.queue):
                if not run.is_camera and running >= self.settings.ingest_max_jobs:
                    continue
                self.queue.remove(run)
                run.thread = threading.Thread(target=self._decode, args=(run,), name=f"ingest-{run.task_id[:12]}",
                                              daemon=True)
                run.thread.start()
                running += not run.is_camera

    def _nothing_to_do(self, job: pb.IngestJob) -> bool:
        """The job's task ended, or a newer run of it replaced this one."""
        started, _reserved = self.control.lookup(job.task.task_id)
        return self.control.has_ended(job.task.task_id) or (started is not None and started.epoch > job.epoch)

    def _stop_ended(self) -> None:
        for run in list(self.runs.values()):
            if not run.cancelled.is_set() and not run.finished.is_set() and self._nothing_to_do(run.job):
                log.info("task %s ended or runs again: this run's decoding stops", run.task_id)
                run.cancel()
                if run.thread is None:  # still queued: nothing to stop, nothing to tell
                    with self.lock:
                        if run in self.queue:
                            self.queue.remove(run)
                    run.finished.set()

    def _stop_cameras(self) -> None:
        """CancelTask on a camera read here (SourceStopped): it stops, closing its stream."""
        for run in list(self.runs.values()):
            live = run.live
            if live is not None and not live.stop_requested.is_set():
                stop = self.control.stop_of(run.task_id)
                if stop is not None:
                    live.stop(stop.reason, stop.state)

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
                        jobs.pop(offset)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # a rebalance took the partition: its new holder does the job again
                log.warning("ingest commit failed: %s", exc)

    def _forget_done(self) -> None:
        """Runs finished and no job of which is left uncommitted (their last progress goes out first)."""
        with self.lock:
            pending = {id(run) for jobs in self.jobs.values() for run in jobs.values()}
            done = [key for key, run in self.runs.items()
                    if run.finished.is_set() and not run.active and id(run) not in pending]
            if not done:
                return
            self.reporter.flush_progress()
            for key in done:
                self.reporter.forget(self.runs.pop(key).task_id)

    # ------------------------------------------------------------------ one upload

    def _decode(self, run: Run) -> None:
        """Decode the run's upload, going on after the frames that are out, and tell the gateway how it went.
        What fails around the decoding (reading back where the frames got, fetching the upload, telling the
        outcome) is tried again until it works or the task ends; the decoding itself reports its own failures
        (a broken upload fails the task, saying where)."""
        delay = RETRY_S
        try:
            while not run.cancelled.is_set() and not self.halt.is_set():
                run.retry = ""
                try:
                    self._decode_once(run)
                except Exception as exc:  # noqa: BLE001 - the broker or the blob store failed
                    run.retry = str(exc)
                if not run.retry or run.cancelled.is_set():
                    break
                log.warning("task %s: decoding could not go on (%s); again in %.0f s", run.task_id, run.retry, delay)
                if run.cancelled.wait(delay):
                    break
                delay = min(RETRY_MAX_S, delay * 2)
            if run.stop_reason and not self.halt.is_set():  # an operator stopped it: say so, on a producer of its own
                self._tell(run, self._failure(run, run.stop_reason), None)
            if run.failure or run.cancelled.is_set() and not self.halt.is_set():
                run.finished.set()  # (a decoded run set it once the gateway had heard)
            if run.finished.is_set():
                JOBS.labels("failed" if run.failure else "stopped" if run.cancelled.is_set() else "decoded").inc()
        except Undelivered as exc:
            log.error("task %s: %s; its job is left to the next holder of its partition", run.task_id, exc)
        finally:
            run.producer = None  # the producer's callbacks refer to the run: no cycle outlives it

    def _decode_once(self, run: Run) -> None:
        job, task_id, settings = run.job, run.task_id, self.settings
        partitions = kafka.partitions_for(kafka.RAW_FRAMES, settings)
        so_far = stream_so_far(kafka.consumer_config(settings, f"{self.worker_id}-resume", self.worker_id),
                               task_id, job.epoch, partitions)
        if run.is_camera:
            self._read_camera(run, so_far)
            return
        if so_far.closed:  # a replica that died after the end of stream: the gateway may not have heard of it
            log.info("task %s: its frames are out already (%d)", task_id, so_far.frames)
            self._tell(run, self._source_read(run, Decoded(so_far.frames, None), produced=True), None)
            run.finished.set()
            return
        if so_far.frames:
            log.info("task %s: going on after the %d frames an earlier replica sent", task_id, so_far.frames)
        run.start_at = so_far.frames
        try:
            given = given_boxes.load(self.blobs, job.task)
        except LookupError as exc:
            self._tell(run, self._failure(run, str(exc)), None)
            return
        annotated = self.annotated  # this session's (a run outliving it must not touch the next one's)
        following = annotated.follow(task_id, job.epoch, so_far.frames)
        try:
            with self.blobs.local_copy(job.upload_key) as path:
                if path is None:
                    self._tell(run, self._failure(run, "the upload is not in the blob store any more; please upload "
                                                       "again"), None)
                    return
                producer = FrameProducer(
                    job.task, path, kafka.producer_config(settings, self.worker_id), partitions,
                    settings.jpeg_quality, epoch=job.epoch,
                    on_progress=lambda first, last: self._progress(run, first, last),
                    on_decoded=lambda decoded: self._decoded(run, decoded),
                    on_done=lambda count: self._done(run, count),
                    on_error=lambda message: self._from_producer(run, self._failure(run, message)),
                    frames_finished=lambda: annotated(task_id, job.epoch), max_ahead=settings.max_frames_ahead,
                    limits=media.Limits.from_settings(settings), trace=run.trace or self.control.trace(task_id),
                    start_at=so_far.frames, client="ingest", given=given, ready_producers=settings.reserved_tasks)
                run.producer = producer
                if run.cancelled.is_set():
                    return
                producer.run()  # on this thread: the producer's delivery callbacks are served here
        finally:
            annotated.forget(task_id, job.epoch, following)

    # ------------------------------------------------------------------ one camera

    def _read_camera(self, run: Run, so_far: StreamSoFar) -> None:
        """Read the job's camera until it is done, going on after the frames an earlier reader sent, and tell the
        gateway how it ended (or, when its stream cannot go on, close it and say why)."""
        job, task_id, settings = run.job, run.task_id, self.settings
        if so_far.closed:  # an earlier reader closed the stream; the gateway keeps the first end it heard
            log.info("task %s: its live stream was closed after %d frames already", task_id, so_far.frames)
            self._tell(run, run.ended or self._source_ended(
                run, tpb.TASK_STATE_FAILED, "the ingest replica reading the camera stopped as it closed the stream; "
                "the frames before that are in the results: start a new live task to continue", so_far.frames), None)
            run.finished.set()
            return
        if so_far.hole:
            log.warning("task %s: its live stream cannot go on (frames on the topic up to %d, all of them up to %d)",
                        task_id, so_far.newest, so_far.frames)
            self._close_stream(run, so_far.frames, tpb.TASK_STATE_FAILED,
                               "frames of its live stream were lost with the ingest replica that read it; the frames "
                               "before that are in the results: start a new live task to continue")
            return
        if run.ended is not None:  # the gateway heard how it ends; the end of stream did not go out: no camera now
            ended = run.ended.source_ended
            self._close_stream(run, ended.total, ended.state, ended.message)
            return
        try:
            url = SecretBox.for_reader(settings).open(job.live.sealed_url, "the camera URL of this live task")
        except (KeyFileError, Unreadable) as exc:
            self._tell(run, self._failure(run, f"the ingest stage cannot read the camera: {exc}"), None)
            return
        if so_far.frames:
            log.info("task %s: reading its camera again from frame %d on", task_id, so_far.frames)
        run.start_at = run.published = so_far.frames
        reader = reader_name(so_far.frames, self.worker_id)
        annotated = self.annotated  # this session's (a run outliving it must not touch the next one's)
        following = annotated.follow(task_id, job.epoch, so_far.frames)
        try:
            live = LiveSource(job.task, Source.of(url), job.live.transport,
                              kafka.producer_config(settings, self.worker_id), job.epoch,
                              LiveConfig.from_settings(settings, job.task.live.max_lag_s),
                              annotated=lambda: annotated(task_id, job.epoch),
                              on_status=lambda status, published: self._camera_status(run, reader, status, published),
                              on_closing=lambda state, message, total: self._camera_closing(run, state, message, total),
                              on_end=lambda _state, _message, _total: self._camera_closed(run),
                              so_far=so_far if so_far.frames else None, client="ingest")
            run.live = live
            stop = self.control.stop_of(task_id)
            if stop is not None:  # stopped before its camera was opened here: the stream closes at once
                live.stop(stop.reason, stop.state)
            if not run.cancelled.is_set():
                live.run()  # on this thread, as an upload's producer
        finally:
            run.live = None
            annotated.forget(task_id, job.epoch, following)

    def _camera_status(self, run: Run, reader: str, status: tpb.LiveStatus, published: int) -> None:
        """The camera's status for the gateway (not waited for: the next one follows), and the frames out."""
        for index in range(run.published, published):
            self.reporter.done(run.task_id, index, run.job.epoch, None)
        if published > run.published:
            self.frames_decoded += published - run.published
            FRAMES.inc(published - run.published)
            run.published = published
        live = run.live
        if live is not None:
            event = pb.WorkerEvent(worker_id=self.worker_id, stage=INGEST, live_read=pb.LiveRead(
                task_id=run.task_id, epoch=run.job.epoch, reader=reader, status=status))
            live.sender.send(kafka.EVENTS_TOPIC, event.SerializeToString())

    def _camera_closing(self, run: Run, state: int, message: str, total: int) -> None:
        """The camera is done: the gateway hears how the task ends before the end of stream goes out (so before
        annotate's results). Undelivered (Undelivered raised), the stream stays open and the run is tried again.
        Once told, this run only closes the stream (_read_camera); a replica that dies before the end of stream
        went out leaves it to the next holder, which the gateway tells to stop the camera (SourceStopped, sent
        when it records the end): it closes the stream at once, and the gateway keeps the first end it heard."""
        run.ended = self._source_ended(run, state, message, total)
        self._tell(run, run.ended, None)

    def _camera_closed(self, run: Run) -> None:
        """The end of stream is out: the job is done. Not delivered, the run is tried again: it finds the stream
        closed and tells its end again, or closes it."""
        live = run.live
        if live is not None and not live.sender.delivered(EVENT_WAIT_S, give_up=self.halt.is_set):
            run.retry = "the end of the live stream was not delivered"
            return
        run.finished.set()

    def _close_stream(self, run: Run, total: int, state: int, message: str) -> None:
        """End the task's stream after `total` frames without reading the camera, the task ending as said."""
        self._camera_closing(run, state, message, total)
        record = records.end_of_stream_record(run.task_id, run.job.task.options, run.job.epoch, total,
                                              run.job.task.video.fps)
        sender = kafka.Sender(_producer(self.settings, f"{self.worker_id}-{run.task_id[:12]}"))
        sender.send(kafka.task_topic(kafka.RAW_FRAMES, run.task_id), record.SerializeToString(),
                    records.partition_of(record, kafka.partitions_for(kafka.RAW_FRAMES, self.settings)))
        if not sender.delivered(EVENT_WAIT_S, give_up=self.halt.is_set):
            raise Undelivered("the end of the live stream was not delivered")
        run.finished.set()

    def _source_ended(self, run: Run, state: int, message: str, total: int) -> pb.WorkerEvent:
        return pb.WorkerEvent(worker_id=self.worker_id, stage=INGEST, source_ended=pb.SourceEnded(
            task_id=run.task_id, epoch=run.job.epoch, state=state, message=message, total=total))

    # ------------------------------------------------------------------ progress and outcomes

    def _progress(self, run: Run, first: int, last: int) -> None:
        # Every index is reported (those an earlier replica sent too: its reports may be lost with it; the gateway
        # counts a union); only the frames this run sent count as its work.
        sent = last - max(first, run.start_at) + 1
        if sent > 0:
            self.frames_decoded += sent
            FRAMES.inc(sent)
        for index in range(first, last + 1):
            self.reporter.done(run.task_id, index, run.job.epoch, None)

    def _decoded(self, run: Run, decoded: Decoded) -> None:
        """Every frame is read, the end of stream not sent yet: the gateway hears what decoded first."""
        run.decoded = decoded
        self._from_producer(run, self._source_read(run, decoded, produced=False))

    def _done(self, run: Run, count: int) -> None:
        """The frames and the end of stream are on the broker: the gateway hears that the upload is read."""
        if self._from_producer(run, self._source_read(run, run.decoded or Decoded(count, None), produced=True)):
            run.finished.set()

    def _from_producer(self, run: Run, event: pb.WorkerEvent) -> bool:
        """`_tell` from the frame producer's callbacks: undelivered, the producer stops (sending nothing more:
        no end of stream before the gateway heard what decoded) and the run is tried again (`retry`)."""
        try:
            self._tell(run, event, run.producer)
            return True
        except Undelivered as exc:
            run.retry = str(exc)
            if run.producer is not None:
                run.producer.cancelled.set()
            return False

    def _source_read(self, run: Run, decoded: Decoded, produced: bool) -> pb.WorkerEvent:
        read = pb.SourceRead(task_id=run.task_id, epoch=run.job.epoch, frame_count=decoded.frame_count,
                             warning=decoded.warning, produced=produced)
        if decoded.duration_s is not None:
            read.duration_s = decoded.duration_s
        return pb.WorkerEvent(worker_id=self.worker_id, stage=INGEST, source_read=read)

    def _failure(self, run: Run, message: str) -> pb.WorkerEvent:
        return pb.WorkerEvent(worker_id=self.worker_id, stage=INGEST, failure=pb.TaskFailure(
            task_id=run.task_id, error_message=message, epoch=run.job.epoch))

    def _tell(self, run: Run, event: pb.WorkerEvent, producer: FrameProducer | None) -> None:
        """Deliver `event` to the gateway and wait for it, from the run's thread: on the run's producer while it
        decodes (its callbacks are served on this thread, and what decoded so reaches the gateway before the end
        of stream reaches any stage), else on one of its own. Raises Undelivered when librdkafka gave up on it
        (the broker was away for MESSAGE_TIMEOUT_S) or the worker stops: the job is then not committed."""
        sender = producer.sender if producer is not None else kafka.Sender(
            _producer(self.settings, f"{self.worker_id}-{run.task_id[:12]}"))
        sender.send(kafka.EVENTS_TOPIC, event.SerializeToString())
        if not sender.delivered(EVENT_WAIT_S, give_up=self.halt.is_set):
            raise Undelivered(f"an event for the gateway was not delivered "
                              f"({sender.errors[0] if sender.errors else 'the worker stopped'})")
        if event.WhichOneof("event") == "failure":
            run.failure = event.failure.error_message

    # ------------------------------------------------------------------ the control API

    def problem(self) -> str:
        if self.control.broker_problem:
            return self.control.broker_problem
        # As a stage worker: ready once its group has first answered (before, no job of any partition is read).
        return "" if self.answered else f"joining consumer group {self.group_name()}"

    def stalled(self) -> str:
        """Liveness: "" while the process answers its control API. Its jobs run on threads of their own, and one
        that stops moving is for the gateway's stall limit (STALL_TIMEOUT_S) to fail, not for a restart."""
        return ""

    def status(self) -> spb.GetStatusResponse:
        problem = self.problem()
        tasks = [spb.StageTask(task_id=r.task_id, frames_done=self.reporter.done_count.get(r.task_id, 0),
                               frames_total=0 if r.is_camera else r.job.task.video.frame_count, failure=r.failure)
                 for r in list(self.runs.values())]
        return spb.GetStatusResponse(worker_id=self.worker_id, stage=INGEST, frames_processed=self.frames_decoded,
                                     tasks=tasks, uptime_s=time.time() - self.started_at, serving=not problem,
                                     problem=problem, reading_tasks=self.reporter.reading,
                                     consumer_group=self.group_name() if self.control.incarnation else "")

    def stop_task_here(self, task_id: str) -> bool:
        """An operator stops a task's decoding here: the task fails, saying so (told by the run's thread)."""
        with self.lock:
            runs = [r for r in self.runs.values() if r.task_id == task_id and not r.finished.is_set()]
            queued = [r for r in runs if r in self.queue]
            for run in queued:  # it never started: it starts now, only to say it was stopped
                self.queue.remove(run)
                self.queue.insert(0, run)
        for run in runs:
            what = "the reading of its camera" if run.is_camera else "its decoding"
            run.stop_reason = f"{what} was stopped by an operator on {self.worker_id}"
            run.cancel()
        return bool(runs)

    def stop(self, *_args) -> None:
        self.halt.set()


def _producer(settings: Settings, client_id: str):
    return Producer(kafka.producer_config(settings, client_id))
