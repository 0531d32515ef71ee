"""Start a local PostgreSQL server: Debian's `postgresql` package (make system-deps), a throw-away cluster.

For the tests of the task store's PostgreSQL backend and for several gateways sharing one store. The
cluster lives in a folder of its own, listens on 127.0.0.1 and a free port, trusts local connections (no
password: nothing but this machine reaches it) and is deleted when the server stops. PostgreSQL refuses
to run as root, so as root the server runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from posemesh.devstack.processes import free_port, stop_process, wait_for_port

USER = "posemesh"


def server_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian keeps them in /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError("PostgreSQL is not installed (Debian: `make system-deps` installs `postgresql`)")


class LocalPostgres:
    """A PostgreSQL server on a free port of this machine, with one database, `posemesh`."""

    def __init__(self, port: int | None = None, log_path: Path | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.root: Path | None = None

    @property
    def url(self) -> str:
        return self.database_url("posemesh")

    def database_url(self, name: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def start(self, timeout: float = 60.0) -> LocalPostgres:
        bin_dir = server_bin_dir()
        # Not under pytest's temporary folder: that is private to root, and the server runs as `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="posemesh-pg-"))
        data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(self._as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                                             "--encoding=UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # fsync off: a test cluster that dies is thrown away anyway; it keeps the tests quick on slow disks.
        self.proc = subprocess.Popen(
            self._as_server_user([str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                                  "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                                  "-c", "fsync=off", "-c", "max_connections=200"]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout)
        self.create_database("posemesh")
        return self

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        import psycopg

        tries = 50
        for attempt in range(tries):  # the port opens a moment before the server accepts logins
            try:
                with psycopg.connect(self.database_url("postgres"), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return self.database_url(name)
            except psycopg.OperationalError:
                if attempt == tries - 1:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, grace=15)
            self.proc = None
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
