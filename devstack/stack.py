"""The local stack: broker, Triton, gateway and stage workers as supervised processes.

    posemesh up                # start everything, stay in the foreground; Ctrl-C stops it cleanly
    posemesh down              # stop a stack started by `up` in another terminal
    posemesh run VIDEO         # start, process one video, write the results, stop
    posemesh up --gateways 2   # several gateways on one mesh: a local PostgreSQL task store they share
    posemesh up --workers ingest=2   # uploads decoded by two ingest replicas instead of the gateway

Start order is health-checked: RTSP relay (live output, when GStreamer is installed) -> broker (port open)
-> Triton (models ready) -> gateway (gRPC health) -> workers (each started once the one before listens on its
control port); then start() waits, at most 120 s, until every worker says it serves (a stage worker does once its
consumer group has first answered), and fails naming those that do not. A process that dies is restarted
with back-off, into the same log file (RUN_DIR/logs/<name>.log). Stopping goes in reverse order: workers leave
their consumer groups first, the gateway next; the memory-only broker takes every topic with it. With an external
Kafka (--kafka HOST:PORT) topics of unfinished tasks are kept on purpose: the gateway resumes them.

With several gateways (gateway/duties.py) each has its own data directory and port (--gateway-port, then
the next free ones); they share a local PostgreSQL server (Debian's package, started first, its cluster
deleted at the end), one sealing key, and the stack's data directory as their blob store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from posemesh.devstack.broker import broker_command, broker_env
from posemesh.devstack.processes import free_port, free_ports, kill_group, stop_process
from posemesh.mesh.health import grpc_healthy
from posemesh.mesh.pipeline import INGEST, STAGE_NAMES, WORKER_NAMES
from posemesh.mesh.settings import REPO_ROOT, env

log = logging.getLogger("posemesh.stack")



class StackStopped(RuntimeError):
    """stop() came while start() was still bringing services up."""


@dataclass
class Service:
    name: str
    command: list[str]
    env: dict
    healthy: Callable[[], bool]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    stopping: bool = False
    before_start: Callable[[], object] | None = None  # at every start, restarts included
    # Once it has exited and its process group was SIGKILLed (the stack stops, or it died and starts again),
    # given the group: removes what it left that its own orderly stop would have removed.
    after_exit: Callable[[int], object] | None = None

    def start(self) -> None:
        if self.before_start is not None:
            self.before_start()
        log_file = open(self.log_path, "ab")
        log_file.write(f"\n=== {time.strftime('%H:%M:%S')} starting {self.name}: {' '.join(self.command)}\n".encode())
        log_file.flush()
        # Own process group: Ctrl-C reaches the supervisor only, which stops children in order.
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                     cwd=REPO_ROOT, start_new_session=True)
        self.started_at = time.monotonic()

    def clean_up_after_exit(self) -> None:
        """Called once it has exited and its group was SIGKILLed: what it left behind goes too. A failure is
        logged, never raised: stopping the rest of the stack matters more."""
        if self.after_exit is None:
            return
        try:
            self.after_exit(self.proc.pid)
        except Exception:  # logged with its traceback
            log.exception("cleaning up after %s", self.name)

    def wait_healthy(self, timeout: float, stopping: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if stopping.is_set():
                raise StackStopped(f"the stack was stopped while {self.name} was starting")
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} while starting; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout}s; see {self.log_path}")
            time.sleep(0.1)


@dataclass
class StackConfig:
    run_dir: Path = REPO_ROOT / "run" / "stack"
    kafka: str = ""  # external bootstrap servers; empty: start the local broker
    kafka_port: int = 0
    # Every client's consumer-group session timeout; 0: 2 s on the local broker, whose joins last half of it
    # (bench/rebalance.py), 10 s on an external one, as deploy/ sets: Apache Kafka refuses a session timeout
    # under its group.min.session.timeout.ms, 6 s by default. POSEMESH_KAFKA_SESSION_TIMEOUT_MS wins.
    kafka_session_timeout_ms: int = 0
    triton_url: str = ""  # external Triton; empty: start the local one
    triton_grpc_port: int = 0
    gateway_port: int = 0
    gateways: int = 1
    postgres: bool = False  # the task store on a local PostgreSQL even for one gateway (several always are)
    workers: dict = field(default_factory=lambda: {s: 1 for s in STAGE_NAMES})
    ort_threads: int = 1
    rtsp_port: int = 0  # the local RTSP relay for live output; -1: none
    # Live sources the gateway may read (an SSRF allow-list, see gateway/sources.py); empty: the local RTSP
    # relay's port only. Not every port of this machine: from how fast a refused camera URL was answered, a
    # user could tell which local ports are open. POSEMESH_LIVE_SOURCES in the environment wins.
    live_sources: str = ""

    def ports(self) -> None:
        """0 means any free port (each a different one)."""
        spare = iter(free_ports(4))
        self.kafka_port = self.kafka_port or next(spare)
        self.triton_grpc_port = self.triton_grpc_port or next(spare)
        self.gateway_port = self.gateway_port or next(spare)
        if self.rtsp_port == 0 or (self.rtsp_port > 0 and _port_open(self.rtsp_port)):
            self.rtsp_port = next(spare)  # 8554 taken (another stack, a camera): any free port


class Stack:
    def __init__(self, config: StackConfig):
        self.config = config
        config.ports()
        self.run_dir = config.run_dir
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.metrics_ports: dict[str, int] = {}
        self.control_ports: dict[str, int] = {}  # each worker's StageService and health
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.stop_lock = threading.Lock()
        self.bootstrap = config.kafka or f"127.0.0.1:{config.kafka_port}"
        self.triton_url = config.triton_url or f"127.0.0.1:{config.triton_grpc_port}"
        ports = [config.gateway_port, *free_ports(config.gateways - 1)]
        self.gateway_addresses = [f"127.0.0.1:{p}" for p in ports]
        self.gateway_address = ",".join(self.gateway_addresses)  # what the SDK and CLI take (POSEMESH_ADDRESS)
        self.postgres = None  # the local PostgreSQL server several gateways share
        session_timeout_ms = int(env("KAFKA_SESSION_TIMEOUT_MS", "0")) or config.kafka_session_timeout_ms or (
            10000 if config.kafka else 2000)
        self.env = dict(os.environ)
        self.env.update({
            "POSEMESH_KAFKA_BOOTSTRAP": self.bootstrap,
            "POSEMESH_TRITON_URL": self.triton_url,
            "POSEMESH_DATA_DIR": str(self.run_dir / "data"),
            "POSEMESH_GATEWAY_LISTEN": self.gateway_address,
            # The one session timeout for every client of the stack (the local broker keeps the first one a
            # group used), with heartbeats at a tenth of it.
            "POSEMESH_KAFKA_SESSION_TIMEOUT_MS": str(session_timeout_ms),
            "POSEMESH_KAFKA_HEARTBEAT_MS": env("KAFKA_HEARTBEAT_MS", str(session_timeout_ms // 10)),
            "PYTHONUNBUFFERED": "1",
        })
        relay = (f"rtsp://127.0.0.1:{config.rtsp_port},rtsp://localhost:{config.rtsp_port}"
                 if config.rtsp_port > 0 else "")
        self.env.setdefault("POSEMESH_LIVE_SOURCES", config.live_sources or relay)
        self.rtsp_url = ""
        if config.rtsp_port > 0 and not env("LIVE_PUBLISH_URL", ""):
            from posemesh.devstack import rtsp

            missing = rtsp.available()
            if missing:
                log.warning("no local RTSP relay (%s): live tasks run without RTSP output", missing)
            else:
                self.rtsp_url = f"rtsp://127.0.0.1:{config.rtsp_port}"
                self.env["POSEMESH_LIVE_PUBLISH_URL"] = f"{self.rtsp_url}/publish/{{task}}"
                self.env["POSEMESH_LIVE_STREAM_URL"] = f"{self.rtsp_url}/live/{{task}}"
        if config.workers.get(INGEST):  # ingest replicas decode the uploads, not the gateway
            self.env["POSEMESH_INGEST"] = "stage"
        if not self.env.get("POSEMESH_API_KEYS") and not self.env.get("POSEMESH_API_KEYS_FILE"):
            # The gateway fails closed without keys; the local stack opts in to the development key.
            self.env["POSEMESH_API_KEYS"] = "dev:posemesh-dev-key"

    def _add(self, name: str, command: list[str], healthy: Callable[[], bool], timeout: float, env=None,
             before_start: Callable[[], object] | None = None,
             after_exit: Callable[[int], object] | None = None) -> Service:
        service = Service(name, command, env or self.env, healthy, self.logs / f"{name}.log",
                          before_start=before_start, after_exit=after_exit)
        with self.lock:  # stop() either sees this service or this refuses to start it
            if self.stopping.is_set():
                raise StackStopped(f"the stack was stopped before {name} started")
            service.start()
            self.services.append(service)
        service.wait_healthy(timeout, self.stopping)
        log.info("%-12s started (pid %d)", name, service.proc.pid)
        return service

    def start(self) -> Stack:
        from posemesh.devstack.triton_server import TritonServer, remove_shm_regions_left_by, sweep_orphaned_shm_regions
        from posemesh.mesh.models import MODELS, is_stand_in, prepare

        try:
            if self.rtsp_url:
                from posemesh.devstack import rtsp

                self._add("rtsp", rtsp.command(self.config.rtsp_port), lambda: _port_open(self.config.rtsp_port), 20)
            if not self.config.kafka:
                self._add("broker", broker_command(self.config.kafka_port),
                          lambda: _port_open(self.config.kafka_port), 15, env=broker_env(self.env))
            if not self.config.triton_url:
                onnx_dir = REPO_ROOT / "run" / "onnx"
                prepare(onnx_dir)
                stand_ins = [name for name in MODELS if is_stand_in(onnx_dir, name)]
                if stand_ins:  # served (the tests use them) but refused for users' tasks
                    self.env["POSEMESH_DISABLED_POSE_MODELS"] = ",".join(stand_ins)
                    log.warning("untrained stand-in served for %s: tasks asking for it are refused", stand_ins)
                triton = TritonServer(onnx_dir, self.run_dir / "triton", grpc_port=self.config.triton_grpc_port,
                                      ort_threads=self.config.ort_threads)
                from posemesh.devstack.triton_server import TritonInstall

                cmd, env = triton.command(TritonInstall.find())
                # A Triton killed (or stopped while it loads its models) leaves its stubs' regions in /dev/shm:
                # removed once it is gone, and older ones nobody maps (a stack killed outright) before it starts.
                self._add("triton", cmd, lambda: _triton_ready(self.triton_url), 180, env=env,
                          before_start=sweep_orphaned_shm_regions,
                          after_exit=lambda pgid: remove_shm_regions_left_by(triton.shm_prefix, pgid))
            self._start_gateways()
            for stage, count in self.config.workers.items():
                for i in range(count):
                    port = self.control_ports[f"{stage}-{i}"] = free_port()
                    self.metrics_ports[f"{stage}-{i}"] = free_port()
                    # Started one after another, serving in parallel: each joins its group meanwhile.
                    self._add(f"{stage}-{i}",
                              [sys.executable, "-m", "posemesh.stages", stage, "--control-port", str(port),
                               "--metrics-port", str(self.metrics_ports[f"{stage}-{i}"])],
                              lambda p=port: _port_open(p), 120)
            self._wait_for_workers_serving()
        except BaseException:
            self.stop()
            raise
        self._write_state()
        threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()
        return self

    def _wait_for_workers_serving(self, timeout: float = 120.0) -> None:
        """Until every worker says it serves (GetStatus.problem empty, what its health says within 0.5 s), which a
        stage worker says once its consumer group has first answered (for the reserved task ids' topics, or for
        posemesh.idle alone): an upload right after start() waited for the last worker's join before, its first
        annotated frame 1.8 s after the upload's end (0.5-0.8 s with the wait, bench/README.md). The workers are all
        started first, so their joins overlap, and asked in parallel: one still starting answers nothing for its
        whole deadline (it listens before it serves)."""
        services = {service.name: service for service in self.services}
        waiting = dict(self.control_ports)
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(max(len(waiting), 1)) as pool:  # one for the whole wait, not one a round
            while waiting:
                if self.stopping.is_set():
                    raise StackStopped("the stack was stopped while its workers joined their consumer groups")
                for name in waiting:
                    service = services[name]
                    if service.proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {service.proc.returncode} while starting; see "
                                           f"{service.log_path}")
                problems = dict(zip(waiting, pool.map(lambda port: _worker_problem(f"127.0.0.1:{port}"),
                                                      waiting.values())))
                waiting = {name: port for name, port in waiting.items() if problems[name]}
                if waiting and time.monotonic() > deadline:
                    raise TimeoutError(f"not serving after {timeout:.0f} s: " + "; ".join(
                        f"{name} ({problems[name]}, see {services[name].log_path})" for name in sorted(waiting)))
                if waiting:
                    time.sleep(0.1)

    def _start_gateways(self) -> None:
        """One gateway on the stack's data directory (SQLite), or several on a PostgreSQL store they share."""
        if len(self.gateway_addresses) == 1 and not self.config.postgres:
            self.metrics_ports = {"gateway": free_port()}
            self._add("gateway", [sys.executable, "-m", "posemesh.gateway"],
                      lambda: grpc_healthy(self.gateway_address), 60,
                      env={**self.env, "POSEMESH_GATEWAY_METRICS_PORT": str(self.metrics_ports["gateway"])})
            return
        from cryptography.fernet import Fernet

        from posemesh.devstack.postgres import LocalPostgres

        self.postgres = LocalPostgres(log_path=self.logs / "postgres.log").start()
        if self.stopping.is_set():  # stop() may have looked for it before it was there: start() stops it
            raise StackStopped("the stack was stopped while PostgreSQL was starting")
        key = self.run_dir / "secrets.key"
        if not key.exists():
            key.write_text(Fernet.generate_key().decode() + "\n")
            key.chmod(0o600)
        shared = {**self.env, "POSEMESH_STORE_URL": self.postgres.url, "POSEMESH_SECRETS_KEY_FILE": str(key),
                  "POSEMESH_BLOB_URL": self.env.get("POSEMESH_BLOB_URL") or f"file://{self.run_dir / 'data'}"}
        self.env["POSEMESH_BLOB_URL"] = shared["POSEMESH_BLOB_URL"]  # the workers' too
        self.env["POSEMESH_SECRETS_KEY_FILE"] = str(key)  # ingest replicas open the camera URLs the gateways seal
        for i, address in enumerate(self.gateway_addresses):
            name = f"gateway-{i}"
            self.metrics_ports[name] = free_port()
            self._add(name, [sys.executable, "-m", "posemesh.gateway"], lambda a=address: grpc_healthy(a), 60,
                      env={**shared, "POSEMESH_GATEWAY_LISTEN": address, "POSEMESH_DATA_DIR": str(self.run_dir / name),
                           "POSEMESH_GATEWAY_METRICS_PORT": str(self.metrics_ports[name])})

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "gateway": self.gateway_address, "kafka": self.bootstrap,
                 "triton": self.triton_url, "rtsp": self.rtsp_url, "logs": str(self.logs),
                 "postgres": self.postgres.url if self.postgres else "",
                 "services": {s.name: s.proc.pid for s in self.services},
                 "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()},
                 "control": {name: f"127.0.0.1:{port}" for name, port in self.control_ports.items()}}
        (self.run_dir / "stack.json").write_text(json.dumps(state, indent=2))

    def _supervise(self) -> None:
        """Restart what dies, with back-off (1, 2, 4 ... 30 s); a process that ran a minute starts over at 1 s."""
        while not self.stopping.is_set():
            with self.lock:
                dead = [s for s in self.services if s.proc.poll() is not None and not s.stopping]
            for service in dead:
                if self.stopping.is_set():
                    return
                ran = time.monotonic() - service.started_at
                service.restarts = 0 if ran > 60 else service.restarts + 1
                delay = min(30.0, 2 ** max(service.restarts - 1, 0)) if service.restarts else 1.0
                log.warning("%s exited with %s after %.0fs; restarting in %.0fs (see %s)", service.name,
                            service.proc.returncode, ran, delay, service.log_path)
                time.sleep(delay)
                if self.stopping.is_set():
                    return
                kill_group(service.proc.pid)  # what the dead process started (Triton's stubs) goes too
                service.clean_up_after_exit()
                with self.lock:  # as in _add: stop() either sees the new process or it is not started
                    if self.stopping.is_set():
                        return
                    service.start()
            if dead:
                self._write_state()
            time.sleep(0.5)

    def stop(self) -> None:
        """Reverse start order: workers, gateway, Triton, broker. Nothing is left running. Safe to call again,
        and from another thread than start()'s: each call stops what is still running."""
        self.stopping.set()
        with self.stop_lock:
            self._stop()

    def _stop(self) -> None:
        with self.lock:
            services = list(reversed(self.services))
        for s in services:
            s.stopping = True
        workers = [s for s in services if s.name.split("-")[0] in WORKER_NAMES]
        for s in workers:  # workers in parallel: each leaves its group and drops partial outputs
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in workers:
            stop_process(s.proc, grace=15)
        for s in services:
            if s not in workers:
                stop_process(s.proc, grace=15)
            kill_group(s.proc.pid)  # nothing a service started outlives the stack
            s.clean_up_after_exit()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        state = self.run_dir / "stack.json"
        state.unlink(missing_ok=True)
        log.info("stack stopped")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _worker_problem(address: str) -> str:
    """Why the worker serving StageService at `address` is not serving ("" when it is)."""
    from posemesh.v1 import stage_service_pb2 as spb
    from posemesh.v1 import stage_service_pb2_grpc as spb_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            return spb_grpc.StageServiceStub(channel).GetStatus(spb.GetStatusRequest(), timeout=1.0).problem
    except grpc.RpcError as e:
        return f"no answer: {e.code().name}"


