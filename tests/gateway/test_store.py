"""The task store (gateway/store.py) on both of its databases (gateway/sql.py), and two stores on one database,
as two gateways would hold them: writes stay serialized and whole across them. PostgreSQL is a real server
(Debian's package, started by tests/conftest.py); SQLite is two connections to one file."""

from __future__ import annotations

import threading
import time

import pytest
from cryptography.fernet import Fernet

from posemesh.gateway.sql import Conflict, open_database
from posemesh.gateway.store import TaskStore, now_us, timestamp
from posemesh.mesh import names
from posemesh.mesh.at_rest import SecretBox
from posemesh.stages.ingest import reader_name
from posemesh.v1 import task_service_pb2 as tpb


@pytest.fixture(params=["sqlite", "postgresql"])
def two_stores(request, tmp_path):
    """Two TaskStores on one database (one key, as gateways sharing a store must share it)."""
    box = SecretBox([Fernet.generate_key()])
    if request.param == "postgresql":
        location = request.getfixturevalue("postgres").create_database(f"store{time.monotonic_ns()}")
    else:
        location = tmp_path / "tasks.sqlite3"
    stores = [TaskStore(location, box), TaskStore(location, box)]
    yield stores
    for store in stores:
        store.close()


def _task(state: int = tpb.TASK_STATE_RUNNING) -> tpb.Task:
    return tpb.Task(task_id=names.new_task_id(), state=state, file_name="clip.mp4", created_at=timestamp(now_us()))


def test_what_one_store_writes_the_other_reads(two_stores):
    a, b = two_stores
    assert not b.any_active()
    task = _task()
    task.webhook.SetInParent()  # as an upload that named a callback URL makes it
    a.create(task, "alice", "key-1", "sha", webhook=("https://hooks.example/x", "s3cret"))
    assert b.any_active()
    assert b.get(task.task_id, "alice").file_name == "clip.mp4"
    assert b.get(task.task_id, "bob") is None
    assert b.by_idempotency_key("alice", "key-1")[1] == "sha"
    assert b.count_active("alice") == 1 and b.task_counts() == {"alice": {tpb.TASK_STATE_RUNNING: 1}}
    b.set_live_source(task.task_id, "rtsp://user:pw@cam/1", 1)
    assert a.active_tasks()[0].live_url == "rtsp://user:pw@cam/1"
    assert b.transition(task.task_id, tpb.TASK_STATE_COMPLETED) is not None
    assert a.get(task.task_id).state == tpb.TASK_STATE_COMPLETED and not a.any_active()
    assert a.transition(task.task_id, tpb.TASK_STATE_CANCELLED) is None, "an ended task does not move again"
    assert a.pending_webhook(task.task_id).url == "https://hooks.example/x"
    listed, more = b.list("alice", 0, 10)
    assert [t.task_id for t in listed] == [task.task_id] and not more
    a.mark_deleted(task.task_id)
    assert b.get(task.task_id) is None and b.state_of(task.task_id) == tpb.TASK_STATE_COMPLETED
    b.mark_topics_deleted(task.task_id)
    assert a.state_of(task.task_id) is None, "the row goes with the topics"


def test_an_idempotency_key_is_taken_once_across_stores(two_stores):
    a, b = two_stores
    a.create(_task(), "alice", "same-key")
    with pytest.raises(Conflict):
        b.create(_task(), "alice", "same-key")
    b.create(_task(), "bob", "same-key")  # another user's key space


def test_frames_done_from_both_stores_at_once_count_each_frame_once(two_stores):
    """Two writers adding overlapping ranges concurrently: the bitmap is a union, nothing is lost."""
    a, b = two_stores
    task = _task()
    a.create(task, "alice", None)

    def add(store, first: int) -> None:
        for start in range(first, 600, 20):  # a: 0-9, 20-29, ...; b: 5-14, 25-34, ...
            store.add_done(task.task_id, "detect", [(start, start + 9)], frames_total=600)

    writers = [threading.Thread(target=add, args=(a, 0)), threading.Thread(target=add, args=(b, 5))]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    expected = len({f for s in range(0, 600, 20) for f in range(s, s + 10)} |
                   {f for s in range(5, 600, 20) for f in range(s, min(s + 10, 610))})
    assert a.frames_done(task.task_id, "detect") == expected == b.frames_done(task.task_id, "detect")


