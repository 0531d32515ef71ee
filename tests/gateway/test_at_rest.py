"""Secrets at rest (mesh/at_rest.py, gateway/store.py): camera URLs are shown without credentials, stored
sealed under the server's key, readable by a restarted store with the same key and refused, saying why,
with another; the database files are the owner's alone, and a deleted task leaves no byte of itself in any
file, write-ahead log included. Real SQLite files in tmp_path, read back byte by byte."""

from __future__ import annotations

import logging
import secrets
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from posemesh.gateway.sources import SourcePolicy
from posemesh.gateway.store import ADDED_COLUMNS, SCHEMA, TaskStore, now_us, timestamp
from posemesh.mesh import names
from posemesh.mesh.at_rest import KEY_FILE, KeyFileError, SecretBox, Unreadable, redact
from posemesh.v1 import task_service_pb2 as tpb
from tests.helpers import files_holding


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def camera_url(password: str) -> str:
    return f"rtsp://admin:{password}@cam-7.plant.example:554/Streaming/Channels/101?transport=tcp"


def live_task(name: str = "gate camera") -> tpb.Task:
    return tpb.Task(task_id=names.new_task_id(), state=tpb.TASK_STATE_QUEUED, file_name=name,
                    created_at=timestamp(now_us()),
                    live=tpb.LiveStatus(source=redact(camera_url("x")), max_lag_s=2.0))


def key_file(path: Path, *keys: bytes) -> Path:
    path.write_bytes(b"\n".join(keys) + b"\n")
    return path


# ------------------------------------------------------------------ what users and logs see


@pytest.mark.parametrize("url, shown", [
    ("rtsp://admin:pw-123@cam.example:554/stream1", "rtsp://cam.example:554/stream1"),
    ("rtsp://admin@cam.example/stream1", "rtsp://cam.example/stream1"),
    ("rtsps://u:pw-123@[fe80::1]:8322/a/b", "rtsps://[fe80::1]:8322/a/b"),
    ("rtsp://cam.example/live?user=admin&password=pw-123&channel=1",
     "rtsp://cam.example/live?user=admin&password=***&channel=1"),
    ("rtsp://cam.example/live?PWD=pw-123&token=pw-123#pw-123", "rtsp://cam.example/live?PWD=***&token=***"),
    ("rtsp://u:pw-123@cam.example:99999/x", "rtsp://cam.example/x"),  # a bad port: the host only
])
def test_urls_are_shown_without_credentials(url, shown):
    assert redact(url) == shown
    assert "pw-123" not in redact(url)


def test_the_source_a_task_shows_and_the_errors_about_a_url_carry_no_password():
    policy = SourcePolicy("rtsp://cam.example:*")
    assert policy.check("rtsp://admin:pw-123@cam.example/s?password=pw-123").shown == \
        "rtsp://cam.example/s?password=***"
    for bad in ("http://admin:pw-123@cam.example/s", "rtsp://admin:pw-123@cam.example:99999/s",
                "rtsp://admin:pw-123@/s"):
        with pytest.raises(Exception) as refused:
            policy.check(bad)
        assert "pw-123" not in str(refused.value) and "source.url" in str(refused.value)


# ------------------------------------------------------------------ sealing and the key


def test_a_sealed_url_holds_no_trace_of_the_url_and_only_the_right_key_opens_it(tmp_path):
    password = secrets.token_hex(12)
    url = camera_url(password)
    box = SecretBox.from_file(key_file(tmp_path / "k", Fernet.generate_key()))
    sealed = box.seal(url)
    assert box.sealed(sealed) and password not in sealed and "cam-7" not in sealed and "admin" not in sealed
    assert box.seal(url) != sealed  # a random IV per value: equal URLs do not look equal
    assert box.open(sealed) == url
    other = SecretBox.from_file(key_file(tmp_path / "other", Fernet.generate_key()))
    with pytest.raises(Unreadable) as err:
        other.open(sealed, "the camera URL")
    assert "the camera URL was encrypted with a key this server does not have" in str(err.value)
    assert "POSEMESH_SECRETS_KEY_FILE" in str(err.value) and password not in str(err.value)


