"""Wires the gateway together: task store, Kafka producer, topic manager, event reader, frame producers,
the gRPC server with health and reflection, start-up recovery and the periodic sweep."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from confluent_kafka import Producer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from posemesh import kafka
from posemesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from posemesh import media
from posemesh.gateway.auth import Authenticator, KeyConfigError, load_keys
from posemesh.gateway.limits import UserLimits
from posemesh.gateway.events import EventReader
from posemesh.gateway.metrics import TASKS_ENDED, TOPICS_DELETED
from posemesh.gateway.producer import FrameProducer
from posemesh.gateway.service import UPLOAD_FILE, TaskService
from posemesh.gateway.store import ACTIVE, TaskStore, now_us
from posemesh.gateway.topics import TopicManager

log = logging.getLogger("posemesh.gateway")

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["TaskService"].full_name
# A running task with no progress from any stage for this long is failed rather than left running.
STALL_TIMEOUT_S = 600.0


class Gateway:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.results_dir.mkdir(parents=True, exist_ok=True)
        self.auth = Authenticator(load_keys(self.settings.api_keys, self.settings.api_keys_file))
        self.store = TaskStore(self.settings.db_path)
        self.limits = UserLimits(self.settings.max_active_tasks_per_user, self.settings.max_streams_per_user,
                                 self.store.count_active)
        self.producer = Producer(kafka.producer_config(self.settings, "gateway"))
        self.topics = TopicManager(self.settings, self.producer, self.store)
        self.events = EventReader(self.settings, self.store, self.topics, self.complete, self.fail)
        self.frame_producers: dict[str, FrameProducer] = {}
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.server: grpc.Server | None = None
        self.port = 0

    # ------------------------------------------------------------------ task lifecycle

    def start_task(self, task: tpb.Task, path: Path) -> None:
        """Topics first (explicitly, with their partition counts), then tell the workers, then frames."""
        self.topics.create(task.task_id)
        self.topics.publish_started(task)
        self.store.transition(task.task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
        self._start_producer(task, path)
        log.info("task %s started: topics created, workers told, frames flowing", task.task_id)

    def _start_producer(self, task: tpb.Task, path: Path) -> None:
        task_id = task.task_id

        def on_done(count: int, skipped: int) -> None:
            self.store.set_columns(task_id, produced=1, frames_total=count)
            if skipped:
                warning = f"{skipped} damaged packets of the video could not be decoded and were skipped"
                self.store.update(task_id, lambda t: None if warning in t.warnings else t.warnings.append(warning))

        producer = FrameProducer(
            task, path, self.producer, kafka.partitions_for(kafka.RAW_FRAMES, self.settings),
            self.settings.jpeg_quality,
            on_progress=lambda n: self.store.add_progress(task_id, "decode", "gateway", n),
            on_done=on_done, on_error=lambda msg: self.fail(task_id, msg),
            frames_consumed=lambda: self.store.frames_done(task_id, "detect"),
            max_ahead=self.settings.max_frames_ahead, limits=media.Limits.from_settings(self.settings))
        with self.lock:
            self.frame_producers[task_id] = producer
        producer.start()

    def _end(self, task_id: str, state: int, message: str = "") -> tpb.Task | None:
        task = self.store.transition(task_id, state, message)
        if task is None:
            return None  # already terminal: the first ending wins
        with self.lock:
            producer = self.frame_producers.pop(task_id, None)
        if producer:
            producer.cancelled.set()
        try:
            self.topics.publish_ended(task_id, state)
        except Exception:
            log.exception("could not announce the end of %s; the sweep retries", task_id)
        shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)  # the upload is not needed any more
        log.info("task %s %s %s", task_id, tpb.TaskState.Name(state), message)
        TASKS_ENDED.labels(tpb.TaskState.Name(state).removeprefix("TASK_STATE_").lower()).inc()
        return task

    def abandon(self, task_id: str) -> None:
        """Undo a task that could not be started (the broker is down): no row, no topic, no file remains."""
        with self.lock:
            producer = self.frame_producers.pop(task_id, None)
        if producer:
            producer.cancelled.set()
        try:
            kafka.delete_topics(self.topics.admin, kafka.task_topics(task_id), timeout=5)
        except Exception:  # the broker is down: nobody read them, the orphan sweep deletes them later
            log.warning("could not delete the topics of abandoned task %s now; the orphan sweep will", task_id)
        self.store.purge(task_id)
        shutil.rmtree(self.settings.jobs_dir / task_id, ignore_errors=True)

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

    # ------------------------------------------------------------------ recovery and the sweep

    def recover(self) -> None:
        """After a restart: resume what can be resumed, fail what cannot. Nothing stays RUNNING forever."""
        on_broker = kafka.list_task_topics(self.topics.admin)
        for row in self.store.rows("state IN (?, ?) AND deleted = 0", tuple(ACTIVE)):
            task = tpb.Task.FromString(row["task"])
            path = self.settings.jobs_dir / task.task_id / UPLOAD_FILE
            path = path if path.exists() else None
            topics_intact = len(on_broker.get(task.task_id, [])) == len(kafka.TASK_TOPIC_PREFIXES)
            if row["produced"] and topics_intact:
                log.info("task %s: frames all published before the restart; waiting for the stages", task.task_id)
                self.topics.publish_started(task)
            elif path is not None:
                # Republish from frame 0: the stages drop frames they have already seen, by index. If the
                # broker lost the topics (the local one keeps them in memory only), they are made anew.
                log.info("task %s: resuming the frame producer after a restart", task.task_id)
                self.topics.create(task.task_id)
                self.topics.publish_started(task)
                self.store.transition(task.task_id, tpb.TASK_STATE_RUNNING, from_states={tpb.TASK_STATE_QUEUED})
                self._start_producer(task, path)
            else:
                self.fail(task.task_id, "the gateway restarted while the upload was being processed and the upload "
                                        "file is gone; please upload again")
        orphans = self.topics.find_orphans()
        if orphans:
            log.info("found %d tasks' topics without a live task; they will be deleted", len(orphans))

    def sweep_once(self) -> None:
        deleted = self.topics.sweep()
        TOPICS_DELETED.inc(len(deleted))
        for task_id in deleted:  # no worker reads the task any more: what a crashed one left goes too
            shutil.rmtree(self.settings.results_dir / f".partial-{task_id}", ignore_errors=True)
        stalled_before = now_us() - int(STALL_TIMEOUT_S * 1e6)
        for row in self.store.rows("state = ? AND last_progress_us < ?", (tpb.TASK_STATE_RUNNING, stalled_before)):
            self.fail(row["task_id"], f"no stage made progress for {STALL_TIMEOUT_S:.0f} s")

    def _sweep_loop(self) -> None:
        while self.running.is_set():
            try:
                self.sweep_once()
            except Exception:
                log.exception("sweep failed; retrying")
            time.sleep(0.5)

    # ------------------------------------------------------------------ serving

    def start(self, listen: str | None = None) -> int:
        kafka.ensure_shared_topics(self.settings)
        self.running.set()
        self.events.start()
        self.recover()
        threading.Thread(target=self._sweep_loop, name="sweep", daemon=True).start()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                                  options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)])
        tpb_grpc.add_TaskServiceServicer_to_server(TaskService(self), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.port = self.server.add_insecure_port(listen or self.settings.gateway_listen)
        if not self.port:
            raise RuntimeError(f"cannot listen on {listen or self.settings.gateway_listen}")
        self.server.start()
        if self.settings.gateway_metrics_port:
            start_http_server(self.settings.gateway_metrics_port, addr=os.environ.get("POSEMESH_CONTROL_HOST", "127.0.0.1"))
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway listening on port %d", self.port)
        return self.port

    def stop(self) -> None:
        self.running.clear()
        if self.server:
            self.health.enter_graceful_shutdown()
            self.server.stop(grace=2).wait()
        with self.lock:
            producers = list(self.frame_producers.values())
        for p in producers:  # their tasks stay RUNNING: recover() resumes them on the next start
            p.cancelled.set()
        for p in producers:
            p.join(5)
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