def test_the_camera_counts_of_successive_ingest_replicas_add_up(two_stores):
    """A live task's camera read by one ingest replica, then (it died) by another: each says its own counts
    (pipeline.proto's LiveRead); the task shows their sum, whichever store applies them."""
    a, b = two_stores
    task = _task()
    task.live.source = "rtsp://cam/1"
    a.create(task, "alice", None)
    first, second = "0001796300000.000000/ingest-a", "0001796300009.000000/ingest-b"
    a.apply_live_read(task.task_id, 0, first, tpb.LiveStatus(source="rtsp://cam/1", connected=True, frames_received=10,
                                                              frames_dropped=4))
    b.apply_live_read(task.task_id, 0, second, tpb.LiveStatus(source="rtsp://cam/1", frames_received=3, reconnects=1))
    a.apply_live_read(task.task_id, 0, first, tpb.LiveStatus(frames_received=11))  # late, from the dead one
    b.apply_live_read(task.task_id, 7, second, tpb.LiveStatus(frames_received=99))  # another run's
    live = b.get(task.task_id).live
    assert (live.frames_received, live.frames_dropped, live.reconnects, live.connected) == (13, 4, 1, False)
    a.apply_live_read(task.task_id, 0, second, tpb.LiveStatus(connected=True, frames_received=5, frames_dropped=1,
                                                              reconnects=1))
    live = b.get(task.task_id).live
    assert (live.frames_received, live.frames_dropped, live.reconnects, live.connected) == (15, 5, 1, True)


def test_a_reader_that_took_the_camera_over_counts_whatever_its_hosts_clock_says(two_stores):
    """The replica that takes a camera over names itself after the frame it goes on from, so its statuses
    replace its predecessor's even when its clock is an hour behind, and the predecessor's late ones are dropped."""
    a, b = two_stores
    task = _task()
    task.live.source = "rtsp://cam/1"
    a.create(task, "alice", None)
    first = reader_name(0, "ingest-a", now=1796300000.0)
    second = reader_name(40, "ingest-b", now=1796300000.0 - 3600)  # resumed after the first one's 40 frames
    a.apply_live_read(task.task_id, 0, first, tpb.LiveStatus(frames_received=40, frames_dropped=2))
    b.apply_live_read(task.task_id, 0, second, tpb.LiveStatus(frames_received=5, reconnects=1))
    a.apply_live_read(task.task_id, 0, first, tpb.LiveStatus(frames_received=41, frames_dropped=2))  # late
    live = b.get(task.task_id).live
    assert (live.frames_received, live.frames_dropped, live.reconnects) == (45, 2, 1)
    # The broker lost its topics: the task runs again and its new reader starts at frame 0, counted on top.
    epoch = a.new_run(task.task_id, "the message broker lost the task's frames: it runs again from the start")
    b.apply_live_read(task.task_id, epoch, reader_name(0, "ingest-a", now=1796300100.0),
                      tpb.LiveStatus(frames_received=7, connected=True))
    live = a.get(task.task_id).live
    assert (live.frames_received, live.frames_dropped, live.reconnects, live.connected) == (52, 2, 1, True)
    # A predecessor that sent no frame: the clock decides, as before.
    assert reader_name(7, "x", now=2.0) > reader_name(7, "y", now=1.0) > reader_name(6, "z", now=9.0)
    # Names of replicas from before this naming (the clock alone) sort before any of these.
    assert reader_name(0, "x", now=0.0) > f"{1796300000.0:020.6f}/old"


def test_the_cameras_still_read_are_the_running_live_tasks_with_no_ending(two_stores):
    """What the sweep tells again to stop (lifecycle's _say_stops_again) comes from this query, on either
    database: uploads, queued, ended and deleted tasks and a camera whose end is recorded are not in it."""
    a, b = two_stores
    tasks = {}
    for name in ("reading", "upload", "queued", "source_done", "ended", "deleted"):
        tasks[name] = task = _task(tpb.TASK_STATE_QUEUED if name == "queued" else tpb.TASK_STATE_RUNNING)
        a.create(task, "alice", None)
        if name != "upload":
            a.set_live_source(task.task_id, f"rtsp://cam/{name}", 0)
    a.update(tasks["reading"].task_id, lambda t: setattr(t, "ending", tpb.TASK_STATE_CANCELLED))
    a.record_ending(tasks["source_done"].task_id, tpb.TASK_STATE_COMPLETED, "the camera ended")
    a.transition(tasks["ended"].task_id, tpb.TASK_STATE_CANCELLED)
    a.mark_deleted(tasks["deleted"].task_id)
    reading = b.cameras_reading()
    assert [t.task_id for t in reading] == [tasks["reading"].task_id]
    assert reading[0].ending == tpb.TASK_STATE_CANCELLED