def test_keys_rotate_the_first_seals_every_one_opens(tmp_path):
    old_key, new_key = Fernet.generate_key(), Fernet.generate_key()
    sealed_before = SecretBox.from_file(key_file(tmp_path / "old", old_key)).seal("rtsp://a:b@c/d")
    rotated = SecretBox.from_file(key_file(tmp_path / "both", new_key, old_key))
    assert rotated.open(sealed_before) == "rtsp://a:b@c/d"
    sealed_after = rotated.seal("rtsp://a:b@c/e")
    assert SecretBox.from_file(key_file(tmp_path / "new", new_key)).open(sealed_after) == "rtsp://a:b@c/e"


def test_the_default_key_is_made_once_in_the_data_dir_with_mode_0600_and_said_so_once(tmp_path, caplog):
    data = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="posemesh.secrets"):
        first = SecretBox.in_data_dir(data)
        second = SecretBox.in_data_dir(data)  # the next start: the same key
    assert mode(data / KEY_FILE) == 0o600 and mode(data) & 0o007 == 0
    assert second.open(first.seal("rtsp://a:b@c/d")) == "rtsp://a:b@c/d"
    made = [r for r in caplog.records if "made a new key" in r.getMessage()]
    assert len(made) == 1 and "POSEMESH_SECRETS_KEY_FILE" in made[0].getMessage()


def test_a_named_key_file_that_is_missing_or_not_keys_stops_the_start_saying_which(tmp_path):
    with pytest.raises(KeyFileError, match="POSEMESH_SECRETS_KEY_FILE .*/absent: cannot read it"):
        SecretBox.from_file(tmp_path / "absent")
    with pytest.raises(KeyFileError, match="every line must be a Fernet key"):
        SecretBox.from_file(key_file(tmp_path / "bad", b"not-a-key"))
    with pytest.raises(KeyFileError, match="holds no key"):
        SecretBox.from_file(key_file(tmp_path / "empty"))


# ------------------------------------------------------------------ the task store


def test_the_store_keeps_a_camera_url_sealed_in_files_of_mode_0600(tmp_path):
    data, password = tmp_path / "data", secrets.token_hex(12)
    store = TaskStore(data / "tasks.sqlite3")
    task = live_task()
    store.create(task, "alice", None)
    store.set_live_source(task.task_id, camera_url(password), tpb.RTSP_TRANSPORT_TCP)
    store.transition(task.task_id, tpb.TASK_STATE_RUNNING)
    [active] = store.active_tasks()
    assert active.live_url == camera_url(password) and not active.live_error
    assert files_holding(data, password) == []
    assert files_holding(data, "admin:") == []  # nor the user name (the task shows the URL without it)
    for name in ("tasks.sqlite3", "tasks.sqlite3-wal", "tasks.sqlite3-shm", KEY_FILE):
        assert mode(data / name) == 0o600, name
    assert mode(data) & 0o007 == 0
    assert password not in store.get(task.task_id).SerializeToString().decode("latin-1")
    store.close()


def test_a_reopened_store_reads_the_url_with_the_same_key_and_says_why_not_with_another(tmp_path):
    data, url = tmp_path / "data", camera_url(secrets.token_hex(12))
    store = TaskStore(data / "tasks.sqlite3")
    task = live_task()
    store.create(task, "alice", None)
    store.set_live_source(task.task_id, url, tpb.RTSP_TRANSPORT_UDP)
    store.transition(task.task_id, tpb.TASK_STATE_RUNNING)
    store.close()

    again = TaskStore(data / "tasks.sqlite3")  # the same data dir: its key file
    [active] = again.active_tasks()
    assert (active.live_url, active.live_transport, active.live_error) == (url, tpb.RTSP_TRANSPORT_UDP, "")
    again.close()

    rotated = TaskStore(data / "tasks.sqlite3", SecretBox([Fernet.generate_key()]))
    [active] = rotated.active_tasks()  # no exception: the task is still listed, as live
    assert active.live_url.startswith("fernet:") and url not in active.live_url
    assert active.live_error.startswith("the camera URL of this live task was encrypted with a key this server "
                                        "does not have") and active.live_error.endswith("start a new live task")
    rotated.close()


