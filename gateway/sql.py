"""The task store's two SQL databases: SQLite (embedded, one gateway) and PostgreSQL (shared by gateways).

gateway/store.py writes its SQL once, in the dialect both accept (`?` placeholders, the `"user"` column
quoted, `BIGINT` times, `ON CONFLICT ... DO UPDATE`); a Database here runs it on one of them:

- `SQLiteDatabase`: a file in the gateway's data directory, WAL mode. A write transaction is
  BEGIN IMMEDIATE: one writer at a time.
- `PostgresDatabase` (POSEMESH_STORE_URL=postgresql://...): placeholders become psycopg's, BLOB becomes
  BYTEA, and every write transaction first takes one transaction-scoped advisory lock, so writers are
  serialized across every gateway on the database exactly as BEGIN IMMEDIATE serializes them on one file
  (a per-user limit checked and a task inserted in one transaction stay consistent). Written for
  PostgreSQL 13 and later (tested against Debian's 15).

Rows read both by position and by column name (`Row`). Unique-constraint violations raise `Conflict`.

Gateways sharing a PostgreSQL store hear each other's changes: a write transaction may `notify` a channel
(PostgreSQL's NOTIFY, delivered when it commits) and `listen` calls back with what other connections sent.
SQLite has one gateway, which hears its own changes directly.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

# The advisory lock every PostgreSQL write transaction takes (any constant; "posemesh" in ASCII, truncated).
WRITE_LOCK = 0x706F73656D657368 & 0x7FFFFFFFFFFFFFFF


class Conflict(Exception):
    """A write broke a unique constraint (such as one user's idempotency key used twice)."""


class Row(tuple):
    """A result row: by position, like a tuple, or by column name."""

    names: dict[str, int]

    def __new__(cls, names: dict[str, int], values):
        row = super().__new__(cls, values)
        row.names = names
        return row

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)


class Database:
    """What the task store needs of a database. Callers hold the store's lock around every use."""

    kind = ""

    def execute(self, sql: str, args: tuple | list = ()) -> list[Row]:
        """Run one statement; its rows (none for a write)."""
        raise NotImplementedError

    def one(self, sql: str, args: tuple | list = ()) -> Row | None:
        """The first row of a query, or None."""
        rows = self.execute(sql, args)
        return rows[0] if rows else None

    @contextmanager
    def write(self):
        """A write transaction, serialized with every other writer of the database."""
        raise NotImplementedError
        yield

    def notify(self, channel: str, payload: str) -> None:
        """Inside a write transaction: tell the other gateways on this database, once it commits."""

    def listen(self, channel: str, callback, stop: threading.Event) -> threading.Thread | None:
        """Call `callback(payload)` for each notification other connections send on `channel`, until `stop`
        is set (a thread, started here); None where there are no other gateways to hear (SQLite)."""
        return None

    def migrate(self, schema: str, table: str, added_columns: list[tuple[str, str]]) -> None:
        """Run the store's CREATE statements (`BLOB` written for the binary type) and add to `table` the
        columns of later versions it lacks: (name, definition)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    kind = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA secure_delete=ON")  # deleted or replaced content is overwritten with zeros

    def execute(self, sql: str, args: tuple | list = ()) -> list[Row]:
        try:
            cur = self.conn.execute(sql, tuple(args))
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc
        if cur.description is None:
            return []
        names = {d[0]: i for i, d in enumerate(cur.description)}
        return [Row(names, r) for r in cur.fetchall()]

    @contextmanager
    def write(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def migrate(self, schema: str, table: str, added_columns: list[tuple[str, str]]) -> None:
        self.conn.executescript(schema)
        present = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
        for name, definition in added_columns:
            if name not in present:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database and empty it; False when a reader kept it busy."""
        return not self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]

    def vacuum(self) -> None:
        self.conn.execute("VACUUM")

    def close(self) -> None:
        self.conn.close()


_PLACEHOLDER = re.compile(r"\?")


class PostgresDatabase(Database):
    kind = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float = 10.0):
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.conn = self._connect()
        self.in_write = threading.local()

    def _connect(self):
        # A connection the network dropped without a word (no FIN, no RST) fails within about 10 s instead of
        # the kernel's 15 minutes: every store call, a live reader's status write included, would hang that long.
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=int(self.connect_timeout_s),
                                     keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                                     tcp_user_timeout=10_000)

    def _ensure_connected(self) -> None:
        """A connection the server closed (a restart, a failover) is opened again before the next statement;
        the statement that found it broken failed with the database's error."""
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()

    def execute(self, sql: str, args: tuple | list = ()) -> list[Row]:
        if not getattr(self.in_write, "active", False):
            self._ensure_connected()
        try:
            cur = self.conn.execute(_PLACEHOLDER.sub("%s", sql), tuple(args))
        except self._psycopg.errors.UniqueViolation as exc:
            raise Conflict(str(exc)) from exc
        if cur.description is None:
            return []
        names = {d.name: i for i, d in enumerate(cur.description)}
        return [Row(names, r) for r in cur.fetchall()]

    @contextmanager
    def write(self):
        self._ensure_connected()
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            self.in_write.active = True
            try:
                yield self
            finally:
                self.in_write.active = False

    def notify(self, channel: str, payload: str) -> None:
        self.conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def listen(self, channel: str, callback, stop: threading.Event) -> threading.Thread:
        """One connection of its own, LISTENing. A connection lost (a restart, a failover) is opened again,
        and `callback(None)` then says that anything may have changed meanwhile."""
        def run() -> None:
            conn = None
            while not stop.is_set():
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = self._connect()
                        conn.execute(f"LISTEN {channel}")
                        callback(None)
                    for note in conn.notifies(timeout=0.5):
                        if note.pid != self.conn.info.backend_pid:  # not this gateway's own write
                            callback(note.payload or None)
                except self._psycopg.Error:
                    stop.wait(1.0)
                except Exception:  # a listener's own failure must not end the listening
                    logging.getLogger("posemesh.gateway").exception("store change listener failed")
            if conn is not None:
                conn.close()

        thread = threading.Thread(target=run, name=f"listen-{channel}", daemon=True)
        thread.start()
        return thread

    def migrate(self, schema: str, table: str, added_columns: list[tuple[str, str]]) -> None:
        schema = re.sub(r"\bBLOB\b", "BYTEA", re.sub(r"--[^\n]*", "", schema))
        with self.write():  # gateways starting together: one migrates, the others then find it done
            for statement in filter(str.strip, schema.split(";")):
                self.conn.execute(statement)
            for name, definition in added_columns:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {definition}")

    def close(self) -> None:
        self.conn.close()


def open_database(location: Path | str) -> Database:
    """A postgresql:// (or postgres://) URL, else the path of an SQLite file."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(text)
    return SQLiteDatabase(Path(location))
