"""Wires the gateway together: task store, Kafka producer, topic manager, event reader, frame producers,
broker watch, the grpc.aio server with health and reflection, start-up recovery and the periodic sweep.

Threads: the gRPC server's event loop (one thread, every call a coroutine), the event reader, the broker
watch, the sweep, and one frame producer per task whose frames are being published.
"""

from __future__ import annotations

import asyncio
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

from posemesh import kafka, media
from posemesh.gateway.auth import Authenticator, KeyConfigError, load_keys
from posemesh.gateway.broker_watch import BrokerWatch
from posemesh.gateway.changes import ChangeFeed
from posemesh.gateway.events import EventReader
from posemesh.gateway.limits import UserLimits
from posemesh.gateway.metrics import TASKS_ENDED, TOPICS_DELETED
from posemesh.gateway.producer import FrameProducer
from posemesh.gateway.service import UPLOAD_FILE, TaskService
from posemesh.gateway.store import ACTIVE, TERMINAL, TaskStore, now_us
from posemesh.gateway.topics import TopicManager
from posemesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc

log = logging.getLogger("posemesh.gateway")

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["TaskService"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Gateway:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.results_dir.mkdir(parents=True, exist_ok=True)
        self.auth = Authenticator(load_keys(self.settings.api_keys, self.settings.api_keys_file))
        self.store = TaskStore(self.settings.db_path)
        self.limits = UserLimits(self.settings.max_active_tasks_per_user, self.settings.max_streams_per_user,
                                 self.store.count_active)
        self.producer = self._new_producer()
        self.topics = TopicManager(self.settings, self.producer, self.store)
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

    def broker_available(self) -> bool:
        return self.watch is None or self.watch.available

    # ------------------------------------------------------------------ task lifecycle

    def start_task(self, task: tpb.Task, path: Path) -> None:
        """Topics first (explicitly, with their partition counts), then tell the workers, then frames."""
        epoch = self.store.epoch(task.task_id)
        self.topics.create(task.task_id)
        self.topics.publish_started(task, epoch)
        self.store.transition(task.task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
        self._start_producer(task, path, epoch)
        log.info("task %s started: topics created, workers told, frames flowing", task.task_id)

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
            task, path, kafka.producer_config(self.settings, "gateway"), kafka.partitions_for(kafka.RAW_FRAMES, self.settings),
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
        if producer:
            producer.cancelled.set()
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
        if producer:
            producer.cancelled.set()
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
            topics_intact = len(on_broker.get(task.task_id, [])) == len(kafka.TASK_TOPIC_PREFIXES)
            if row["produced"] and topics_intact:
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

    def _upload_of(self, task_id: str) -> Path | None:
        path = self.settings.jobs_dir / task_id / UPLOAD_FILE
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
        if self.events is not None:
            self.events.stop()
        self.events = EventReader(self.settings, self.store, self.topics, self.complete, self.fail, incarnation)
        self.events.start()
        when = time.strftime("%H:%M:%S")
        for row in self.store.rows("state IN (?, ?) AND deleted = 0", tuple(ACTIVE)):
            task_id = row["task_id"]
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
            for partial in self.settings.results_dir.glob(f".partial-{task_id}-*"):
                shutil.rmtree(partial, ignore_errors=True)
        for task_id in list(self.unannounced):
            row = self.store.rows("task_id = ?", (task_id,))
            if row:
                self._announce_end(task_id, row[0]["state"])
            else:
                self.unannounced.discard(task_id)
        timeout = self.settings.stall_timeout_s
        stalled_before = now_us() - int(timeout * 1e6)
        for row in self.store.rows("state = ? AND last_progress_us < ?", (tpb.TASK_STATE_RUNNING, stalled_before)):
            self.fail(row["task_id"], f"no frame made progress through any stage for {timeout:.0f} s")

    def _sweep_loop(self) -> None:
        while self.running.is_set():
            try:
                if self.broker_available():
                    self.sweep_once()
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
            start_http_server(self.settings.gateway_metrics_port, addr=os.environ.get("POSEMESH_CONTROL_HOST", "127.0.0.1"))
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
                status = health_pb2.HealthCheckResponse.SERVING if now_serving else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set("", status)
                await self.health.set(SERVICE_NAME, status)
                serving = now_serving
            try:
                await asyncio.wait_for(self._stopping.wait(), 0.5)
            except asyncio.TimeoutError:
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
        for p in producers:  # their tasks stay RUNNING: recover() resumes them on the next start
            p.cancelled.set()
        for p in producers:
            p.join(5)
        if self.events:
            self.events.stop()
            self.events.join(5)
        self.producer.flush(5)
        self.store.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
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
