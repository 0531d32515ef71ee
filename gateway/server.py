"""Wires the gateway together: task store, Kafka producer, topic manager, event reader, frame producers,
broker watch, the grpc.aio server with health and reflection, start-up recovery and the periodic sweep.

Threads: the gRPC server's event loop (one thread, every call a coroutine), the event reader, the broker
watch, the sweep, and one frame producer per task whose frames are being published.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
from confluent_kafka import Producer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from posemesh.gateway.auth import Authenticator, KeyConfigError, load_keys
from posemesh.gateway.broker_watch import BrokerWatch
from posemesh.gateway.changes import ChangeFeed
from posemesh.gateway.events import EventReader
from posemesh.gateway.limits import UserLimits
from posemesh.gateway.live import LiveConfig, LiveSource
from posemesh.gateway.live_view import LiveViews
from posemesh.gateway.metrics import TASKS_ENDED, TOPICS_DELETED
from posemesh.gateway.producer import FrameProducer
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.service import TaskService
from posemesh.gateway.sources import Source, SourcePolicy
from posemesh.gateway.store import ACTIVE, TaskStore, now_us
from posemesh.gateway.topics import TopicManager
from posemesh.mesh import kafka, media, names
from posemesh.mesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc

log = logging.getLogger("posemesh.gateway")

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["TaskService"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# How long an ending live task waits for annotate's results before it ends without them.
LIVE_RESULTS_WAIT_S = 120.0


class Gateway:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.results_dir.mkdir(parents=True, exist_ok=True)
        self.auth = Authenticator(load_keys(self.settings.api_keys, self.settings.api_keys_file))
        try:
            self.source_policy = SourcePolicy(self.settings.live_sources)
        except ValueError as exc:
            raise KeyConfigError(f"POSEMESH_LIVE_SOURCES: {exc}") from None
        self.live_sources: dict[str, LiveSource] = {}
        self.views: LiveViews | None = None
        self.store = TaskStore(self.settings.db_path)
        self.limits = UserLimits(self.settings.max_active_tasks_per_user, self.settings.max_streams_per_user,
                                 self.store.count_active)
        self.producer = self._new_producer()
        self.topics = TopicManager(self.settings, self.producer, self.store)
        self.reservations = Reservations(self.topics, self.settings.reserved_tasks, self.settings.reserve_quiet_s)
        self.topics.is_reserved = self.reservations.__contains__
        self.events: EventReader | None = None
        self.watch: BrokerWatch | None = None
        self.frame_producers: dict[str, FrameProducer] = {}
        self.unannounced: set[str] = set()  # ended tasks whose TaskEnded could not be published yet
        self.lock = threading.RLock()
        self.running = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.changes: ChangeFeed | None = None
        self.port = 0

    def _new_producer(self) -> Producer:
        return Producer({**kafka.producer_config(self.settings, "gateway"),
                         "error_cb": lambda err: log.debug("producer: %s", err)})

    def live_config(self, max_lag_s: float = 0.0) -> LiveConfig:
        s = self.settings
        return LiveConfig(max_lag_s=max_lag_s or s.live_max_lag_s, outage_s=s.live_outage_s,
                          jpeg_quality=s.jpeg_quality,
                          partitions=kafka.partitions_for(kafka.RAW_FRAMES, s), limits=media.Limits.from_settings(s))

    def publish_url(self, task_id: str) -> str:
        return self.settings.live_publish_url.replace("{task}", task_id)

    def stream_url(self, task_id: str) -> str:
        template = self.settings.live_stream_url or self.settings.live_publish_url
        return template.replace("{task}", task_id)

    def broker_available(self) -> bool:
        return self.watch is None or self.watch.available

    # ------------------------------------------------------------------ task lifecycle

    def start_task(self, task: tpb.Task, path: Path) -> None:
        """Topics first (explicitly, with their partition counts), then tell the workers, then frames."""
        epoch = self.store.epoch(task.task_id)
        if task.task_id not in self.reservations:  # a reserved id's topics exist, and are read already
            self.topics.create(task.task_id)
        self.topics.publish_started(task, epoch)
        self.reservations.used(task.task_id)
        self.store.transition(task.task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
        self._start_producer(task, path, epoch)
        log.info("task %s started: topics created, workers told, frames flowing", task.task_id)

    def start_live_task(self, task: tpb.Task, source: Source, transport: int) -> None:
        """Like start_task, with the camera in place of the upload: topics, tell the workers, read."""
        epoch = self.store.epoch(task.task_id)
        self.store.set_columns(task.task_id, live_url=source.url, live_transport=transport)
        if task.task_id not in self.reservations:
            self.topics.create(task.task_id)
        self.topics.publish_started(task, epoch, self.publish_url(task.task_id))
        self.reservations.used(task.task_id)
        self.store.transition(task.task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
        self._start_live_source(task, source, transport, epoch)
        log.info("live task %s started on %s", task.task_id, source.shown)

    def _start_live_source(self, task: tpb.Task, source: Source, transport: int, epoch: int) -> None:
        task_id = task.task_id

        def on_status(status: tpb.LiveStatus, published: int) -> None:
            def apply(t: tpb.Task):
                if t.state not in ACTIVE:
                    return False
                t.live.CopyFrom(status)
            self.store.update(task_id, apply)
            if published:
                self.store.add_done(task_id, "decode", [(0, published - 1)], epoch)

        def on_end(state: int, message: str, total: int) -> None:
            if self.store.epoch(task_id) != epoch:
                return  # this run was replaced (the broker lost its data)
            self.store.set_columns(task_id, produced=1, ending_state=state, ending_message=message, ending_us=now_us())
            self.store.add_done(task_id, "decode", [], epoch, frames_total=total)
            with self.lock:
                self.live_sources.pop(task_id, None)
            log.info("live task %s: source done (%s); %d frames, waiting for the results", task_id, message, total)

        live = LiveSource(task, source, transport, kafka.producer_config(self.settings, "gateway"), epoch,
                          self.live_config(task.live.max_lag_s), lambda: self.store.frames_done(task_id, "annotate"),
                          on_status, on_end)
        with self.lock:
            old = self.live_sources.pop(task_id, None)
            self.live_sources[task_id] = live
        if old:
            old.stop()
        live.start()

    def _start_producer(self, task: tpb.Task, path: Path, epoch: int) -> None:
        task_id = task.task_id

        def on_done(count: int, skipped: int) -> None:
            if self.store.epoch(task_id) != epoch:
                return  # a run the broker lost; a newer one is under way
            self.store.set_columns(task_id, produced=1)
            self.store.add_done(task_id, "decode", [], epoch, frames_total=count)
            if skipped:
                warning = f"{skipped} damaged packets of the video could not be decoded and were skipped"
                self.store.update(task_id, lambda t: None if warning in t.warnings else t.warnings.append(warning))

        producer = FrameProducer(
            task, path, kafka.producer_config(self.settings, "gateway"),
            kafka.partitions_for(kafka.RAW_FRAMES, self.settings),
            self.settings.jpeg_quality, epoch=epoch,
            on_progress=lambda first, last: self.store.add_done(task_id, "decode", [(first, last)], epoch),
            on_done=on_done, on_error=lambda msg: self.fail(task_id, msg),
            frames_consumed=lambda: self.store.frames_done(task_id, "detect"),
            max_ahead=self.settings.max_frames_ahead, limits=media.Limits.from_settings(self.settings))
        with self.lock:
            old = self.frame_producers.pop(task_id, None)
            if old:
                old.cancelled.set()
            self.frame_producers[task_id] = producer
        producer.start()

    def abandon(self, task_id: str) -> None:
        """Undo a task that could not be started (the broker is down): no row, no topic, no file remains."""
        with self.lock:
            producer = self.frame_producers.pop(task_id, None)
            live = self.live_sources.pop(task_id, None)
        if producer:
            producer.cancelled.set()
        if live:
            live.on_end = lambda *_a: None
            live.stop()
        if task_id in self.reservations:  # workers read a reserved id's topics: they must let go first
            self.reservations.used(task_id)
            self._announce_end(task_id, tpb.TASK_STATE_CANCELLED)
            self.topics.orphans.setdefault(task_id, time.time())
            self.store.purge(task_id)
            shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)
            return
        try:
            kafka.delete_topics(self.topics.admin, kafka.task_topics(task_id), timeout=5)
        except Exception:  # noqa: BLE001 - the broker is down: nobody read them, the orphan sweep deletes them
            log.warning("could not delete the topics of abandoned task %s now; the orphan sweep will", task_id)
        self.store.purge(task_id)
        shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)

    def _end(self, task_id: str, state: int, message: str = "") -> tpb.Task | None:
        task = self.store.transition(task_id, state, message)
        if task is None:
            return None  # already terminal: the first ending wins
        with self.lock:
            producer = self.frame_producers.pop(task_id, None)
            live = self.live_sources.pop(task_id, None)
        if producer:
            producer.cancelled.set()
        if live:
            live.stop()
        self._announce_end(task_id, state)
        shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)  # the upload is not needed any more
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
        with self.lock:
            live = self.live_sources.get(task_id)
        if live is not None:  # a live task stops reading and keeps its results: it ends when they are in
            live.stop()
            return self.store.get(task_id)
        return self._end(task_id, tpb.TASK_STATE_CANCELLED, reason)

    def fail(self, task_id: str, reason: str) -> tpb.Task | None:
        return self._end(task_id, tpb.TASK_STATE_FAILED, reason)

    def complete(self, result: pb.TaskResult) -> None:
        def attach(task: tpb.Task):
            if task.state != tpb.TASK_STATE_RUNNING:
                return False
            del task.artifacts[:]
            task.artifacts.extend(result.artifacts)
            task.warnings.extend(w for w in result.warnings if w not in task.warnings)

        if self.store.update(result.task_id, attach) is not None:
            row = self.store.rows("task_id = ?", (result.task_id,))
            ending = row[0]["ending_state"] if row else None
            if ending:  # a live task ends as its source did, results attached
                self._end(result.task_id, ending, row[0]["ending_message"] or "")
            else:
                self._end(result.task_id, tpb.TASK_STATE_COMPLETED)

    def delete(self, task_id: str) -> None:
        shutil.rmtree(self.settings.results_dir / task_id, ignore_errors=True)
        shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)
        row = self.store.rows("task_id = ?", (task_id,))
        if row and row[0]["topics_deleted"]:
            self.store.purge(task_id)
        else:  # hidden now; the sweep removes the row once the topics are gone
            self.store.set_columns(task_id, deleted=1, idempotency_key=None)  # the key may be used again

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """After a restart: resume what can be resumed, fail what cannot. Nothing stays RUNNING forever."""
        on_broker = kafka.list_task_topics(self.topics.admin)
        for row in self.store.rows("state IN (?, ?) AND deleted = 0", tuple(ACTIVE)):
            task = tpb.Task.FromString(row["task"])
            path = self._upload_of(task.task_id)
            topics_intact = set(kafka.task_topics(task.task_id)) - set(on_broker.get(task.task_id, [])) <= {
                kafka.task_topic(kafka.LIVE_FRAMES, task.task_id)}  # the live topic exists only if watched
            if row["live_url"] and not row["produced"]:
                self._close_live_after_restart(task, row, topics_intact)
            elif row["produced"] and topics_intact:
                log.info("task %s: frames all published before the restart; waiting for the stages", task.task_id)
                self.topics.publish_started(task, row["epoch"])
            elif path is not None:
                if topics_intact:
                    # Republish from frame 0: the stages drop frames they have already seen, by index.
                    log.info("task %s: resuming the frame producer after a restart", task.task_id)
                    epoch = row["epoch"]
                else:  # the broker lost the topics: a new run, so no worker mistakes it for redelivery
                    epoch = self.store.new_run(task.task_id, "the message broker lost this task's frames while the "
                                                              "gateway was down; it was run again from the start")
                self.topics.create(task.task_id)
                self.topics.publish_started(task, epoch)
                self.store.transition(task.task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
                self._start_producer(task, path, epoch)
            else:
                self.fail(task.task_id, "the gateway restarted while the upload was being processed and the upload "
                                        "file is gone; please upload again")
        # Ended tasks whose topics still exist: say so again (the announcement may have been lost).
        for row in self.store.rows("topics_deleted = 0 AND finished_us IS NOT NULL"):
            if row["task_id"] in on_broker:
                self._announce_end(row["task_id"], row["state"])
        orphans = self.topics.find_orphans()
        if orphans:
            log.info("found %d tasks' topics without a live task; they will be deleted", len(orphans))

    def _close_live_after_restart(self, task: tpb.Task, row, topics_intact: bool) -> None:
        """A live task whose gateway restarted: its camera connection is gone with the old process. What went
        into the mesh is finished into results; the task then ends FAILED, saying so."""
        message = ("the gateway restarted during the live task; the frames before that are in the results: "
                   "start a new live task to continue")
        if not topics_intact:
            self.fail(task.task_id, message.split(";")[0] + " and the broker lost its frames")
            return
        total = self.store.frames_done(task.task_id, "decode")
        producer = Producer(kafka.producer_config(self.settings, "gateway-recover"))
        producer.produce(kafka.task_topic(kafka.RAW_FRAMES, task.task_id), pb.StageRecord(
            task_id=task.task_id, options=task.options, epoch=row["epoch"],
            end_of_stream=pb.EndOfStream(total_frames=total, fps=task.video.fps)).SerializeToString(), partition=0)
        producer.flush(10)
        self.store.set_columns(task.task_id, produced=1, ending_state=tpb.TASK_STATE_FAILED, ending_message=message,
                               ending_us=now_us())
        self.topics.publish_started(task, row["epoch"], self.publish_url(task.task_id))

    def _upload_of(self, task_id: str) -> Path | None:
        path = names.upload_path(self.settings.jobs_dir, task_id)
        return path if path.exists() else None

    def on_broker_reset(self, incarnation: str) -> None:
        """The broker lost its data: new Kafka clients, and every active task runs again from its first
        frame under a new epoch (or fails, saying why, when its upload is gone)."""
        with self.lock:
            producers, self.frame_producers = list(self.frame_producers.values()), {}
        for p in producers:
            p.cancelled.set()
        with self.topics.publish_lock:
            old = self.producer
            self.producer = self._new_producer()
            self.topics.producer = self.producer
            old.purge()
        self.topics.forget_readers()
        self.reservations.forget()
        if self.events is not None:
            self.events.stop()
        self.events = EventReader(self.settings, self.store, self.topics, self.complete, self.fail, incarnation)
        self.events.start()
        when = time.strftime("%H:%M:%S")
        with self.lock:
            lives, self.live_sources = list(self.live_sources.values()), {}
        for live in lives:
            live.stop()
        for row in self.store.rows("state IN (?, ?) AND deleted = 0", tuple(ACTIVE)):
            task_id = row["task_id"]
            if row["live_url"] and not row["ending_state"]:
                epoch = self.store.new_run(task_id, f"the message broker lost its data at {when}; the live task "
                                                    "started over from the frames after that")
                task = self.store.get(task_id)
                try:
                    self.topics.create(task_id)
                    self.topics.publish_started(task, epoch, self.publish_url(task_id))
                    self._start_live_source(task, self.source_policy.check(row["live_url"]),
                                            row["live_transport"] or 0, epoch)
                except Exception as exc:  # noqa: BLE001
                    self.fail(task_id, f"the message broker lost this live task's frames and it could not "
                                       f"start over ({exc})")
                continue
            path = self._upload_of(task_id)
            if path is None:
                self.fail(task_id, "the message broker lost this task's frames and the upload is no longer here; "
                                   "please upload again")
                continue
            epoch = self.store.new_run(task_id, f"the message broker lost its data at {when}; the task was run again "
                                                "from its first frame")
            task = self.store.get(task_id)
            try:
                self.topics.create(task_id)
                self.topics.publish_started(task, epoch)
                self._start_producer(task, path, epoch)
                log.info("task %s: run %d started after the broker lost its data", task_id, epoch)
            except Exception as exc:  # noqa: BLE001 - it broke again: say so instead of hanging
                self.fail(task_id, f"the message broker lost this task's frames and it could not be restarted ({exc})")

    # ------------------------------------------------------------------ the sweep

    def sweep_once(self) -> None:
        deleted = self.topics.sweep()
        TOPICS_DELETED.inc(len(deleted))
        for task_id in deleted:  # no worker reads the task any more: what a crashed one left goes too
            for partial in names.partial_results_dirs(self.settings.results_dir, task_id):
                shutil.rmtree(partial, ignore_errors=True)
        for task_id in list(self.unannounced):
            row = self.store.rows("task_id = ?", (task_id,))
            if row:
                self._announce_end(task_id, row[0]["state"])
            else:
                self.unannounced.discard(task_id)
        waited_until = now_us() - int(LIVE_RESULTS_WAIT_S * 1e6)
        for row in self.store.rows("state = ? AND ending_state IS NOT NULL AND ending_us < ?",
                                   (tpb.TASK_STATE_RUNNING, waited_until)):
            self._end(row["task_id"], row["ending_state"], (row["ending_message"] or "") +
                      f" (its results did not come within {LIVE_RESULTS_WAIT_S:.0f} s)")
        timeout = self.settings.stall_timeout_s
        stalled_before = now_us() - int(timeout * 1e6)
        for row in self.store.rows("state = ? AND last_progress_us < ?", (tpb.TASK_STATE_RUNNING, stalled_before)):
            self.fail(row["task_id"], f"no frame made progress through any stage for {timeout:.0f} s")

    def _sweep_loop(self) -> None:
        while self.running.is_set():
            try:
                if self.broker_available():
                    self.sweep_once()
                    self.reservations.maintain()
            except Exception:  # noqa: BLE001
                log.exception("sweep failed; retrying")
            time.sleep(0.5)

    # ------------------------------------------------------------------ serving

    def start(self, listen: str | None = None) -> int:
        kafka.ensure_shared_topics(self.settings)
        incarnation = kafka.incarnation(self.topics.admin)
        self.running.set()
        self.events = EventReader(self.settings, self.store, self.topics, self.complete, self.fail, incarnation)
        self.events.start()
        self.watch = BrokerWatch(self.settings, self.on_broker_reset, incarnation)
        self.recover()
        self.watch.start()
        threading.Thread(target=self._sweep_loop, name="sweep", daemon=True).start()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._server_thread = threading.Thread(target=self._serve, args=(listen, ready, failure), name="grpc",
                                               daemon=True)
        self._server_thread.start()
        ready.wait(60)
        if failure:
            raise failure[0]
        if self.settings.gateway_metrics_port:
            start_http_server(self.settings.gateway_metrics_port,
                              addr=os.environ.get("POSEMESH_CONTROL_HOST", "127.0.0.1"))
        log.info("gateway listening on port %d", self.port)
        return self.port

    def _serve(self, listen: str | None, ready: threading.Event, failure: list) -> None:
        try:
            asyncio.run(self._serve_async(listen, ready))
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            failure.append(exc)
            ready.set()

    async def _serve_async(self, listen: str | None, ready: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.changes = ChangeFeed(self.loop)
        self.store.listeners.append(self.changes.changed)
        self.views = LiveViews(self.settings, self.loop, self.topics.publish_viewers)
        self.topics.local_readers = self.views.reading
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)])
        tpb_grpc.add_TaskServiceServicer_to_server(TaskService(self), server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(listen or self.settings.gateway_listen)
        if not self.port:
            raise RuntimeError(f"cannot listen on {listen or self.settings.gateway_listen}")
        await server.start()
        self._stopping = asyncio.Event()
        ready.set()
        serving = None
        while not self._stopping.is_set():
            now_serving = self.broker_available()
            if now_serving != serving:  # health says whether uploads can be taken now
                status = (health_pb2.HealthCheckResponse.SERVING if now_serving
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                await self.health.set("", status)
                await self.health.set(SERVICE_NAME, status)
                serving = now_serving
            try:
                await asyncio.wait_for(self._stopping.wait(), 0.5)
            except TimeoutError:
                pass
        await self.health.enter_graceful_shutdown()
        await server.stop(2)

    def stop(self) -> None:
        self.running.clear()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopping.set)
            self._server_thread.join(10)
        if self.watch:
            self.watch.stop()
        with self.lock:
            producers = list(self.frame_producers.values())
            lives = list(self.live_sources.values())
        for live in lives:  # stopped without an end: recover() finishes them on the next start
            live.on_end = lambda *_a: None
            live.stop()
        for p in producers:  # their tasks stay RUNNING: recover() resumes them on the next start
            p.cancelled.set()
        for p in producers:
            p.join(5)
        if self.broker_available():  # unused reservations: workers let go, the next gateway deletes them
            self.reservations.release()
        if self.events:
            self.events.stop()
            self.events.join(5)
        self.producer.flush(5)
        self.store.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m posemesh.gateway", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The posemesh gRPC gateway: uploads, live tasks, task lifecycle, results.",
        epilog="Configured by environment (mesh/settings.py), chiefly:\n"
               "  POSEMESH_GATEWAY_LISTEN      host:port to serve (default 127.0.0.1:50051)\n"
               "  POSEMESH_KAFKA_BOOTSTRAP     Kafka bootstrap servers\n"
               "  POSEMESH_DATA_DIR            uploads and results (shared with annotate workers)\n"
               "  POSEMESH_API_KEYS_FILE       user:key per line (required: the gateway fails closed)\n"
               "  POSEMESH_LIVE_SOURCES        camera URL allow-list, e.g. rtsp://10.0.0.*:554\n"
               "  POSEMESH_GATEWAY_METRICS_PORT  Prometheus metrics (0: off)")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    faulthandler.enable(all_threads=True)  # a fatal signal on a Python thread says where it was
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # and a gateway that seems stuck, on demand
    try:
        gateway = Gateway()
    except KeyConfigError as exc:  # fail closed, with the reason, and no traceback to wade through
        log.error("%s", exc)
        raise SystemExit(2) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    gateway.start()
    stop.wait()
    gateway.stop()
