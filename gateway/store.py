"""The task store: SQL, so tasks survive a gateway restart. SQLite in WAL mode in the gateway's data
directory by default; PostgreSQL with POSEMESH_STORE_URL=postgresql://... (gateway/sql.py runs the same SQL
on either).

Tasks are protobuf `Task` messages plus the columns the gateway queries by. Every change wakes watchers
(WatchTask, through `listeners`), so the store is also the gateway's event bus. The SQL and the column
names stay in this module: the rest of the gateway asks by name (`active_tasks`, `stalled`,
`record_ending`, ...).

What it keeps is private (mesh/at_rest.py): a live task's camera URL and a webhook's URL and secret are
stored sealed, and only while needed. On SQLite the database and its -wal and -shm files are mode 0600,
deleted content is overwritten (secure_delete), and the write-ahead log is emptied after every deletion (a
checkpoint that truncates it), so nothing of a deleted task stays in any file. On PostgreSQL a deleted row's
old versions stay in the table's pages until autovacuum reclaims them: encrypt the database's storage.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from posemesh.gateway.sql import Row, SQLiteDatabase, open_database
from posemesh.mesh.at_rest import KeyFileError, SecretBox, Unreadable, private_dir, private_file
from posemesh.mesh.pipeline import PROGRESS_STEPS
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")

TERMINAL = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}
ACTIVE = {tpb.TASK_STATE_QUEUED, tpb.TASK_STATE_RUNNING}


SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    state INTEGER NOT NULL,
    created_us BIGINT NOT NULL,
    finished_us BIGINT,
    idempotency_key TEXT,
    task BLOB NOT NULL,             -- serialized posemesh.v1.Task
    progress TEXT NOT NULL DEFAULT '{}',   -- {step: distinct frames done}, from the bitmaps in `done`
    frames_total INTEGER NOT NULL DEFAULT 0,
    produced INTEGER NOT NULL DEFAULT 0,   -- every frame is on raw_frames_<task>
    last_progress_us BIGINT,
    topics_deleted INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,    -- removed by the user; the row goes once its topics are gone
    upload_sha256 TEXT                     -- what an idempotency key was used for
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks("user", idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_user_created ON tasks("user", created_us DESC);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Which frame indices each step (decode, then every stage) has done for a task: a bitmap, so a frame
-- redone after a crash or a rebalance counts once, whichever worker did it.
CREATE TABLE IF NOT EXISTS done (
    task_id TEXT NOT NULL,
    step TEXT NOT NULL,
    bitmap BLOB NOT NULL,
    PRIMARY KEY (task_id, step)
);
-- Admission slots (gateway/limits.py): an upload being received, or a camera probed, counts against its
-- user's active-task limit on every gateway of the store. Renewed while held; a dead gateway's lapse.
CREATE TABLE IF NOT EXISTS admissions (
    slot_id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    expires_us BIGINT NOT NULL
);
-- Leases (gateway/duties.py): "gateway:<id>" says a gateway is alive; "mesh-duties" which gateway does what
-- must happen once per mesh. Renewed by their holder; one that lapses may be taken by another.
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_us BIGINT NOT NULL
);
-- Task ids a gateway reserved (gateway/reservations.py): their topics exist with no task yet, and are no
-- orphans while the gateway that reserved them is alive.
CREATE TABLE IF NOT EXISTS reserved (
    task_id TEXT PRIMARY KEY,
    gateway TEXT NOT NULL
);
"""

# Where a PostgreSQL store tells every gateway which task changed (gateway/sql.py's notify and listen).
CHANGES_CHANNEL = "posemesh_tasks"


def now_us() -> int:
    return int(time.time() * 1e6)


def timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts


# Columns added after the first release: (name, definition), added to older databases at start-up.
ADDED_COLUMNS = [("upload_sha256", "TEXT"), ("epoch", "INTEGER NOT NULL DEFAULT 0"),
                 # Live tasks: the source to read (credentials included, so sealed: SecretBox; cleared when the
                 # task ends), and how the task ends once annotate's results arrive (its source ended, broke off,
                 # or was stopped).
                 ("live_url", "TEXT"), ("live_transport", "INTEGER"), ("ending_state", "INTEGER"),
                 ("ending_message", "TEXT"), ("ending_us", "BIGINT"),
                 # Completion webhooks (gateway/webhooks.py): the callback URL and the signing secret (both
                 # sealed; cleared once delivered or given up), when the next attempt is due (NULL: none is),
                 # and the body, made once at the first attempt so every retry sends the same bytes.
                 ("webhook_url", "TEXT"), ("webhook_secret", "TEXT"), ("webhook_due_us", "BIGINT"),
                 ("webhook_body", "TEXT"),
                 # The gateway that publishes the task's frames (its upload's decoder or its camera's reader):
                 # it resumes them after its own restart; another takes them over once its lease lapses.
                 ("owner", "TEXT"),
                 # A live task's camera read by ingest replicas: the latest reader and the counts of those
                 # before it, {"reader": ..., "base": [received, dropped, reconnects]} (apply_live_read).
                 ("live_reader", "TEXT"),
                 # The partition of posemesh.ingest the current run's jobs go to (gateway/placement.py): PLACE_NEXT
                 # until its first job is written; NULL: where the task id hashes (no ingest replica was heard
                 # from, or the task is older than placement).
                 ("ingest_partition", "INTEGER")]
