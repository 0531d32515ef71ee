"""A task's life in the gateway, in one place: started, run again, ended, cleaned up.

- **Started** (`start`, `start_live`): the task's topics are made (a reserved id's exist already),
  TaskStarted on posemesh.control tells the workers everything they need (options, video, epoch, whether it
  is live, where its annotated video is published), then its frames flow: the upload's frame producer or the
  camera's live source. `_launch` is the only place a task starts, first or again, so no way of starting
  one can forget a part of it.
- **Run again**: after a gateway restart (`recover`: resume the frames, reconnect a live task's camera
  after the frames it published, or fail the task, saying why), when another gateway died (`take_over`:
  the same for the tasks whose frames it published), and after the broker lost its data (`run_again`:
  every active task from its first frame under a new epoch; with Apache Kafka this is only after a real
  loss).
- **Ended** (`complete`, `fail`, `cancel`): the first terminal state wins; its frames stop, TaskEnded is
  announced (retried by the sweep until the broker takes it: workers must hear of it to let go of the
  topics), the upload is removed. A live task that is stopped, or whose camera is done, ends once annotate's
  results arrive, as its source ended: until then it stays RUNNING and its `ending` says how it will end
  (the first decision wins: a cancel that came first is not undone by the stream ending just after it).
  A task that named a callback URL has its webhook due in the same write as its terminal state
  (gateway/store.py); gateway/webhooks.py delivers it.
- **Cleaned** (`sweep`, `delete`, `abandon`): topics go after the hand-off (posemesh.gateway.topics), and
  with them what a crashed annotate worker left (partial result folders); a deleted task's files and row; a
  task that could not start leaves nothing.

Several gateways (gateway/duties.py): each task has an owner, the gateway that publishes its frames; each
gateway runs again only the tasks it owns, and stops their frames when another gateway ended them
(`heard_elsewhere`). Ending, cancelling and deleting work from any gateway.

Threads: the callers' (gRPC handlers through asyncio.to_thread, the event reader, the broker watch, the
sweep, the duties), and one frame producer or live source per task whose frames are being published.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer

from posemesh.gateway.duties import GATEWAY_LEASE
from posemesh.gateway.metrics import TASKS_ENDED, TOPICS_DELETED
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.sources import SourcePolicy
from posemesh.gateway.stats import MeshActivity
from posemesh.gateway.store import ACTIVE, TERMINAL, ActiveTask, TaskStore, now_us
from posemesh.gateway.topics import TopicManager
from posemesh.gateway.validation import Refused
from posemesh.mesh import given_boxes, kafka, media, names, records, tracing
from posemesh.mesh.frames import Decoded, FrameProducer, StreamSoFar, stream_so_far
from posemesh.mesh.live import LiveConfig, LiveSource, Source
from posemesh.mesh.pipeline import LAST_STAGE
from posemesh.mesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")

# How long an ending live task waits for annotate's results before it ends without them.
LIVE_RESULTS_WAIT_S = 120.0
# How often a cancelled live task whose camera an ingest replica still reads is told again to stop it.
STOPS_AGAIN_S = 20.0
# What a live task's camera is told when it must stop (SourceStopped), by how the task ends (Task.ending): a
# user's cancel, or a camera the allow-list no longer admits (found as the gateway starts again). Said again by
# the sweep until the camera's end is recorded.
STOPPED_BECAUSE = {
    tpb.TASK_STATE_CANCELLED: "cancelled by the user",
    tpb.TASK_STATE_FAILED: "its camera is not allowed any more (the operator changed the allow-list); the frames "
                           "before that are in the results",
}
# How often the sweep restarts the stall clock of uploads queued for a decoding slot (at most a quarter of the
# stall limit): one store write per queued task per round, not per 0.5 s sweep.
WAITING_AGAIN_S = 10.0


# Where a task's frames come from when it (re)starts: one of these, or None when they are all out already.
@dataclass(frozen=True)
class Upload:
    """Decoded by a frame producer here (`path`: this gateway's copy), or by the ingest stage (None: the
    upload is in the blob store, POSEMESH_INGEST=stage)."""
    path: Path | None


@dataclass(frozen=True)
class Camera:
    source: Source  # read by a live source
    transport: int
    so_far: StreamSoFar | None = None  # what an earlier reader of it published, to go on after


@dataclass(frozen=True)
class StreamEnd:
    """A live task whose camera is gone (the gateway restarted): its stream is closed after the `total` frames
    that went in, and the task ends with `state` and `message` once their results arrive."""
    total: int
    state: int
    message: str


Frames = Upload | Camera | StreamEnd | None


class FinishedSoFar:
    """How many frames of a task the last stage has finished, as the task store says: what decoding is paced by
    (an upload's back-pressure, a camera's lag bound). While the store does not answer (a failover, the
    network), the last count read stands, so the window closes instead of failing the task; that is said once
    until the store answers again."""

    def __init__(self, store: TaskStore, task_id: str):
        self.store, self.task_id = store, task_id
        self.count, self.away = 0, False

    def __call__(self) -> int:
        # A live task's count is asked from two threads (its reader's and its follower's, mesh/live.py): the count
        # read is returned, and the one kept for when the store does not answer never goes back.
        try:
            count = self.store.frames_done(self.task_id, LAST_STAGE)
        except Exception:  # noqa: BLE001 - see above
            if not self.away:
                log.warning("task %s: the task store does not answer; its last count of finished frames (%d) "
                            "paces decoding", self.task_id, self.count, exc_info=True)
            self.away = True
            return self.count
        self.count, self.away = max(self.count, count), False
        return count


def new_stream_token() -> str:
    """A live task's stream secret: 128 random bits, URL-safe (22 characters of [A-Za-z0-9_-])."""
    return secrets.token_urlsafe(16)


