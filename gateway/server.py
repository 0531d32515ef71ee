"""Wires the gateway together: settings, task store, Kafka producer, topic manager, reservations, event reader,
broker watch, the grpc.aio server with health and reflection, metrics, the periodic sweep, and the leases
that let several gateways serve one mesh (gateway/duties.py: what the gateway holding the mesh duties does
more). What happens to a task (started, run again, ended, cleaned up) is the task lifecycle's
(posemesh.gateway.lifecycle).

Threads: the gRPC server's event loop (one thread, every call a coroutine), the event reader, the broker
watch, the sweep, the duties, the store's listener (PostgreSQL: other gateways' changes), and one frame
producer or live source per task whose frames are being published.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
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
from posemesh.gateway.duties import GATEWAY_LEASE, Duties, gateway_id
from posemesh.gateway.events import EventReader
from posemesh.gateway.lifecycle import TaskLifecycle
from posemesh.gateway.limits import UserLimits
from posemesh.gateway.live_view import LiveViews
from posemesh.gateway.reservations import Reservations
from posemesh.gateway.service import TaskService
from posemesh.gateway.sources import Source, SourcePolicy
from posemesh.gateway.store import TaskStore
from posemesh.gateway.topics import TopicManager
from posemesh.gateway.webhooks import WebhookPolicy, WebhookSender
from posemesh.mesh import kafka, pauses, tracing
from posemesh.mesh.at_rest import KeyFileError, SecretBox, private_dir
from posemesh.mesh.health import LIVENESS
from posemesh.mesh.settings import Settings
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc

log = logging.getLogger("posemesh.gateway")

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["TaskService"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# How often the holder of the mesh duties lists the broker's topics for orphans (a dead gateway's reserved
# ids, topics of tasks that could not start while the broker was away).
ORPHAN_SCAN_S = 30.0


class Gateway:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.ingest_stage()  # a wrong POSEMESH_INGEST stops the gateway here, saying so
        private_dir(self.settings.data_dir)  # not readable by other users (the gateway's and annotate's files)
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.auth = Authenticator(load_keys(self.settings.api_keys, self.settings.api_keys_file))
        try:
            self.source_policy = SourcePolicy(self.settings.live_sources)
        except ValueError as exc:
            raise KeyConfigError(f"POSEMESH_LIVE_SOURCES: {exc}") from None
        try:
            webhook_policy = WebhookPolicy(self.settings.webhook_targets)
        except ValueError as exc:
            raise KeyConfigError(f"POSEMESH_WEBHOOK_TARGETS: {exc}") from None
        self.views: LiveViews | None = None
        try:
            self.store = TaskStore(self.settings.store_location, SecretBox.for_settings(self.settings))
        except KeyFileError as exc:
            raise KeyConfigError(str(exc)) from None
        self.limits = UserLimits(self.settings.max_active_tasks_per_user, self.settings.max_streams_per_user,
                                 self.store)
        self.id = gateway_id(self.settings.data_dir)
        self.producer = self._new_producer()
        self.topics = TopicManager(self.settings, self.producer, self.store)
        self.reservations = Reservations(self.topics, self.settings.reserved_tasks, self.settings.reserve_quiet_s,
                                         self.store, self.id)
        self.topics.is_reserved = self._reserved
        self.lifecycle = TaskLifecycle(self.settings, self.store, self.topics, self.reservations, self.source_policy,
                                       self.id)
        self.store.remote_listeners.append(self.lifecycle.heard_elsewhere)
        self.blobs = self.lifecycle.blobs
        self.activity = self.lifecycle.activity  # what GetStats reports (gateway/stats.py)
        self.webhook_policy = webhook_policy
        self.webhooks: WebhookSender | None = None  # ended tasks' webhooks, sent by the duties' holder
        self.duties = Duties(self.store, self.id, self._gain_duties, self._lose_duties, self._duty_round)
        self.listening = threading.Event()  # set: stop hearing the other gateways' changes
        self.incarnation: str | None = None
        self._orphans_looked = -ORPHAN_SCAN_S
        self.events: EventReader | None = None
        self.watch: BrokerWatch | None = None
        self.running = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.changes: ChangeFeed | None = None
        self.port = 0

    def _new_producer(self) -> Producer:
        return Producer({**kafka.producer_config(self.settings, "gateway"),
                         "error_cb": lambda err: log.debug("producer: %s", err)})

    def _start_events(self) -> None:
        """(Re)start the event reader: applying the events when this gateway holds the mesh duties."""
        if self.events is not None:
            self.events.stop()
            self.events.join(5)
        self.events = EventReader(self.settings, self.store, self.topics, self.lifecycle.complete,
                                  self.lifecycle.fail, self.incarnation, self.activity, applying=self.duties.holding,
                                  ingest=self.lifecycle)
        self.events.start()

    def _reserved(self, task_id: str) -> bool:
        """A task id this gateway, or another live one, reserved: its topics are no orphans."""
        return task_id in self.reservations or self.store.reserved_by_live_gateway(task_id, GATEWAY_LEASE)

    # ------------------------------------------------------------------ the mesh duties (gateway/duties.py)

    def _gain_duties(self) -> None:
        self.topics.started = time.time()  # hear every live worker for a liveness window before deleting
        if self.running.is_set():
            self._start_events()
        self.webhooks = WebhookSender(self.settings, self.store, self.webhook_policy, self.blobs)
        self.webhooks.start()  # pending deliveries of an earlier gateway included

    def _lose_duties(self) -> None:
        if self.webhooks is not None:
            self.webhooks.stop()  # attempts under way stay due: the next holder sends them again
            self.webhooks = None
        if self.running.is_set():
            self._start_events()

    def _duty_round(self) -> None:
        """What the duties' holder does each round besides the sweep: take over dead gateways' tasks, and now
        and then look for orphaned topics (a listing of the broker's topics: not every round)."""
        if not self.broker_available():
            return
        self.lifecycle.take_over()
        if time.monotonic() - self._orphans_looked > ORPHAN_SCAN_S:
            self.topics.find_orphans()
            self._orphans_looked = time.monotonic()

    def stream_url(self, task: tpb.Task) -> str:
        return self.lifecycle.stream_url(task)

    def broker_available(self) -> bool:
        return self.watch is None or self.watch.available

    # ------------------------------------------------------------------ what the TaskService asks for

    def start_task(self, task: tpb.Task, path: Path) -> None:
        self.lifecycle.start(task, path)

    def start_live_task(self, task: tpb.Task, source: Source, transport: int) -> None:
        self.lifecycle.start_live(task, source, transport)

    def abandon(self, task_id: str) -> None:
        self.lifecycle.abandon(task_id)

    def cancel(self, task_id: str, reason: str) -> tpb.Task | None:
        return self.lifecycle.cancel(task_id, reason)

    def delete(self, task_id: str) -> None:
        self.lifecycle.delete(task_id)

    # ------------------------------------------------------------------ the broker lost its data

    def on_broker_reset(self, incarnation: str) -> None:
        """The broker lost its data: frames stop, new Kafka clients, and the task lifecycle runs every active
        task again from its first frame under a new epoch."""
        self.lifecycle.halt()
        kafka.SPARE_PRODUCERS.clear()
        self.lifecycle.make_producers_ready()
        with self.topics.publish_lock:
            old = self.producer
            self.producer = self._new_producer()
            self.topics.producer = self.producer
            old.purge()
        self.topics.forget_readers()
        self.reservations.forget()
        self.incarnation = incarnation
        self._start_events()
        self.lifecycle.run_again()

    # ------------------------------------------------------------------ the sweep

    def _sweep_loop(self) -> None:
        while self.running.is_set():
            try:
                if self.broker_available():
                    answering = self.watch.answering_since if self.watch else None
                    self.lifecycle.sweep(duties=self.duties.holding, answering_since=answering)
                    self.reservations.maintain()
            except Exception:
                log.exception("sweep failed; retrying")
            time.sleep(0.5)

    # ------------------------------------------------------------------ serving

    def start(self, listen: str | None = None) -> int:
        kafka.ensure_shared_topics(self.settings)
        self.lifecycle.make_producers_ready()
        self.incarnation = kafka.incarnation(self.topics.admin)
        self.duties.renew()  # the leases before anything else: alone on the store, the duties are this gateway's
        self.running.set()
        self._start_events()
        self.watch = BrokerWatch(self.settings, self.on_broker_reset, self.incarnation)
        self.lifecycle.recover()
        if self.store.shared:
            self.store.hear_other_gateways(self.listening)
        self.duties.start()
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
                              addr=self.settings.control_host)
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
        server = grpc.aio.server(interceptors=TaskService.interceptors(self),
                                 options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)])
        tpb_grpc.add_TaskServiceServicer_to_server(TaskService(self), server)
        self.health = health.aio.HealthServicer()
        # grpc's servicer says SERVING for "" until told otherwise: nothing is until the broker was looked at.
        for name in ("", SERVICE_NAME, LIVENESS):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(listen or self.settings.gateway_listen)
        if not self.port:
            raise RuntimeError(f"cannot listen on {listen or self.settings.gateway_listen}")
        await server.start()
        # Alive while the server runs: not ready without a broker (below), but a restart would not bring one.
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
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
        self.lifecycle.halt(join_s=5)  # the tasks stay RUNNING: recover() goes on with them at the next start
        if self.broker_available():  # unused reservations: workers let go, the next gateway deletes them
            self.reservations.release()
        self.duties.stop()  # the leases given up: another gateway takes the duties and this one's tasks at once
        self.listening.set()
        if self.events:
            self.events.stop()
            self.events.join(5)
        self.producer.flush(5)
        self.limits.close()
        self.store.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m posemesh.gateway", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The posemesh gRPC gateway: uploads, live tasks, task lifecycle, results.",
        epilog="Configured by environment (mesh/settings.py), chiefly:\n"
               "  POSEMESH_GATEWAY_LISTEN      host:port to serve (default 127.0.0.1:50051)\n"
               "  POSEMESH_KAFKA_BOOTSTRAP     Kafka bootstrap servers\n"
               "  POSEMESH_DATA_DIR            its task store and uploads as they arrive (and the results, unless\n"
               "                               POSEMESH_BLOB_URL names object storage: s3://bucket/prefix)\n"
               "  POSEMESH_API_KEYS_FILE       user:key per line (required: the gateway fails closed)\n"
               "  POSEMESH_SECRETS_KEY_FILE    key(s) sealing stored camera URLs (default: DATA_DIR/secrets.key)\n"
               "  POSEMESH_LIVE_SOURCES        camera URL allow-list, e.g. rtsp://10.0.0.*:554\n"
               "  POSEMESH_GATEWAY_METRICS_PORT  Prometheus metrics (0: off)")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    pauses.start()
    faulthandler.enable(all_threads=True)  # a fatal signal on a Python thread says where it was
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # and a gateway that seems stuck, on demand
    tracing.setup("posemesh-gateway")
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
    tracing.shutdown()