PLACE_NEXT = -1  # ingest_partition of a run whose first job is not placed yet


@dataclass(frozen=True)
class PendingWebhook:
    """An ended task's webhook still to deliver: what the next attempt sends, and to whom."""
    task: tpb.Task
    url: str  # credentials included (server side only); "" when it cannot be opened any more
    secret: str
    body: str  # "" until the first attempt makes it


@dataclass(frozen=True)
class ActiveTask:
    """A queued or running task and what the gateway keeps about its run: enough to run it again."""
    task: tpb.Task
    epoch: int  # the run: a new one each time the task runs again from its first frame
    produced: bool  # every frame (and the end of stream) is on raw_frames_<task>
    live_url: str  # a live task's source, credentials included (server side only); "" for an upload
    live_transport: int
    ending_state: int  # a live task whose source is done: how it ends once its results arrive (0: not yet)
    # Why a live task's stored URL cannot be opened (sealed under a key the server no longer has); its
    # live_url is then the sealed value, which says it is live and nothing more. "" when it can be read.
    live_error: str = ""


class TaskStore:
    def __init__(self, location: Path | str, secrets: SecretBox | None = None):
        """`location`: an SQLite file's path, or a postgresql:// URL (gateway/sql.py). `secrets`: what seals
        camera URLs; for SQLite by default the key file beside the database (SecretBox)."""
        if not str(location).startswith(("postgresql://", "postgres://")):
            path = Path(location)
            private_dir(path.parent)
            # SQLite gives the -wal and -shm files the database file's mode: made 0600 first, all three are.
            for existing in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if existing.exists():
                    existing.chmod(0o600)
            private_file(path)
            secrets = secrets or SecretBox.in_data_dir(path.parent)
        elif secrets is None:
            raise ValueError("a PostgreSQL task store needs the keys that seal its secrets (SecretBox.for_settings)")
        self.secrets = secrets
        self.db = open_database(location)
        self.db.migrate(SCHEMA, "tasks", ADDED_COLUMNS)
        self.lock = threading.RLock()
        self.listeners: list = []  # callables(task_id | None), told after every committed change
        self.remote_listeners: list = []  # callables(task_id | None), told of other gateways' changes only
        self.wal_dirty = False  # a deletion's old content may still be in SQLite's write-ahead log
        self._check_sealing_key()
        self._seal_plain_urls()

    def _check_sealing_key(self) -> None:
        """Every gateway of a store must seal with the same key, or one could not open what another sealed (a
        camera URL, when it takes a live task over): a gateway with another key does not start, saying so.
        (One gateway on SQLite that lost its key goes on: the tasks whose secrets it cannot open say so.)"""
        if not self.shared:
            return
        check = self.get_meta("sealing_check")
        if check is None:
            self.set_meta("sealing_check", self.secrets.seal("posemesh"))
            return
        try:
            self.secrets.open(check)
        except Unreadable:
            self.db.close()
            raise KeyFileError("the task store's secrets were sealed with a key this gateway does not have: give "
                               "every gateway of a shared store the same POSEMESH_SECRETS_KEY_FILE (a rotated key "
                               "stays readable on the file's second line)") from None

    @property
    def shared(self) -> bool:
        """Whether other gateways may use this store too (PostgreSQL)."""
        return not isinstance(self.db, SQLiteDatabase)

    def _one(self, sql: str, args: tuple = ()) -> Row | None:
        with self.lock:
            rows = self.db.execute(sql, args)
        return rows[0] if rows else None

    def _seal_plain_urls(self) -> None:
        """A database from before sealing: its camera URLs sealed, and (SQLite) every page rewritten once
        (VACUUM), so no deleted content of that time stays in the file."""
        if self.get_meta("at_rest") == "1":
            return
        plain = [(task_id, url) for task_id, url in
                 self.db.execute("SELECT task_id, live_url FROM tasks WHERE live_url IS NOT NULL")
                 if not self.secrets.sealed(url)]
        with self.transaction() as db:
            for task_id, url in plain:
                db.execute("UPDATE tasks SET live_url = ? WHERE task_id = ?", (self.secrets.seal(url), task_id))
        if isinstance(self.db, SQLiteDatabase):
            self.db.vacuum()
        self.set_meta("at_rest", "1")
        self.truncate_wal()
        if plain:
            log.info("sealed the camera URLs of %d live tasks stored in plain text by an earlier version", len(plain))

    @contextmanager
    def transaction(self, task_id: str | None = None, notify: bool = True):
        """A write transaction; afterwards the listeners hear that `task_id` (None: any task) changed,
        unless `notify` is False (a write that changes no task)."""
        with self.lock:
            with self.db.write():
                yield self.db
                if notify:  # the other gateways on a shared store hear of it when it commits
                    self.db.notify(CHANGES_CHANNEL, task_id or "")
            if self.wal_dirty:
                self.truncate_wal()
        if notify:
            for listener in self.listeners:
                listener(task_id)

    def hear_other_gateways(self, stop: threading.Event) -> None:
        """Tell the listeners of the changes other gateways make to a shared (PostgreSQL) store too."""
        def heard(task_id: str | None) -> None:
            for listener in [*self.listeners, *self.remote_listeners]:
                listener(task_id)
        self.db.listen(CHANGES_CHANNEL, heard, stop)

    def truncate_wal(self) -> None:
        """SQLite: copy the write-ahead log into the database and empty it, so the old versions of pages it
        holds (a deleted task's row among them) are gone. Busy (another connection reads): tried again after
        the next write."""
        with self.lock:
            self.wal_dirty = isinstance(self.db, SQLiteDatabase) and not self.db.checkpoint()

    # ------------------------------------------------------------------ reads

    def _task(self, row) -> tpb.Task:
        task = tpb.Task.FromString(row["task"])
        progress = json.loads(row["progress"])
        total = row["frames_total"] or task.video.frame_count
        del task.progress[:]
        for stage in PROGRESS_STEPS:
            done = int(progress.get(stage, 0))
            task.progress.add(stage=stage, frames_done=min(done, total) if total else done, frames_total=total)
        return task

    def _row(self, task_id: str):
        return self.db.one("SELECT * FROM tasks WHERE task_id = ? AND deleted = 0", (task_id,))

    def get(self, task_id: str, user: str | None = None) -> tpb.Task | None:
        with self.lock:
            row = self._row(task_id)
            if row is None or (user is not None and row["user"] != user):
                return None
            return self._task(row)

    def frames_done(self, task_id: str, stage: str) -> int:
        with self.lock:
            row = self.db.one("SELECT progress FROM tasks WHERE task_id = ?", (task_id,))
        return int(json.loads(row[0]).get(stage, 0)) if row else 0

    def by_idempotency_key(self, user: str, key: str) -> tuple[tpb.Task, str] | None:
        """The task an idempotency key was used for, and the sha256 of that upload."""
        with self.lock:
            row = self.db.one('SELECT * FROM tasks WHERE "user" = ? AND idempotency_key = ? AND deleted = 0',
                              (user, key))
            return (self._task(row), row["upload_sha256"] or "") if row else None

    def list(self, user: str, offset: int, limit: int, state: int = 0) -> tuple[list[tpb.Task], bool]:
        with self.lock:
            sql = 'SELECT * FROM tasks WHERE "user" = ? AND deleted = 0'
            args: list = [user]
            if state:
                sql += " AND state = ?"
                args.append(state)
            sql += " ORDER BY created_us DESC, task_id LIMIT ? OFFSET ?"
            rows = self.db.execute(sql, (*args, limit + 1, offset))
            return [self._task(r) for r in rows[:limit]], len(rows) > limit

    def count_active(self, user: str) -> int:
        with self.lock:
            return self.db.one('SELECT COUNT(*) FROM tasks WHERE "user" = ? AND deleted = 0 AND state IN (?, ?)',
                               (user, *ACTIVE))[0]

    def any_active(self) -> bool:
        """Whether any task of any user is queued or running."""
        with self.lock:
            return bool(self.db.one("SELECT EXISTS (SELECT 1 FROM tasks WHERE state IN (?, ?) AND deleted = 0)",
                                    tuple(ACTIVE))[0])

    def task_counts(self, user: str | None = None) -> dict[str, dict[int, int]]:
        """{user: {state: tasks}} of tasks not deleted: one user's, or everyone's (user None)."""
        sql = 'SELECT "user", state, COUNT(*) FROM tasks WHERE deleted = 0'
        args: tuple = ()
        if user is not None:
            sql, args = sql + ' AND "user" = ?', (user,)
        counts: dict[str, dict[int, int]] = {}
        with self.lock:
            for who, state, n in self.db.execute(sql + ' GROUP BY "user", state', args):
                counts.setdefault(who, {})[state] = n
        return counts

    def frames_waiting(self, steps: list[str]) -> dict[str, int]:
        """For each step but the first: the frames of running tasks the step before has done and it has not."""
        waiting = dict.fromkeys(steps[1:], 0)
        with self.lock:
            rows = self.db.execute("SELECT progress FROM tasks WHERE state = ? AND deleted = 0",
                                   (tpb.TASK_STATE_RUNNING,))
        for (progress,) in rows:
            done = json.loads(progress)
            for before, step in zip(steps, steps[1:]):
                waiting[step] += max(0, int(done.get(before, 0)) - int(done.get(step, 0)))
        return waiting

    def _select(self, sql: str, args: tuple = ()) -> list[Row]:
        with self.lock:
            return self.db.execute(sql, args)

    def active_tasks(self, owner: str | None = None) -> list[ActiveTask]:
        """Queued and running tasks (not deleted), with what it takes to run them again; those `owner`
        publishes the frames of, when given (tasks of a version that did not record it count as its)."""
        if owner is None:
            rows = self._select("SELECT * FROM tasks WHERE state IN (?, ?) AND deleted = 0", tuple(ACTIVE))
        else:
            rows = self._select("SELECT * FROM tasks WHERE state IN (?, ?) AND deleted = 0 AND "
                                "(owner = ? OR owner IS NULL)", (*ACTIVE, owner))
        return [ActiveTask(task=tpb.Task.FromString(r["task"]), epoch=r["epoch"], produced=bool(r["produced"]),
                           live_transport=r["live_transport"] or 0, ending_state=r["ending_state"] or 0,
                           **self._live_url(r["live_url"] or "")) for r in rows]

    def _live_url(self, stored: str) -> dict:
        try:
            return {"live_url": self.secrets.open(stored, "the camera URL of this live task")}
        except Unreadable as exc:
            return {"live_url": stored, "live_error": f"{exc}; start a new live task"}

    def state_of(self, task_id: str) -> int | None:
        """A task's state, also of one the user deleted whose row stays until its topics are gone."""
        rows = self._select("SELECT state FROM tasks WHERE task_id = ?", (task_id,))
        return rows[0]["state"] if rows else None

    def live_elsewhere(self, task_id: str, owner: str) -> bool:
        """Whether `task_id` is a live task whose camera another gateway than `owner` reads."""
        rows = self._select("SELECT owner, live_url FROM tasks WHERE task_id = ?", (task_id,))
        return bool(rows) and rows[0]["live_url"] is not None and rows[0]["owner"] not in (None, owner)

    def cameras_reading(self) -> list[tpb.Task]:
        """Running live tasks whose source is not done (no ending recorded): a camera is still read for them."""
        rows = self._select("SELECT task FROM tasks WHERE state = ? AND deleted = 0 AND live_url IS NOT NULL AND "
                            "ending_state IS NULL", (tpb.TASK_STATE_RUNNING,))
        return [tpb.Task.FromString(r["task"]) for r in rows]

    def is_live(self, task_id: str) -> bool:
        """Whether `task_id` is a live task that has not ended."""
        rows = self._select("SELECT live_url FROM tasks WHERE task_id = ?", (task_id,))
        return bool(rows) and rows[0]["live_url"] is not None

    def ending(self, task_id: str) -> tuple[int, str] | None:
        """How a live task whose source is done ends once its results arrive: (state, message), or None."""
        rows = self._select("SELECT ending_state, ending_message FROM tasks WHERE task_id = ?", (task_id,))
        if not rows or not rows[0]["ending_state"]:
            return None
        return rows[0]["ending_state"], rows[0]["ending_message"] or ""

    def ended_with_topics(self) -> list[tuple[str, int]]:
        """(task id, state) of ended tasks whose topics have not been deleted yet."""
        rows = self._select("SELECT task_id, state FROM tasks WHERE topics_deleted = 0 AND finished_us IS NOT NULL")
        return [(r["task_id"], r["state"]) for r in rows]

    def tasks_with_topics_due(self, ended_before_us: int) -> list[str]:
        """Tasks that ended at or before `ended_before_us` and whose topics have not been deleted yet."""
        rows = self._select("SELECT task_id FROM tasks WHERE topics_deleted = 0 AND finished_us IS NOT NULL "
                            "AND finished_us <= ?", (ended_before_us,))
        return [r["task_id"] for r in rows]

    def handles_topics_of(self, task_id: str) -> bool:
        """Whether a task in the store accounts for `task_id`'s topics: an active task, or an ended one whose
        topics the sweep has yet to delete. Topics of any other id are orphans."""
        rows = self._select("SELECT state, topics_deleted FROM tasks WHERE task_id = ?", (task_id,))
        return bool(rows) and (rows[0]["state"] not in TERMINAL or not rows[0]["topics_deleted"])

    def endings_overdue(self, source_done_before_us: int) -> list[tuple[str, int, str]]:
        """(task id, state, message) of running live tasks whose source was done before
        `source_done_before_us` and whose results have not come."""
        rows = self._select("SELECT task_id, ending_state, ending_message FROM tasks WHERE state = ? AND "
                            "ending_state IS NOT NULL AND ending_us < ?",
                            (tpb.TASK_STATE_RUNNING, source_done_before_us))
        return [(r["task_id"], r["ending_state"], r["ending_message"] or "") for r in rows]

    def progress_now(self, task_ids: list[str]) -> None:
        """Count now as the last progress of these running tasks (their upload waits for a decoding slot)."""
        if not task_ids:
            return
        now = now_us()
        with self.transaction(None, notify=False) as db:
            for task_id in task_ids:
                db.execute("UPDATE tasks SET last_progress_us = ? WHERE task_id = ? AND state = ?",
                           (now, task_id, tpb.TASK_STATE_RUNNING))

    def stalled(self, no_progress_since_us: int) -> list[str]:
        """Running tasks none of whose steps has made progress since `no_progress_since_us`."""
        rows = self._select("SELECT task_id FROM tasks WHERE state = ? AND last_progress_us < ?",
                            (tpb.TASK_STATE_RUNNING, no_progress_since_us))
        return [r["task_id"] for r in rows]

    # ------------------------------------------------------------------ writes

    def create(self, task: tpb.Task, user: str, idempotency_key: str | None, upload_sha256: str = "",
               webhook: tuple[str, str] | None = None, owner: str | None = None) -> None:
        """`webhook`: (callback URL, signing secret) of a task that named one (stored sealed). `owner`: the
        gateway that will publish its frames."""
        url, secret = (self.secrets.seal(webhook[0]), self.secrets.seal(webhook[1])) if webhook else (None, None)
        with self.transaction(task.task_id) as db:
            db.execute('INSERT INTO tasks (task_id, "user", state, created_us, idempotency_key, task, last_progress_us,'
                       " upload_sha256, webhook_url, webhook_secret, owner, ingest_partition)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (task.task_id, user, task.state, task.created_at.ToMicroseconds(), idempotency_key or None,
                        task.SerializeToString(), now_us(), upload_sha256 or None, url, secret, owner, PLACE_NEXT))
            db.execute("DELETE FROM reserved WHERE task_id = ?", (task.task_id,))

    def update(self, task_id: str, fn) -> tpb.Task | None:
        """Apply fn(task) -> None to the stored Task and save it; state columns follow the message."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT task FROM tasks WHERE task_id = ?", (task_id,))
            if row is None:
                return None
            task = tpb.Task.FromString(row[0])
            if fn(task) is False:
                return task
            webhook_due = (task.state in TERMINAL and task.HasField("webhook")
                           and task.webhook.state == tpb.WEBHOOK_STATE_UNSPECIFIED)
            if webhook_due:  # the task ends: its webhook is due in the same write (gateway/webhooks.py)
                task.webhook.state = tpb.WEBHOOK_STATE_PENDING
                db.execute("UPDATE tasks SET webhook_due_us = ? WHERE task_id = ?", (now_us(), task_id))
            finished = task.finished_at.ToMicroseconds() if task.HasField("finished_at") else None
            db.execute("UPDATE tasks SET task = ?, state = ?, finished_us = ? WHERE task_id = ?",
                       (task.SerializeToString(), task.state, finished, task_id))
            if task.state in TERMINAL:  # an ended task is never read again: its camera's credentials go
                db.execute("UPDATE tasks SET live_url = NULL WHERE task_id = ? AND live_url IS NOT NULL", (task_id,))
            return task

    def transition(self, task_id: str, state: int, error: str = "", from_states=ACTIVE) -> tpb.Task | None:
        """Move a task to `state` if it is in one of `from_states`; returns the task if it moved."""
        moved = []

        def apply(task):
            if task.state not in from_states:
                return False
            task.state = state
            if error:
                task.error_message = error
            us = now_us()
            if state == tpb.TASK_STATE_RUNNING and not task.HasField("started_at"):
                task.started_at.CopyFrom(timestamp(us))
            if state in TERMINAL:
                task.finished_at.CopyFrom(timestamp(us))
            moved.append(True)

        task = self.update(task_id, apply)
        return task if moved else None

    def add_done(self, task_id: str, step: str, ranges: list[tuple[int, int]], epoch: int | None = None,
                 frames_total: int = 0) -> bool:
        """Mark frame indices done for a step (a union: repeats change nothing). Progress of an older run
        of the task (epoch) is ignored. Returns whether the step's count grew (real progress)."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT progress, frames_total, epoch FROM tasks WHERE task_id = ?", (task_id,))
            if row is None or (epoch is not None and epoch < row[2]):
                return False
            found = db.one("SELECT bitmap FROM done WHERE task_id = ? AND step = ?", (task_id, step))
            bits = int.from_bytes(found[0], "little") if found else 0
            for first, last in ranges:
                if 0 <= first <= last:
                    bits |= ((1 << (last - first + 1)) - 1) << first
            count = bits.bit_count()
            progress = json.loads(row[0])
            grew = count > int(progress.get(step, 0))
            total = frames_total or row[1]
            if not grew and total == row[1]:
                return False
            progress[step] = count
            db.execute("INSERT INTO done (task_id, step, bitmap) VALUES (?, ?, ?) ON CONFLICT(task_id, step) "
                       "DO UPDATE SET bitmap = excluded.bitmap",
                       (task_id, step, bits.to_bytes((bits.bit_length() + 7) // 8 or 1, "little")))
            db.execute("UPDATE tasks SET progress = ?, frames_total = ?" + (", last_progress_us = ?" if grew else "") +
                       " WHERE task_id = ?", (json.dumps(progress), total, *((now_us(),) if grew else ()), task_id))
            return grew

    def finish_progress(self, task_id: str, frames: int, epoch: int) -> None:
        """The task's results are in, made of `frames` frames: every step did every one of them (annotate writes
        its results once the end of stream has come through every stage, behind every frame). Steps whose
        progress reports are still on their way (another process's, read in no set order with annotate's
        result) are counted complete now rather than moments after the task says COMPLETED."""
        if frames <= 0:
            return
        with self.transaction(task_id) as db:
            row = db.one("SELECT progress, frames_total, epoch FROM tasks WHERE task_id = ?", (task_id,))
            if row is None or epoch < row[2]:
                return
            progress = json.loads(row[0])
            if all(int(progress.get(step, 0)) >= frames for step in PROGRESS_STEPS) and row[1]:
                return
            progress.update({step: max(frames, int(progress.get(step, 0))) for step in PROGRESS_STEPS})
            db.execute("UPDATE tasks SET progress = ?, frames_total = ? WHERE task_id = ?",
                       (json.dumps(progress), row[1] or frames, task_id))

    def new_run(self, task_id: str, warning: str) -> int:
        """The task runs again from its first frame (the broker lost its topics): a new epoch, no progress, and no
        camera reader to order the new run's readers after (their frames start at 0 again); the live counts so
        far stay, as the base the new run's readers add to."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT epoch, task FROM tasks WHERE task_id = ?", (task_id,))
            epoch = row[0] + 1
            task = tpb.Task.FromString(row[1])
            task.warnings.append(warning)
            db.execute("DELETE FROM done WHERE task_id = ?", (task_id,))
            # A new run's first job is placed again: the old run's jobs are skipped wherever they are (its epoch is
            # older), and posemesh.ingest may have been made again with other partitions.
            db.execute("UPDATE tasks SET epoch = ?, progress = '{}', produced = 0, frames_total = 0, task = ?, "
                       "last_progress_us = ?, live_reader = NULL, ingest_partition = ? WHERE task_id = ?",
                       (epoch, task.SerializeToString(), now_us(), PLACE_NEXT, task_id))
            return epoch

    def epoch(self, task_id: str) -> int:
        with self.lock:
            row = self.db.one("SELECT epoch FROM tasks WHERE task_id = ?", (task_id,))
            return row[0] if row else 0

    def ingest_partition(self, task_id: str, choose) -> int | None:
        """The partition of posemesh.ingest for a job of the task's current run (None: where the task id hashes).
        The run's first job is placed by `choose()` (gateway/placement.py) and the choice kept, in the same
        write (gateways sharing the store agree); every later job of the run goes there too, so a job written
        again after a gateway restart reaches the replica already doing the run, not a second one."""
        with self.transaction(task_id, notify=False) as db:
            row = db.one("SELECT ingest_partition FROM tasks WHERE task_id = ?", (task_id,))
            if row is None or row[0] != PLACE_NEXT:
                return row[0] if row else None
            partition = choose()
            db.execute("UPDATE tasks SET ingest_partition = ? WHERE task_id = ?", (partition, task_id))
            return partition

    def set_live_source(self, task_id: str, url: str, transport: int) -> None:
        """The camera a live task reads (kept, sealed, to read it again after the broker lost its data)."""
        with self.transaction(task_id) as db:
            db.execute("UPDATE tasks SET live_url = ?, live_transport = ? WHERE task_id = ?",
                       (self.secrets.seal(url), transport, task_id))

    def apply_live_read(self, task_id: str, epoch: int, reader: str, status: tpb.LiveStatus) -> None:
        """A live task's camera status from the ingest replica reading it (pipeline.proto's LiveRead). Its counts
        are that reader's: those of the readers before it (replicas that died) are kept as the base they add
        to (the live_reader column), so a replayed status of the latest reader changes nothing and a late one
        of an earlier reader is dropped."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT task, live_reader, epoch, state FROM tasks WHERE task_id = ?", (task_id,))
            if row is None or row[2] != epoch or row[3] not in ACTIVE:
                return
            task, mark = tpb.Task.FromString(row[0]), json.loads(row[1] or "{}")
            if mark.get("reader") != reader:  # a new reader: what the task counted so far is its base
                if mark.get("reader", "") > reader:
                    return  # a late status of a reader already replaced (stages/ingest.py's reader_name)
                live = task.live
                mark = {"reader": reader, "base": [live.frames_received, live.frames_dropped, live.reconnects]}
            received, dropped, reconnects = mark["base"]
            task.live.CopyFrom(status)
            task.live.frames_received += received
            task.live.frames_dropped += dropped
            task.live.reconnects += reconnects
            db.execute("UPDATE tasks SET task = ?, live_reader = ? WHERE task_id = ?",
                       (task.SerializeToString(), json.dumps(mark), task_id))

    def mark_produced(self, task_id: str) -> None:
        """Every frame of the task, and its end of stream, is on raw_frames_<task>."""
        with self.transaction(task_id) as db:
            db.execute("UPDATE tasks SET produced = 1 WHERE task_id = ?", (task_id,))

    def record_ending(self, task_id: str, state: int, message: str) -> None:
        """A live task's source is done (its end of stream is out, or goes out next from the ingest replica that
        read it: it is produced): the task ends with
        `state` and `message` once annotate's results arrive (see `ending`, `endings_overdue`)."""
        with self.transaction(task_id) as db:
            db.execute("UPDATE tasks SET produced = 1, ending_state = ?, ending_message = ?, ending_us = ? "
                       "WHERE task_id = ?", (state, message, now_us(), task_id))

    def mark_deleted(self, task_id: str) -> None:
        """The user deleted the task: gone at once if its topics are, else hidden (get and list skip it) until
        the sweep deletes them (mark_topics_deleted), and all but the bookkeeping of the topics' hand-off (id,
        owner, state, times) gone at once. Its idempotency key may be used again at once."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT topics_deleted, task FROM tasks WHERE task_id = ?", (task_id,))
            if row and row[0]:
                self._purge(db, task_id)
            elif row:
                old = tpb.Task.FromString(row[1])
                kept = tpb.Task(task_id=task_id, state=old.state, created_at=old.created_at,
                                finished_at=old.finished_at)
                db.execute("UPDATE tasks SET deleted = 1, idempotency_key = NULL, upload_sha256 = NULL, "
                           "live_url = NULL, live_reader = NULL, ending_message = NULL, progress = '{}', task = ?, "
                           "webhook_url = NULL, webhook_secret = NULL, webhook_due_us = NULL, webhook_body = NULL "
                           "WHERE task_id = ?",
                           (kept.SerializeToString(), task_id))
                db.execute("DELETE FROM done WHERE task_id = ?", (task_id,))
            self.wal_dirty = True

    def mark_topics_deleted(self, task_id: str) -> None:
        """The task's topics are gone from the broker; a task the user deleted goes with them."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT deleted FROM tasks WHERE task_id = ?", (task_id,))
            if row and row[0]:
                self._purge(db, task_id)
                self.wal_dirty = True
            elif row:
                db.execute("UPDATE tasks SET topics_deleted = 1 WHERE task_id = ?", (task_id,))

    # ------------------------------------------------------------------ admission (gateway/limits.py)

    def admit(self, user: str, slot_id: str, limit: int, ttl_s: float) -> int | None:
        """Take an admission slot for `user` unless their queued and running tasks plus the slots held for
        them (on any gateway of this store) already reach `limit`: None when taken, else that count. One
        write transaction, so gateways admitting at once cannot both slip under the limit."""
        now = now_us()
        with self.transaction(notify=False) as db:
            db.execute("DELETE FROM admissions WHERE expires_us < ?", (now,))
            tasks = db.one('SELECT COUNT(*) FROM tasks WHERE "user" = ? AND deleted = 0 AND state IN (?, ?)',
                           (user, *ACTIVE))[0]
            held = db.one('SELECT COUNT(*) FROM admissions WHERE "user" = ?', (user,))[0]
            if tasks + held >= limit:
                return tasks + held
            db.execute('INSERT INTO admissions (slot_id, "user", expires_us) VALUES (?, ?, ?)',
                       (slot_id, user, now + int(ttl_s * 1e6)))
            return None

    def renew_admissions(self, slot_ids: list[str], ttl_s: float) -> None:
        """The slots are still held: they lapse `ttl_s` from now."""
        if slot_ids:
            with self.transaction(notify=False) as db:
                db.execute(f"UPDATE admissions SET expires_us = ? WHERE slot_id IN ({', '.join('?' * len(slot_ids))})",
                           (now_us() + int(ttl_s * 1e6), *slot_ids))

    def release_admission(self, slot_id: str) -> None:
        with self.transaction(notify=False) as db:
            db.execute("DELETE FROM admissions WHERE slot_id = ?", (slot_id,))

    # ------------------------------------------------------------------ leases (gateway/duties.py)

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `ttl_s` from now; False while another holder's has not lapsed."""
        now = now_us()
        with self.transaction(notify=False) as db:
            row = db.one("SELECT holder, expires_us FROM leases WHERE name = ?", (name,))
            if row is not None and row["holder"] != holder and row["expires_us"] >= now:
                return False
            db.execute("INSERT INTO leases (name, holder, expires_us) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                       "SET holder = ?, expires_us = ?", (name, holder, now + int(ttl_s * 1e6), holder,
                                                          now + int(ttl_s * 1e6)))
            return True

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (a gateway stopping): another may take it at once."""
        with self.transaction(notify=False) as db:
            db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease `name` now (None: nobody, or it lapsed)."""
        rows = self._select("SELECT holder FROM leases WHERE name = ? AND expires_us >= ?", (name, now_us()))
        return rows[0]["holder"] if rows else None

    def orphaned_tasks(self, lease_prefix: str) -> list[str]:
        """Active tasks whose owner is another gateway whose lease (`lease_prefix` + owner) lapsed or is gone."""
        rows = self._select("SELECT task_id FROM tasks t WHERE state IN (?, ?) AND deleted = 0 AND owner IS NOT NULL "
                            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.name = ? || t.owner AND l.expires_us >= ?)",
                            (*ACTIVE, lease_prefix, now_us()))
        return [r["task_id"] for r in rows]

    def get_with_owner(self, task_id: str) -> tuple[tpb.Task, str | None] | None:
        """The task and the gateway that publishes its frames (None: a task of a version that did not record
        it), in one read."""
        with self.lock:
            row = self._row(task_id)
            return (self._task(row), row["owner"]) if row is not None else None

    def take_over(self, task_id: str, owner: str, lease_prefix: str) -> bool:
        """Make `owner` the task's owner if its owner's lease lapsed (one gateway wins). The other gateways
        hear of it: the old owner, if it is only cut off, stops the task's frames when it hears again."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT owner FROM tasks WHERE task_id = ?", (task_id,))
            if row is None or row["owner"] is None:
                return False
            alive = db.one("SELECT 1 FROM leases WHERE name = ? AND expires_us >= ?",
                           (lease_prefix + row["owner"], now_us()))
            if alive is not None:
                return False
            db.execute("UPDATE tasks SET owner = ? WHERE task_id = ?", (owner, task_id))
            return True

    # ------------------------------------------------------------------ reserved task ids (gateway/reservations.py)

    def add_reserved(self, task_id: str, gateway: str) -> None:
        with self.transaction(notify=False) as db:
            db.execute("INSERT INTO reserved (task_id, gateway) VALUES (?, ?)", (task_id, gateway))

    def drop_reserved(self, task_ids: list[str]) -> None:
        if task_ids:
            with self.transaction(notify=False) as db:
                db.execute(f"DELETE FROM reserved WHERE task_id IN ({', '.join('?' * len(task_ids))})", tuple(task_ids))

    def reserved_by_live_gateway(self, task_id: str, lease_prefix: str) -> bool:
        """Whether `task_id` is a reservation of a gateway whose lease holds (its topics are no orphans)."""
        rows = self._select("SELECT 1 FROM reserved r JOIN leases l ON l.name = ? || r.gateway "
                            "WHERE r.task_id = ? AND l.expires_us >= ?", (lease_prefix, task_id, now_us()))
        return bool(rows)

    # ------------------------------------------------------------------ webhooks (gateway/webhooks.py)

    def webhooks_due(self, at_us: int) -> list[str]:
        """Ended tasks whose webhook's next attempt is due at or before `at_us`, soonest first."""
        rows = self._select("SELECT task_id FROM tasks WHERE webhook_due_us IS NOT NULL AND webhook_due_us <= ? "
                            "AND deleted = 0 ORDER BY webhook_due_us", (at_us,))
        return [r["task_id"] for r in rows]

    def next_webhook_us(self) -> int | None:
        """When the soonest pending webhook attempt is due, or None when none is pending."""
        rows = self._select("SELECT MIN(webhook_due_us) AS due FROM tasks WHERE deleted = 0")
        return rows[0]["due"] if rows else None

    def pending_webhook(self, task_id: str) -> PendingWebhook | None:
        """What the next attempt of a task's webhook sends; None when none is pending (delivered, given up,
        deleted) or its URL was sealed under a key the server no longer has."""
        rows = self._select("SELECT task, webhook_url, webhook_secret, webhook_body FROM tasks WHERE task_id = ? "
                            "AND webhook_due_us IS NOT NULL AND deleted = 0", (task_id,))
        if not rows or not rows[0]["webhook_url"]:
            return None
        r = rows[0]
        try:
            url, secret = (self.secrets.open(r[name], "the callback URL of this task")
                           for name in ("webhook_url", "webhook_secret"))
        except Unreadable:  # sealed under a key the server no longer has: the sender gives up, saying so
            url = secret = ""
        return PendingWebhook(tpb.Task.FromString(r["task"]), url, secret, r["webhook_body"] or "")

    def record_webhook(self, task_id: str, delivery: tpb.WebhookDelivery, due_us: int | None, body: str) -> None:
        """An attempt's outcome: the task's `webhook` becomes `delivery`; the next attempt is due at `due_us`,
        or none is (delivered or given up: URL, secret and body go)."""
        with self.transaction(task_id) as db:
            row = db.one("SELECT task FROM tasks WHERE task_id = ? AND deleted = 0", (task_id,))
            if row is None:
                return
            task = tpb.Task.FromString(row[0])
            task.webhook.CopyFrom(delivery)
            if due_us is None:
                db.execute("UPDATE tasks SET task = ?, webhook_due_us = NULL, webhook_url = NULL, "
                           "webhook_secret = NULL, webhook_body = NULL WHERE task_id = ?",
                           (task.SerializeToString(), task_id))
            else:
                db.execute("UPDATE tasks SET task = ?, webhook_due_us = ?, webhook_body = ? WHERE task_id = ?",
                           (task.SerializeToString(), due_us, body, task_id))

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.one("SELECT value FROM meta WHERE key = ?", (key,))
            return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                            (key, value, value))

    def purge(self, task_id: str) -> None:
        """No trace of the task is left (a task that could not start)."""
        with self.transaction(task_id) as db:
            self._purge(db, task_id)
            self.wal_dirty = True

    @staticmethod
    def _purge(db, task_id: str) -> None:
        db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
        db.execute("DELETE FROM done WHERE task_id = ?", (task_id,))

    def close(self) -> None:
        with self.lock:
            self.db.close()