def stream_path(task: tpb.Task) -> str:
    """What replaces "{task}" in LIVE_PUBLISH_URL and LIVE_STREAM_URL: the task id, then its secret token as
    a path component of its own, so the stream of a task cannot be played by one who only knows its id."""
    return f"{task.task_id}/{task.stream_token}" if task.stream_token else task.task_id


class TaskLifecycle:
    def __init__(self, settings: Settings, store: TaskStore, topics: TopicManager, reservations: Reservations,
                 source_policy: SourcePolicy, owner: str = ""):
        self.settings, self.store, self.topics = settings, store, topics
        self.owner = owner  # this gateway's id (gateway/duties.py): the tasks whose frames it publishes
        self.reservations, self.source_policy = reservations, source_policy
        self.frame_producers: dict[str, FrameProducer] = {}
        self.live_sources: dict[str, LiveSource] = {}
        self.unannounced: set[str] = set()  # ended tasks whose TaskEnded could not be published yet
        self.lock = threading.RLock()
        self.blobs = settings.blob_store()  # uploads other processes read, and the results
        self.activity = MeshActivity()  # frames decoded here, and what the workers report (GetStats)
        self.stops_said_at = 0.0  # when the sweep last told cancelled cameras to stop (_say_stops_again)
        self.waiting_said_at = 0.0  # when the sweep last restarted the stall clock of queued uploads

    def make_producers_ready(self) -> None:
        """Producers made ahead for this gateway's next uploads and, where cameras are allowed, its next camera, the
        first ones included (none when the ingest stage decodes them)."""
        if not self.settings.ingest_stage():
            FrameProducer.make_ready(kafka.producer_config(self.settings, "gateway"), "gateway",
                                     self.settings.reserved_tasks)
            if self.settings.live_sources:
                LiveSource.make_ready(kafka.producer_config(self.settings, "gateway"), "gateway")

    def publish_url(self, task: tpb.Task) -> str:
        """Where annotate publishes a live task's annotated video (RTSP); nowhere for an upload."""
        return self.settings.live_publish_url.replace("{task}", stream_path(task)) if task.HasField("live") else ""

    def stream_url(self, task: tpb.Task) -> str:
        """Where players find it (LIVE_STREAM_URL, or where it is published)."""
        template = self.settings.live_stream_url or self.settings.live_publish_url
        return template.replace("{task}", stream_path(task)) if task.HasField("live") else ""

    # ------------------------------------------------------------------ started

    def start(self, task: tpb.Task, path: Path) -> None:
        """A new task from an upload: topics first (explicitly, with their partition counts), then tell the
        workers, then frames."""
        # The ingest stage decodes the stored upload (this gateway's copy moves there: a rename on a local
        # store). Otherwise: annotate muxes the upload's audio into the annotated video; on a shared store, a
        # gateway that takes the task over if this one dies publishes its frames again from the stored upload.
        if self.settings.ingest_stage():  # (the gateway's own decoding stores given boxes itself: _produce)
            self._store_given_boxes(task.task_id, path)
            self.blobs.put_file(names.upload_key(task.task_id), path, move=True)
            upload = Upload(None)
        else:
            if task.video.audio_codec or self.store.shared:
                self.blobs.put_file(names.upload_key(task.task_id), path)
            upload = Upload(path)
        self._launch(task, self.store.epoch(task.task_id), upload,
                     make_topics=task.task_id not in self.reservations)  # a reserved id's topics are read already
        log.info("task %s started: topics created, workers told, frames flowing", task.task_id)

    def start_live(self, task: tpb.Task, source: Source, transport: int) -> None:
        """A new live task: the same, with the camera in place of the upload."""
        self.store.set_live_source(task.task_id, source.url, transport)
        self._launch(task, self.store.epoch(task.task_id), Camera(source, transport),
                     make_topics=task.task_id not in self.reservations)
        log.info("live task %s started on %s", task.task_id, source.shown)

    def _launch(self, task: tpb.Task, epoch: int, frames: Frames, make_topics: bool = True) -> None:
        """The one way a task runs, new or again: its topics, TaskStarted with all a stage needs to know,
        the task RUNNING, then its frames."""
        task_id = task.task_id
        # The run's trace (posemesh.mesh.tracing): its context goes to every worker with TaskStarted.
        with tracing.task_span(task_id, {"posemesh.epoch": epoch, "posemesh.live": task.HasField("live")}) as headers:
            if make_topics:
                self.topics.create(task_id)
            self.topics.publish_started(task, epoch, publish_url=self.publish_url(task), headers=headers)
            self.reservations.used(task_id)  # a reserved id: from here on it is this task's to end and clean up
            self.store.transition(task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
            if isinstance(frames, Upload) and frames.path is None:
                self.topics.publish_ingest_job(pb.IngestJob(
                    task=tpb.Task(task_id=task_id, options=task.options, video=task.video), epoch=epoch,
                    upload_key=names.upload_key(task_id)), self._ingest_partition(task_id), headers)
            elif isinstance(frames, Upload):
                self._produce(task, frames.path, epoch)
            elif isinstance(frames, Camera) and self.settings.ingest_stage():
                self.topics.publish_ingest_job(pb.IngestJob(
                    task=tpb.Task(task_id=task_id, options=task.options, video=task.video,  # counts: the reader's
                                  live=tpb.LiveStatus(source=task.live.source, max_lag_s=task.live.max_lag_s)),
                    epoch=epoch, live=pb.LiveJob(sealed_url=self.store.secrets.seal(frames.source.url),
                                                 transport=frames.transport)), self._ingest_partition(task_id), headers)
            elif isinstance(frames, Camera):
                self._read_camera(task, frames.source, frames.transport, epoch, frames.so_far)
            elif isinstance(frames, StreamEnd):
                self._close_stream(task, epoch, frames)

    def _ingest_partition(self, task_id: str) -> int | None:
        """Where the run's IngestJob goes: gateway/store.py's ingest_partition, placed by gateway/placement.py."""
        return self.store.ingest_partition(task_id, lambda: self.topics.placement.choose(task_id))

    def _store_given_boxes(self, task_id: str, upload: Path) -> None:
        """Boxes given instead of the detector (posemesh.mesh.given_boxes) wait next to the upload as it arrives;
        they go to the blob store as the task starts (or as it runs again, when the gateway died in between)."""
        boxes = upload.parent / names.GIVEN_BOXES_FILE
        if boxes.exists():
            self.blobs.put_file(names.given_boxes_key(task_id), boxes, move=True)

    def _produce(self, task: tpb.Task, path: Path, epoch: int) -> None:
        task_id = task.task_id
        try:
            self._store_given_boxes(task_id, path)
            given = given_boxes.load(self.blobs, task)
        except LookupError as exc:
            self.fail(task_id, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the blob store does not answer: say so rather than stall
            self.fail(task_id, f"the boxes given with the upload could not be read from the blob store ({exc}); "
                               "please upload again")
            return

        def on_decoded(decoded: Decoded) -> None:
            if self.store.epoch(task_id) == epoch:
                self.store.update(task_id, decoded.apply)

        def on_done(count: int) -> None:
            if self.store.epoch(task_id) != epoch:
                return  # a run the broker lost; a newer one is under way
            self.store.mark_produced(task_id)
            self.store.add_done(task_id, "decode", [], epoch, frames_total=count)

        producer = FrameProducer(
            task, path, kafka.producer_config(self.settings, "gateway"),
            kafka.partitions_for(kafka.RAW_FRAMES, self.settings),
            self.settings.jpeg_quality, epoch=epoch,
            on_progress=lambda first, last: self._decoded(task_id, first, last, epoch),
            on_decoded=on_decoded, on_done=on_done, on_error=lambda msg: self.fail(task_id, msg),
            frames_finished=FinishedSoFar(self.store, task_id),
            max_ahead=self.settings.max_frames_ahead, limits=media.Limits.from_settings(self.settings),
            trace=tracing.current(), client="gateway", given=given, ready_producers=self.settings.reserved_tasks)
        with self.lock:  # registered and started at once: halt() joins every producer it finds (CI run 110)
            old = self.frame_producers.pop(task_id, None)
            if old:
                old.cancelled.set()
            self.frame_producers[task_id] = producer
            producer.start()

    def source_read(self, read: pb.SourceRead) -> None:
        """The ingest stage's word on an upload it decoded: what decoded (before the end of stream), then, with
        `produced`, that every frame and the end of stream are out (what on_decoded and on_done say here)."""
        if self.store.epoch(read.task_id) != read.epoch:
            return  # a run the broker lost
        decoded = Decoded(read.frame_count, read.duration_s if read.HasField("duration_s") else None, read.warning)
        self.store.update(read.task_id, decoded.apply)
        if read.produced:
            self.store.mark_produced(read.task_id)
            self.store.add_done(read.task_id, "decode", [], read.epoch, frames_total=read.frame_count)

    def _decoded(self, task_id: str, first: int, last: int, epoch: int) -> None:
        self.store.add_done(task_id, "decode", [(first, last)], epoch)
        self.activity.finished("decode", last - first + 1, time.time())

    def _read_camera(self, task: tpb.Task, source: Source, transport: int, epoch: int,
                     so_far: StreamSoFar | None = None) -> None:
        task_id = task.task_id

        counted = [so_far.frames if so_far else 0]  # frames published when last told, for the decode rate
        # The task store away (a failover, the network): the camera is read on, its status and the annotated
        # count are the last known, and the store is told again at the next status. A frozen annotated count
        # closes the reader's window within the lag bound: frames are dropped, not published, until the store
        # answers again (and, if another gateway took the task over meanwhile, heard_elsewhere stops it here).
        store_away = [False]

        def stored(call, *args):
            try:
                result = call(*args)
            except Exception:  # noqa: BLE001 - see above
                if not store_away[0]:
                    log.warning("live task %s: the task store does not answer; the camera is read on", task_id,
                                exc_info=True)
                store_away[0] = True
                return None
            store_away[0] = False
            return result

        def on_status(status: tpb.LiveStatus, published: int) -> None:
            def apply(t: tpb.Task):
                if t.state not in ACTIVE:
                    return False
                t.live.CopyFrom(status)
            stored(self.store.update, task_id, apply)
            if published and stored(self.store.add_done, task_id, "decode", [(0, published - 1)], epoch) is not None:
                self.activity.finished("decode", published - counted[0], time.time())
                counted[0] = published

        def on_end(state: int, message: str, total: int) -> None:
            with self.lock:
                # The source by its id, not by this closure: a closure holding it would make a reference
                # cycle (source -> on_end -> source), and its producer's threads would stay until the GC.
                done = self.live_sources.pop(task_id, None) if self.store.epoch(task_id) == epoch else None
            self._source_done(task_id, epoch, state, message, total,
                              done.stop_reason if done else "cancelled by the user")

        live = LiveSource(task, source, transport, kafka.producer_config(self.settings, "gateway"), epoch,
                          LiveConfig.from_settings(self.settings, task.live.max_lag_s),
                          FinishedSoFar(self.store, task_id), on_status, on_end, so_far)
        with self.lock:
            old = self.live_sources.pop(task_id, None)
            self.live_sources[task_id] = live
        if old:
            old.stop()
        with self.lock:  # unless halt() took it meanwhile: it is started only while registered
            if self.live_sources.get(task_id) is live:
                live.start()

    def _source_done(self, task_id: str, epoch: int, state: int, message: str, total: int,
                     stop_reason: str = "cancelled by the user") -> bool:
        """A live task's camera is done and its stream closes after `total` frames (here: closed already; an
        ingest replica: it closes next): the task ends with `state` and `message` once their results are in,
        unless CancelTask came first (then CANCELLED, `stop_reason`) or an earlier reader's end was heard
        already (the first end stands). Returns whether this end was recorded."""
        if self.store.epoch(task_id) != epoch:
            return False  # this run was replaced (the broker lost its data)
        with self.lock:
            decided = self.store.get(task_id)
            if decided is None or decided.state in TERMINAL or self.store.ending(task_id) is not None:
                return False
            if decided.ending and decided.ending != state:  # CancelTask (or the allow-list) came first
                state = decided.ending
                message = stop_reason if state == tpb.TASK_STATE_CANCELLED else STOPPED_BECAUSE.get(state, message)
            self._record_ending(task_id, state, message)
        self.store.add_done(task_id, "decode", [], epoch, frames_total=total)
        log.info("live task %s: source done (%s); %d frames, waiting for the results", task_id, message, total)
        return True

    def source_ended(self, ended: pb.SourceEnded) -> None:
        """The ingest stage's word that a live task's camera is done (what on_end says here). The camera is
        then told to stop too: a replica that dies before its end of stream goes out leaves the job to another,
        which must close the stream, not read the camera again."""
        if self._source_done(ended.task_id, ended.epoch, ended.state, ended.message, ended.total):
            state, message = self.store.ending(ended.task_id) or (ended.state, ended.message)
            self._stop_camera(ended.task_id, message, state)  # what was recorded: the first end stands

    def _stop_camera(self, task_id: str, reason: str, state: int = tpb.TASK_STATE_CANCELLED) -> None:
        """Tell the ingest replica reading a live task's camera to stop (SourceStopped); the task then ends in
        `state` with `reason`. Not published (the broker is away), the sweep says it again for a cancelled task
        (`_say_stops_again`)."""
        try:
            self.topics.publish_source_stopped(task_id, reason, state)
        except Exception:  # noqa: BLE001
            log.warning("live task %s: could not tell its camera to stop yet", task_id)

    def live_read(self, read: pb.LiveRead) -> None:
        """The ingest stage's status of a live task's camera (what on_status says here; its frames come as
        progress)."""
        self.store.apply_live_read(read.task_id, read.epoch, read.reader, read.status)

    def _close_stream(self, task: tpb.Task, epoch: int, end: StreamEnd) -> None:
        record = records.end_of_stream_record(task.task_id, task.options, epoch, end.total, task.video.fps)
        producer = Producer(kafka.producer_config(self.settings, "gateway-recover"))
        producer.produce(kafka.task_topic(kafka.RAW_FRAMES, task.task_id), record.SerializeToString(),
                         partition=0)  # where an end of stream goes (records.partition_of)
        producer.flush(10)
        self._record_ending(task.task_id, end.state, end.message)

    # ------------------------------------------------------------------ run again

    def recover(self) -> None:
        """After a restart: resume what can be resumed of the tasks this gateway owns, fail what cannot.
        Nothing stays RUNNING forever."""
        on_broker = self.topics.on_broker()
        mine = self.store.active_tasks(owner=self.owner)
        self._remove_stale_uploads({a.task.task_id for a in mine})
        for active in mine:
            self._resume(active, on_broker, "restarted")
        # Ended tasks whose topics still exist: say so again (the announcement may have been lost).
        for task_id, state in self.store.ended_with_topics():
            if task_id in on_broker:
                self._announce_end(task_id, state)

    def _remove_stale_uploads(self, keep: set[str]) -> None:
        """Uploads on this gateway's disk that no task of its own needs any more: one cut off mid-stream when
        the gateway died (no task was made; the client retried elsewhere or gave up), or one of a task that
        another gateway took over and ended. Called before the gateway listens, so none is arriving."""
        for job in self.settings.jobs_dir.iterdir():
            if job.name not in keep:
                shutil.rmtree(job, ignore_errors=True)
                log.info("removed %s: no task of this gateway needs it", job)

    def take_over(self) -> None:
        """The tasks of gateways that died (their lease lapsed): this one takes them and resumes them as after
        its own restart, from the upload in the blob store (called by the gateway holding the mesh duties)."""
        orphaned = self.store.orphaned_tasks(GATEWAY_LEASE)
        if not orphaned:
            return
        on_broker = self.topics.on_broker()
        for task_id in orphaned:
            if not self.store.take_over(task_id, self.owner, GATEWAY_LEASE):
                continue
            active = next((a for a in self.store.active_tasks(owner=self.owner) if a.task.task_id == task_id), None)
            if active is None:
                continue  # it ended meanwhile
            log.info("task %s: its gateway is gone; this gateway takes it over", task_id)
            if (not active.live_url and not active.produced and not self.settings.ingest_stage()
                    and self._upload_of(task_id) is None):
                try:
                    path = names.upload_path(self.settings.jobs_dir, task_id)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.blobs.get_file(names.upload_key(task_id), path)
                except Exception as exc:  # noqa: BLE001 - not stored: _resume fails the task, saying so
                    log.warning("task %s: its upload is not in the blob store (%s)", task_id, exc)
            self._resume(active, on_broker, "that published its frames was lost")

    def _resume(self, active: ActiveTask, on_broker: dict[str, list[str]], what_happened: str) -> None:
        """Go on with a task whose frames stopped with their gateway (`what_happened` to it, for messages)."""
        task = active.task
        upload = self._upload_of(task.task_id)
        topics_intact = set(kafka.task_topics(task.task_id)) - set(on_broker.get(task.task_id, [])) <= {
            kafka.task_topic(kafka.LIVE_FRAMES, task.task_id)}  # the live topic exists only if watched
        if active.live_url and not active.produced:
            self._continue_live(active, topics_intact, what_happened)
        elif active.produced and topics_intact:
            log.info("task %s: frames all published before the gateway %s; waiting for the stages", task.task_id,
                     what_happened)
            self._launch(task, active.epoch, None, make_topics=False)
        elif upload is not None:
            if topics_intact:
                # Republish from frame 0: the stages drop frames they have already seen, by index.
                log.info("task %s: resuming the frame producer (the gateway %s)", task.task_id, what_happened)
                epoch = active.epoch
            else:  # the broker lost the topics: a new run, so no worker mistakes it for redelivery
                epoch = self.store.new_run(task.task_id, "the message broker lost this task's frames while the "
                                                          "gateway was down; it was run again from the start")
            self._launch(task, epoch, upload)
        else:
            self.fail(task.task_id, f"the gateway {what_happened} while the upload was being processed and the "
                                    "upload file is gone; please upload again")

    def _continue_live(self, active: ActiveTask, topics_intact: bool, what_happened: str) -> None:
        """A live task whose gateway restarted or died: its camera connection went with the old process. The
        camera is opened again here and the stream goes on after the frames that went in (read back from the
        broker), as after an outage of the camera. A task that was ending already (stopped, cancelled, its
        camera done) is closed instead; so is one whose stream cannot go on, saying why."""
        task_id = active.task.task_id
        if self.settings.ingest_stage():
            self._hand_camera_on(active, topics_intact, what_happened)
            return
        if active.live_error or active.ending_state or active.task.ending or not topics_intact:
            self._close_live_after_restart(active, topics_intact, what_happened)
            return
        try:
            source = self.source_policy.check(active.live_url)
        except Refused as exc:  # the operator took its host off the allow-list meanwhile
            self._close_live_after_restart(active, topics_intact, what_happened, because=exc.message)
            return
        try:
            so_far = stream_so_far(kafka.consumer_config(self.settings, f"posemesh-gateway-{self.owner}-resume",
                                                         f"gateway-resume-{task_id[:12]}"),
                                   task_id, active.epoch, kafka.partitions_for(kafka.RAW_FRAMES, self.settings))
        except Exception as exc:  # noqa: BLE001 - the broker is away: what went in still becomes results
            log.warning("task %s: where its live stream stopped could not be read (%s)", task_id, exc)
            self._close_live_after_restart(active, topics_intact, what_happened,
                                           because="where its stream stopped could not be read back")
            return
        if so_far.closed:  # its reader closed the stream and died before it said how the task ends
            log.warning("task %s: its live stream was closed after %d frames already", task_id, so_far.frames)
            self._record_ending(task_id, tpb.TASK_STATE_FAILED,
                                f"the gateway {what_happened} during the live task, as its stream was being "
                                "closed; the frames before that are in the results: start a new live task to "
                                "continue")
            self.store.add_done(task_id, "decode", [], active.epoch, frames_total=so_far.frames)
            return
        if so_far.hole:
            log.warning("task %s: its live stream cannot go on (frames on the topic up to %d, all of them up to %d)",
                        task_id, so_far.newest, so_far.frames)
            self._close_live_after_restart(active, topics_intact, what_happened,
                                           because="frames of its stream were lost with it", total=so_far.frames)
            return
        with self.lock:  # a cancel or end decided while the stream was read back is seen here, or sees the reader
            task = self.store.get(task_id)
            if task is None or task.state in TERMINAL:
                return
            if task.ending:
                self._close_live_after_restart(dataclasses.replace(active, task=task), topics_intact,
                                               what_happened, total=so_far.frames)
                return
            log.info("task %s: the gateway %s during the live task; reading its camera again from frame %d on",
                     task_id, what_happened, so_far.frames)
            self._launch(task, active.epoch, Camera(source, active.live_transport, so_far), make_topics=False)

    def _hand_camera_on(self, active: ActiveTask, topics_intact: bool, what_happened: str) -> None:
        """A live task whose camera an ingest replica reads (POSEMESH_INGEST=stage), after its gateway restarted
        or died: the replica reads on, whatever became of the gateway. Its job is written again (the gateway
        may have died before it was: the replica holding it takes the copy for the same run), and a cancel
        decided before is said again (it may not have reached the replica). A camera the allow-list no longer
        admits (the operator changed it for this start) is stopped, the task failing with the results so far."""
        task_id = active.task.task_id
        if not topics_intact:
            self.fail(task_id, f"the gateway {what_happened} during the live task and the broker lost its frames")
            return
        if active.task.ending and not active.ending_state:
            self._stop_camera(task_id, STOPPED_BECAUSE.get(active.task.ending, ""), active.task.ending)
        if active.live_error:  # its URL cannot be sealed again here
            if active.task.state == tpb.TASK_STATE_QUEUED:  # no job was written (it follows RUNNING): no replica
                self.fail(task_id, f"the gateway {what_happened} before the live task started, and "  # reads it
                                   f"{active.live_error}")
            return  # RUNNING: the job written before has the URL; the replica holding it reads on or says why not
        if not active.ending_state and not active.task.ending:
            try:
                self.source_policy.check(active.live_url)
            except Refused as exc:  # the operator took its host off the allow-list: as _continue_live does
                message = (f"the gateway {what_happened} during the live task and its camera is not allowed any "
                           f"more: {exc.message}; the frames before that are in the results")
                if active.task.state == tpb.TASK_STATE_QUEUED:  # no frame was read: nothing to finish
                    self.fail(task_id, message)
                    return
                # Shown on the task, and said again by the sweep until the camera's end is recorded; the job is
                # written again below, so a replica that never got it closes the stream at once.
                self._mark_ending(task_id, tpb.TASK_STATE_FAILED)
                self._stop_camera(task_id, message, tpb.TASK_STATE_FAILED)
        self._launch(active.task, active.epoch, Camera(Source.of(active.live_url), active.live_transport),
                     make_topics=False)

    def _close_live_after_restart(self, active: ActiveTask, topics_intact: bool, what_happened: str,
                                  because: str = "", total: int | None = None) -> None:
        """A live task whose gateway restarted or died, and whose camera is not read again (`_continue_live`):
        what went into the mesh (`total` frames, when read back; else as far as progress said) is finished
        into results; the task then ends FAILED, saying so."""
        task_id = active.task.task_id
        why = f" and its camera could not be read again: {because}" if because else ""
        message = (f"the gateway {what_happened} during the live task{why}; the frames before that are in the "
                   "results: start a new live task to continue")
        state = tpb.TASK_STATE_FAILED
        if active.task.ending == tpb.TASK_STATE_CANCELLED:  # cancelled before the restart: it ends as it was told
            state, message = tpb.TASK_STATE_CANCELLED, "cancelled by the user"
        if not topics_intact:
            self.fail(task_id, message.split(";")[0] + " and the broker lost its frames")
            return
        if total is None:
            total = self.store.frames_done(task_id, "decode")
        self._launch(active.task, active.epoch, StreamEnd(total, state, message), make_topics=False)

    def _upload_of(self, task_id: str) -> Upload | None:
        """The task's upload where its decoder reads it: the blob store for the ingest stage (not looked at
        here: an ingest replica that does not find it fails the task, saying so), else here."""
        if self.settings.ingest_stage():
            return Upload(None)
        path = names.upload_path(self.settings.jobs_dir, task_id)
        return Upload(path) if path.exists() else None

    def halt(self, join_s: float = 0.0) -> None:
        """Stop publishing every task's frames and leave the tasks RUNNING: the gateway stops (`recover` goes
        on at the next start) or the broker lost its data (`run_again` follows)."""
        with self.lock:
            producers, self.frame_producers = list(self.frame_producers.values()), {}
            lives, self.live_sources = list(self.live_sources.values()), {}
        for live in lives:
            live.detach()  # its stream stays open: the next start, or another gateway, reads the camera again
        for p in producers:
            p.cancelled.set()
        if join_s:  # the gateway stops: nothing of a task's may touch the store once it is closed
            deadline = time.monotonic() + join_s
            for thread in [t for t in [*producers, *lives] if t.ident is not None]:  # a live source never started
                thread.join(max(0.0, deadline - time.monotonic()))

    def run_again(self) -> None:
        """The broker lost its data (the frames are stopped already, see `halt`): every active task runs again
        from its first frame under a new epoch, or fails, saying why, when its upload is gone."""
        when = time.strftime("%H:%M:%S")
        for active in self.store.active_tasks(owner=self.owner):
            task_id = active.task.task_id
            if active.live_url and active.task.ending == tpb.TASK_STATE_CANCELLED and not active.ending_state:
                self._end(task_id, tpb.TASK_STATE_CANCELLED, "cancelled by the user (the message broker lost its "
                                                             "data before the frames were processed: no results)")
                continue
            if active.live_error and not active.ending_state:  # its camera's URL cannot be opened any more
                self.fail(task_id, f"the message broker lost this live task's frames and it could not start over: "
                                   f"{active.live_error}")
                continue
            if active.live_url and not active.ending_state:
                epoch = self.store.new_run(task_id, f"the message broker lost its data at {when}; the live task "
                                                    "started over from the frames after that")
                task = self.store.get(task_id)
                try:
                    camera = Camera(self.source_policy.check(active.live_url), active.live_transport)
                    self._launch(task, epoch, camera)
                except Exception as exc:  # noqa: BLE001
                    self.fail(task_id, f"the message broker lost this live task's frames and it could not "
                                       f"start over ({exc})")
                continue
            upload = self._upload_of(task_id)
            if upload is None:
                self.fail(task_id, "the message broker lost this task's frames and the upload is no longer here; "
                                   "please upload again")
                continue
            epoch = self.store.new_run(task_id, f"the message broker lost its data at {when}; the task was run again "
                                                "from its first frame")
            task = self.store.get(task_id)
            try:
                self._launch(task, epoch, upload)
                log.info("task %s: run %d started after the broker lost its data", task_id, epoch)
            except Exception as exc:  # noqa: BLE001 - it broke again: say so instead of hanging
                self.fail(task_id, f"the message broker lost this task's frames and it could not be restarted ({exc})")

    # ------------------------------------------------------------------ ended

    def _stop_frames(self, task_id: str, quietly: bool = False) -> None:
        """No more frames for the task: its frame producer or live source stops. `quietly`: a stopped live
        source neither closes its stream nor ends the task (it is being undone, or goes on elsewhere)."""
        with self.lock:
            producer = self.frame_producers.pop(task_id, None)
            live = self.live_sources.pop(task_id, None)
        if producer:
            producer.cancelled.set()
        if live:
            live.detach() if quietly else live.stop()

    def _end(self, task_id: str, state: int, message: str = "") -> tpb.Task | None:
        def decided(t: tpb.Task):  # a live task's pending end overtaken by another (a stage failed meanwhile)
            if t.state not in ACTIVE or t.ending in (0, state):
                return False
            t.ending = state
        self.store.update(task_id, decided)
        task = self.store.transition(task_id, state, message)
        if task is None:
            return None  # already terminal: the first ending wins
        self._stop_frames(task_id)
        self._announce_end(task_id, state)
        self._remove_upload(task_id)  # not needed any more
        log.info("task %s %s %s", task_id, tpb.TaskState.Name(state), message)
        TASKS_ENDED.labels(tpb.TaskState.Name(state).removeprefix("TASK_STATE_").lower()).inc()
        return task

    def _announce_end(self, task_id: str, state: int) -> None:
        try:
            self.topics.publish_ended(task_id, state)
            self.unannounced.discard(task_id)
        except Exception:  # noqa: BLE001 - the sweep tries again: workers must hear of it to let go
            log.warning("could not announce the end of %s yet; retrying", task_id)
            self.unannounced.add(task_id)

    def cancel(self, task_id: str, reason: str) -> tpb.Task | None:
        """CancelTask; returns the task as the cancel leaves it. Anything but a live task ends CANCELLED now.
        A live task keeps its results: its source stops now and it stays RUNNING, `ending` CANCELLED, until
        they are in (`complete`); one whose source is done already keeps the ending it has."""
        with self.lock:
            live = self.live_sources.get(task_id)
            ended = self.store.ending(task_id) is not None
            in_stage = self.settings.ingest_stage() and self.store.is_live(task_id)  # an ingest replica reads it
            if live is not None or ended or in_stage or self.store.live_elsewhere(task_id, self.owner):
                task = self._mark_ending(task_id, tpb.TASK_STATE_CANCELLED)
                if live is not None:  # else its owner stops it when it hears of the ending (heard_elsewhere)
                    live.stop(reason)
            else:
                return self._end(task_id, tpb.TASK_STATE_CANCELLED, reason)
        if in_stage and not ended:  # outside the lock: a broker that is away holds it up to 10 s
            self._stop_camera(task_id, reason)
        return task

    def heard_elsewhere(self, task_id: str | None) -> None:
        """Another gateway changed `task_id` (None: maybe any task). A task whose frames this gateway publishes
        and that ended there, or that another gateway took over, stops here; a live one cancelled there has
        its camera stopped here, and ends with its results as if it was cancelled here."""
        with self.lock:
            here = [task_id] if task_id is not None else [*self.frame_producers, *self.live_sources]
            here = [t for t in here if t in self.frame_producers or t in self.live_sources]
        for tid in here:
            task, owner = self.store.get_with_owner(tid) or (None, None)
            if task is None or task.state in TERMINAL:
                self._stop_frames(tid)
                continue
            if owner not in (None, self.owner):
                # Another gateway took the task over (this one's lease lapsed: it was stopped or cut off from
                # the store): the frames are its to publish now, and a camera must have one reader.
                log.warning("task %s: another gateway took it over; its frames stop here", tid)
                self._stop_frames(tid, quietly=True)
                continue
            live = self.live_sources.get(tid)
            if live is not None and task.ending == tpb.TASK_STATE_CANCELLED:
                live.stop("cancelled by the user")

    def _mark_ending(self, task_id: str, state: int) -> tpb.Task | None:
        """Show on a running task how it will end, unless that was decided before; returns the task."""
        def mark(t: tpb.Task):
            if t.state not in ACTIVE or t.ending:
                return False
            t.ending = state
        return self.store.update(task_id, mark)

    def _record_ending(self, task_id: str, state: int, message: str) -> None:
        """A live task's source is done: it ends with `state` once its results arrive."""
        with self.lock:
            self.store.record_ending(task_id, state, message)
            self._mark_ending(task_id, state)

    def fail(self, task_id: str, reason: str) -> tpb.Task | None:
        return self._end(task_id, tpb.TASK_STATE_FAILED, reason)

    def complete(self, result: pb.TaskResult) -> None:
        def attach(task: tpb.Task):
            if task.state != tpb.TASK_STATE_RUNNING:
                return False
            del task.artifacts[:]
            task.artifacts.extend(result.artifacts)
            task.warnings.extend(w for w in result.warnings if w not in task.warnings)

        task = self.store.update(result.task_id, attach)
        if task is not None:
            self.store.finish_progress(result.task_id, result.frames_written, result.epoch)
            with self.lock:  # a live source recording its ending finishes first
                ending = self.store.ending(result.task_id)
            if not ending and task.ending in STOPPED_BECAUSE:  # stopped; the source is not done yet
                ending = (task.ending, STOPPED_BECAUSE[task.ending])
            if ending:  # a live task ends as its source did, results attached
                self._end(result.task_id, *ending)
            else:
                self._end(result.task_id, tpb.TASK_STATE_COMPLETED)

    # ------------------------------------------------------------------ cleaned

    def abandon(self, task_id: str) -> None:
        """Undo a task that could not be started (the broker is down): no row, no topic, no file remains."""
        self._stop_frames(task_id, quietly=True)
        if self.settings.ingest_stage():  # its TaskStarted may be out (the job was not): workers let go of it
            self._announce_end(task_id, tpb.TASK_STATE_CANCELLED)
        if task_id in self.reservations:  # workers read a reserved id's topics: they must let go first
            self.reservations.used(task_id)
            self._announce_end(task_id, tpb.TASK_STATE_CANCELLED)
            self.topics.orphans.setdefault(task_id, time.time())
            self.store.drop_reserved([task_id])
            self.store.purge(task_id)
            self._remove_upload(task_id)
            return
        try:
            self.topics.delete(task_id, timeout=5)
        except Exception:  # noqa: BLE001 - the broker is down: nobody read them, the orphan sweep deletes them
            log.warning("could not delete the topics of abandoned task %s now; the orphan sweep will", task_id)
        self.store.purge(task_id)
        self._remove_upload(task_id)

    def delete(self, task_id: str) -> None:
        """The user deleted an ended task: its files now, its row once its topics are gone."""
        self.blobs.delete_prefix(names.results_prefix(task_id))
        self._remove_upload(task_id)
        self.store.mark_deleted(task_id)

    def _say_stops_again(self) -> None:
        """Every STOPS_AGAIN_S, by the gateway holding the duties: the stopped live tasks (cancelled, or their
        camera not allowed any more: STOPPED_BECAUSE) whose camera an ingest replica still reads (no end
        recorded) are told to stop again (the first SourceStopped may not have been published, or reached a
        replica that died)."""
        if not self.settings.ingest_stage() or time.monotonic() - self.stops_said_at < STOPS_AGAIN_S:
            return
        self.stops_said_at = time.monotonic()
        for task in self.store.cameras_reading():
            if task.ending in STOPPED_BECAUSE:
                self._stop_camera(task.task_id, STOPPED_BECAUSE[task.ending], task.ending)

    def _remove_upload(self, task_id: str) -> None:
        shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)
        try:
            self.blobs.delete_prefix(names.uploads_prefix(task_id))
        except Exception:  # noqa: BLE001 - the store is unreachable: the upload stays until deleted by hand
            log.warning("could not delete the stored upload of task %s", task_id, exc_info=True)

    def sweep(self, duties: bool = True, answering_since: Callable[[int, int], int] | None = None) -> None:
        """One round of the periodic sweep: say again the ends the broker did not take; and, by the gateway
        holding the mesh duties (`duties`), delete what no worker reads any more, end live tasks whose
        results are overdue, fail tasks that stopped moving. `answering_since(span_us, now_us)`: from when the
        broker has answered for that long (BrokerWatch); a silent broker stops every task, so the stall limit
        counts only time it answered (CI: silent for 5 minutes, then the task failed as it answered again)."""
        for task_id in list(self.unannounced):
            state = self.store.state_of(task_id)
            if state is not None:
                self._announce_end(task_id, state)
            else:
                self.unannounced.discard(task_id)
        if not duties:
            return
        deleted = self.topics.sweep()
        TOPICS_DELETED.inc(len(deleted))
        for task_id in deleted:  # no worker reads the task any more: what a crashed one left goes too
            self.blobs.delete_prefix(names.partials_prefix(task_id))
        waited_until = now_us() - int(LIVE_RESULTS_WAIT_S * 1e6)
        for task_id, state, message in self.store.endings_overdue(waited_until):
            self._end(task_id, state, message + f" (its results did not come within {LIVE_RESULTS_WAIT_S:.0f} s)")
        timeout = self.settings.stall_timeout_s
        now, span = now_us(), int(timeout * 1e6)
        since = answering_since(span, now) if answering_since else now - span
        self._say_stops_again()
        if time.monotonic() - self.waiting_said_at >= min(timeout / 4, WAITING_AGAIN_S):
            self.waiting_said_at = time.monotonic()  # queued for a decoding slot: not stalled, the clock restarts
            self.store.progress_now(sorted(self.topics.waiting_on_replicas()))
        for task_id in self.store.stalled(since):
            self.fail(task_id, f"no frame made progress through any stage for {timeout:.0f} s")