def _triton_ready(url: str) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        return grpcclient.InferenceServerClient(url).is_server_ready()
    except Exception:  # noqa: BLE001 - a health probe: any failure means not ready yet
        return False


def serve(config: StackConfig, work: Callable[[Stack], int | None]) -> int:
    """Start a stack, run `work(stack)` on it, stop it; SIGINT or SIGTERM stops it at any moment, even while it
    is starting. `work` returns an exit status, or None to keep the stack up until a signal comes.

    The main thread only waits: start() and `work` run on a helper thread. A signal handler that raises in a
    thread inside a gRPC call (a health check, an upload) can leave that channel's close() deadlocked
    (grpc/grpc#19973), and then nothing would stop the stack: a CI run saw `posemesh run` ignore SIGTERM."""
    stack = Stack(config)
    signalled: list[int] = []
    wake = threading.Event()
    outcome: dict = {}

    def on_signal(signum, _frame) -> None:
        signalled.append(signum)
        wake.set()

    def body() -> None:
        try:
            stack.start()
            outcome["started"] = True
            code = work(stack)
            if code is None:
                outcome["serving"] = True  # a signal is how this ends: a clean stop, status 0
            else:
                outcome["code"] = code
                wake.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            outcome["error"] = exc
            wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    helper = threading.Thread(target=body, name="stack-work", daemon=True)
    helper.start()
    while not wake.wait(0.5):  # a timed wait: the handler runs between waits
        pass
    stack.stop()
    if signalled:
        if not outcome.get("started"):  # start() fails fast now and stops what it started late (PostgreSQL)
            helper.join(30)
            stack.stop()
        code = 0 if outcome.get("serving") else 128 + signalled[0]
        if helper.is_alive():  # inside a gRPC call that could hang the interpreter's exit too
            log.info("stopped by signal %d", signalled[0])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    if "error" in outcome and not isinstance(outcome["error"], StackStopped):
        raise outcome["error"]
    return outcome.get("code", 1)


def up(config: StackConfig) -> int:
    def announce(stack: Stack) -> None:
        print(f"posemesh is up: gateway {stack.gateway_address} "
              "(API key posemesh-dev-key unless POSEMESH_API_KEYS is set)")
        if len(stack.gateway_addresses) > 1:
            print(f"{len(stack.gateway_addresses)} gateways: give clients every address, e.g. "
                  f"POSEMESH_ADDRESS={stack.gateway_address}")
        if stack.rtsp_url:
            print(f"live output: annotated live tasks play at {stack.rtsp_url}/live/<task>")
        print(f"logs in {stack.logs}; Ctrl-C or `posemesh down` stops it", flush=True)

    return serve(config, announce)


def down(run_dir: Path) -> int:
    state_file = run_dir / "stack.json"
    if not state_file.exists():
        print(f"no stack running from {run_dir}")
        return 1
    pid = json.loads(state_file.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state_file.unlink(missing_ok=True)
        print("the stack's supervisor was not running; removed its stale state file")
        return 1
    for _ in range(300):
        if not state_file.exists():
            print("stack stopped")
            return 0
        time.sleep(0.1)
    print("the stack did not stop within 30 s")
    return 1