def test_camera_urls_stored_in_plain_text_by_an_older_version_are_sealed_and_scrubbed(tmp_path):
    data, password = tmp_path / "data", secrets.token_hex(12)
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    db = tmp_path / "data" / "tasks.sqlite3"
    old = sqlite3.connect(db)  # a database of the release before sealing, world-readable as it was
    old.executescript("PRAGMA journal_mode=WAL;" + SCHEMA)
    present = {row[1] for row in old.execute("PRAGMA table_info(tasks)")}
    for name, definition in ADDED_COLUMNS:
        if name not in present:
            old.execute(f"ALTER TABLE tasks ADD COLUMN {name} {definition}")
    task = live_task()
    task.state = tpb.TASK_STATE_RUNNING
    old.execute("INSERT INTO tasks (task_id, user, state, created_us, task, live_url) VALUES (?, ?, ?, ?, ?, ?)",
                (task.task_id, "alice", task.state, now_us(), task.SerializeToString(), camera_url(password)))
    gone = live_task()  # deleted long ago: its row's bytes may linger in free space
    old.execute("INSERT INTO tasks (task_id, user, state, created_us, task, live_url) VALUES (?, ?, ?, ?, ?, ?)",
                (gone.task_id, "alice", 3, now_us(), gone.SerializeToString(), camera_url(password + "-old")))
    old.commit()
    old.execute("DELETE FROM tasks WHERE task_id = ?", (gone.task_id,))
    old.commit()
    old.close()
    db.chmod(0o644)
    assert files_holding(data, password)  # the test's premise: the password is in the old files

    store = TaskStore(db)
    assert files_holding(data, password) == []
    assert mode(db) == 0o600 and mode(data) & 0o007 == 0
    [active] = store.active_tasks()
    assert active.live_url == camera_url(password)
    store.close()


def test_an_ended_and_deleted_task_leaves_nothing_in_any_file_wal_included(tmp_path):
    data, password = tmp_path / "data", secrets.token_hex(12)
    store = TaskStore(data / "tasks.sqlite3")
    keep = live_task("another user's camera")  # a task that stays: the database is in use, not emptied
    store.create(keep, "bob", None)
    task = live_task(f"private name {password[:6]}")
    store.create(task, "alice", "idem-key-" + password[:6])
    store.set_live_source(task.task_id, camera_url(password), tpb.RTSP_TRANSPORT_TCP)
    store.transition(task.task_id, tpb.TASK_STATE_RUNNING)
    for i in range(50):  # a live task's many updates: each leaves a copy of its row's page in the WAL
        store.add_done(task.task_id, "decode", [(i, i)], 0)
    sealed = store._select("SELECT live_url FROM tasks WHERE task_id = ?", (task.task_id,))[0]["live_url"]
    assert files_holding(data, sealed) and files_holding(data, task.task_id)  # the scan finds what is there

    store.transition(task.task_id, tpb.TASK_STATE_CANCELLED, "cancelled by the user")
    assert store.active_tasks() == [] or all(a.task.task_id != task.task_id for a in store.active_tasks())
    store.mark_deleted(task.task_id)  # its topics are not deleted yet: the row stays, emptied
    assert store.get(task.task_id) is None and store.state_of(task.task_id) == tpb.TASK_STATE_CANCELLED
    assert (data / "tasks.sqlite3-wal").stat().st_size == 0
    for needle in (password, sealed, password[:6], "private name", "idem-key-"):
        assert files_holding(data, needle) == [], needle

    store.mark_topics_deleted(task.task_id)  # the hand-off is over: the row goes too
    assert store.state_of(task.task_id) is None
    assert files_holding(data, task.task_id) == []
    assert store.get(keep.task_id).file_name == "another user's camera"
    store.close()