def test_a_runs_ingest_partition_is_chosen_once_kept_for_its_jobs_and_chosen_again_for_a_new_run(two_stores):
    """gateway/placement.py chooses where a run's first IngestJob goes; a job written again for the run (a gateway
    restarted, another took the task over) must go to the same partition, or a second replica decodes the run."""
    a, b = two_stores
    task = _task()
    a.create(task, "alice", None, "")
    calls = []

    def choose(partition):
        return lambda: calls.append(partition) or partition
    assert a.ingest_partition(task.task_id, choose(5)) == 5
    assert b.ingest_partition(task.task_id, choose(2)) == 5, "the other gateway writes the run's job where it went"
    assert calls == [5]
    a.new_run(task.task_id, "the broker lost its data")
    assert b.ingest_partition(task.task_id, choose(2)) == 2, "a new run is placed again"
    assert a.ingest_partition(task.task_id, choose(7)) == 2
    unplaced = _task()
    a.create(unplaced, "alice", None, "")
    assert a.ingest_partition(unplaced.task_id, choose(None)) is None  # no replica heard from: keyed by task
    assert b.ingest_partition(unplaced.task_id, choose(3)) is None, "and so are the run's later jobs"
    older = _task()  # a task of a gateway older than placement: its jobs went by key, and so do its run's next
    a.create(older, "alice", None, "")
    a.db.execute("UPDATE tasks SET ingest_partition = NULL WHERE task_id = ?", (older.task_id,))
    assert b.ingest_partition(older.task_id, choose(4)) is None
    assert calls == [5, 2, None]


def test_a_store_made_by_an_older_version_gains_the_new_columns(tmp_path, postgres):
    """The columns added after the first release are added at start-up, on either database."""
    for location in (tmp_path / "old.sqlite3", postgres.create_database(f"old{time.monotonic_ns()}")):
        db = open_database(location)
        db.execute('CREATE TABLE tasks (task_id TEXT PRIMARY KEY, "user" TEXT NOT NULL, state INTEGER NOT NULL, '
                   "created_us BIGINT NOT NULL, finished_us BIGINT, idempotency_key TEXT, task BYTEA NOT NULL, "
                   "progress TEXT NOT NULL DEFAULT '{}', frames_total INTEGER NOT NULL DEFAULT 0, "
                   "produced INTEGER NOT NULL DEFAULT 0, last_progress_us BIGINT, "
                   "topics_deleted INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0)")
        db.close()
        store = TaskStore(location, SecretBox([Fernet.generate_key()]))
        task = _task()
        store.create(task, "alice", "k", "digest")  # upload_sha256 and webhook_* are among the added columns
        assert store.by_idempotency_key("alice", "k")[1] == "digest"
        store.close()


def test_a_postgresql_store_needs_the_keys_that_seal_its_secrets(postgres):
    with pytest.raises(ValueError, match="SecretBox"):
        TaskStore(postgres.url)


def test_admission_slots_count_on_every_store_and_lapse_when_not_renewed(two_stores):
    a, b = two_stores
    a.create(_task(), "alice", None)
    assert a.admit("alice", "slot-a", 3, ttl_s=60) is None
    assert b.admit("alice", "slot-b", 3, ttl_s=0.2) is None
    assert a.admit("alice", "slot-c", 3, ttl_s=60) == 3, "1 task + 2 slots held, on either store"
    assert b.admit("bob", "slot-d", 3, ttl_s=60) is None, "per user"
    time.sleep(0.3)  # slot-b's gateway stopped renewing it
    b.renew_admissions(["slot-a"], ttl_s=60)
    assert a.admit("alice", "slot-e", 3, ttl_s=60) is None, "the lapsed slot no longer counts"
    a.release_admission("slot-a")
    a.release_admission("slot-e")
    assert b.admit("alice", "slot-f", 2, ttl_s=60) is None


def test_a_lease_has_one_holder_until_it_lapses_or_is_given_up(two_stores):
    a, b = two_stores
    assert a.hold_lease("duty", "A", 0.3) and a.hold_lease("duty", "A", 0.3), "taken, then renewed"
    assert not b.hold_lease("duty", "B", 0.3) and b.lease_holder("duty") == "A"
    time.sleep(0.4)
    assert b.lease_holder("duty") is None and b.hold_lease("duty", "B", 10) and not a.hold_lease("duty", "A", 10)
    b.release_lease("duty", "A")  # not A's to give up: nothing changes
    assert a.lease_holder("duty") == "B"
    b.release_lease("duty", "B")
    assert a.hold_lease("duty", "A", 10)


def test_a_dead_gateways_tasks_and_reservations_are_taken_over_once(two_stores):
    """Tasks owned by a gateway whose lease lapsed are orphaned; one store takes each over, and only one;
    its reserved ids stop counting as reserved."""
    a, b = two_stores
    a.hold_lease("gateway:A", "A", 0.3)
    b.hold_lease("gateway:B", "B", 30)
    mine, theirs, ended = _task(), _task(), _task(tpb.TASK_STATE_COMPLETED)
    a.create(mine, "alice", None, owner="A")
    b.create(theirs, "alice", None, owner="B")
    a.create(ended, "alice", None, owner="A")
    a.add_reserved("reserved-by-a", "A")
    assert b.orphaned_tasks("gateway:") == [] and b.reserved_by_live_gateway("reserved-by-a", "gateway:")
    time.sleep(0.4)
    assert b.orphaned_tasks("gateway:") == [mine.task_id]
    assert not b.reserved_by_live_gateway("reserved-by-a", "gateway:")
    assert not b.take_over(theirs.task_id, "A", "gateway:"), "a live gateway's task stays its own"
    won = [b.take_over(mine.task_id, "B", "gateway:"), a.take_over(mine.task_id, "C", "gateway:")]
    assert won == [True, False]
    assert {t.task.task_id for t in b.active_tasks(owner="B")} == {mine.task_id, theirs.task_id}
    assert b.orphaned_tasks("gateway:") == []


def test_a_shared_store_tells_the_other_stores_which_task_changed(postgres):
    """PostgreSQL's NOTIFY: a write on one store reaches the listeners of the other (not its own, which
    hear it directly), after the commit."""
    box = SecretBox([Fernet.generate_key()])
    location = postgres.create_database(f"notify{time.monotonic_ns()}")
    a, b = TaskStore(location, box), TaskStore(location, box)
    heard_a, heard_b, stop = [], [], threading.Event()
    a.remote_listeners.append(heard_a.append)
    b.remote_listeners.append(heard_b.append)
    try:
        a.hear_other_gateways(stop)
        b.hear_other_gateways(stop)
        deadline = time.monotonic() + 10
        while not (None in heard_a and None in heard_b) and time.monotonic() < deadline:
            time.sleep(0.02)  # each listener says "anything may have changed" once it listens
        task = _task()
        a.create(task, "alice", None)
        b.transition(task.task_id, tpb.TASK_STATE_COMPLETED)
        deadline = time.monotonic() + 10
        while not (task.task_id in heard_a and task.task_id in heard_b) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heard_a == [None, task.task_id] and heard_b == [None, task.task_id]
    finally:
        stop.set()
        a.close()
        b.close()


def test_gateways_sealing_with_different_keys_cannot_share_a_store(postgres):
    from posemesh.mesh.at_rest import KeyFileError

    location = postgres.create_database(f"keys{time.monotonic_ns()}")
    TaskStore(location, SecretBox([Fernet.generate_key()])).close()
    with pytest.raises(KeyFileError, match="same POSEMESH_SECRETS_KEY_FILE"):
        TaskStore(location, SecretBox([Fernet.generate_key()]))


def test_a_task_whose_results_are_in_counts_every_step_complete_and_late_reports_change_nothing(two_stores):
    """annotate's result (60 frames written) read before track's last progress report, from another process:
    every step counts 60 at once; the late report does not lower it; a result of an older run is ignored."""
    a, b = two_stores
    task = _task()
    a.create(task, "alice", None)
    a.add_done(task.task_id, "decode", [(0, 59)], 0, frames_total=60)
    for step in ("detect", "pose", "annotate"):
        a.add_done(task.task_id, step, [(0, 59)], 0)
    a.add_done(task.task_id, "track", [(0, 51)], 0)
    b.finish_progress(task.task_id, 60, epoch=0)
    counts = {p.stage: (p.frames_done, p.frames_total) for p in a.get(task.task_id).progress}
    assert counts == {s: (60, 60) for s in ("decode", "detect", "pose", "track", "annotate")}
    assert not a.add_done(task.task_id, "track", [(52, 59)], 0)
    assert a.frames_done(task.task_id, "track") == 60

    rerun = _task()
    a.create(rerun, "alice", None)
    a.new_run(rerun.task_id, "the broker lost its data")
    a.add_done(rerun.task_id, "track", [(0, 9)], 1, frames_total=60)
    b.finish_progress(rerun.task_id, 60, epoch=0)
    assert a.frames_done(rerun.task_id, "track") == 10
