"""TaskService's API logic through the real interceptors, in process (tests/gateway/conftest.py): who may
call, what a malformed request gets, whose tasks a user sees, per-user limits, and what an unexpected
failure looks like from outside. No broker, no Triton: each test runs in a fraction of a second."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
import time

import grpc
import pytest
from cryptography.fernet import Fernet
from prometheus_client import REGISTRY

from posemesh.gateway.service import TaskService
from posemesh.gateway.validation import Refused
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import USERS, auth
from tests.helpers import upload_requests

KEYPOINTS = tpb.ARTIFACT_KIND_KEYPOINTS


def expect(api, code, call) -> str:
    """The call fails with `code` and a short message a person can act on, showing nothing of the server."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    details = err.value.details()
    assert details and len(details) < 300, details
    for leak in (str(api.gateway.settings.data_dir), "/tmp", "Traceback", "File \"", "Error"):
        assert leak not in details, f"{leak!r} in {details!r}"
    return details


def uploads(outcome: str) -> float:
    return REGISTRY.get_sample_value("posemesh_gateway_uploads_total", {"outcome": outcome}) or 0.0


def every_method(stub, task_id: str, metadata):
    """One call of each method about `task_id` (streams read to their end)."""
    return {
        "GetTask": lambda: stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=metadata),
        "CancelTask": lambda: stub.CancelTask(tpb.CancelTaskRequest(task_id=task_id), metadata=metadata),
        "DeleteTask": lambda: stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task_id), metadata=metadata),
        "WatchTask": lambda: list(stub.WatchTask(tpb.WatchTaskRequest(task_id=task_id), metadata=metadata)),
        "WatchFrames": lambda: list(stub.WatchFrames(tpb.WatchFramesRequest(task_id=task_id), metadata=metadata)),
        "DownloadResult": lambda: list(stub.DownloadResult(
            tpb.DownloadResultRequest(task_id=task_id, kind=KEYPOINTS), metadata=metadata)),
    }


def test_calls_without_exactly_one_good_key_are_unauthenticated(api):
    task = api.add_task()
    alice, bob = (f"Bearer {USERS[u]}" for u in ("alice", "bob"))
    cases = {"missing API key": [], "unknown API key": [("authorization", "Bearer nope")],
             "expected 'Bearer <key>'": [("authorization", USERS["alice"])],
             "2 authorization headers: send exactly one": [("authorization", alice), ("authorization", bob)]}
    cases["send exactly one"] = [("authorization", alice)] * 2  # the same good key twice is refused too
    refused_uploads = uploads("unauthenticated")
    for problem, metadata in cases.items():
        calls = every_method(api.stub, task.task_id, metadata)
        calls["ListTasks"] = lambda metadata=metadata: api.stub.ListTasks(tpb.ListTasksRequest(), metadata=metadata)
        calls["Upload"] = lambda metadata=metadata: api.stub.Upload(upload_requests(b"x"), metadata=metadata)
        for method, call in calls.items():
            assert problem in expect(api, grpc.StatusCode.UNAUTHENTICATED, call), (problem, method)
    assert uploads("unauthenticated") - refused_uploads == len(cases)  # counted, as before the method runs
    assert not api.gateway.limits.streams  # a refused stream held no slot
    assert api.store.get(task.task_id).state == tpb.TASK_STATE_RUNNING  # and nothing was done


def test_health_and_reflection_need_no_key(api):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(api.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="posemesh.v1.TaskService")).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert {"posemesh.v1.TaskService", "grpc.health.v1.Health"} <= {
        s.name for s in answer.list_services_response.service}


def test_malformed_task_ids_are_invalid_argument_naming_the_field(api):
    for bad in ("", "../../etc/passwd", "x" * 10_000, "A" * 32):
        for method, call in every_method(api.stub, bad, auth()).items():
            msg = expect(api, grpc.StatusCode.INVALID_ARGUMENT, call)
            assert "task_id" in msg and len(msg) < 200, (method, msg)
            if len(bad) > 1000:
                assert "10000 characters" in msg


def test_malformed_page_tokens_and_sizes_are_invalid_argument_naming_the_field(api):
    for token in ("garbage", "A" * 10_000, "%%%", "o:5", "bzotMQ==", "eDox"):  # "o:-1", "x:1" encoded
        msg = expect(api, grpc.StatusCode.INVALID_ARGUMENT,
                     lambda token=token: api.stub.ListTasks(tpb.ListTasksRequest(page_token=token), metadata=auth()))
        assert "page_token" in msg and len(msg) < 200
    msg = expect(api, grpc.StatusCode.INVALID_ARGUMENT,
                 lambda: api.stub.ListTasks(tpb.ListTasksRequest(page_size=-1), metadata=auth()))
    assert "page_size" in msg


def test_another_users_task_is_indistinguishable_from_a_missing_one(api):
    task = api.add_task("alice", artifacts=[tpb.Artifact(kind=KEYPOINTS, file_name="keypoints.jsonl")])
    missing = "0" * 32
    for method, call in every_method(api.stub, task.task_id, auth("bob")).items():
        msg = expect(api, grpc.StatusCode.NOT_FOUND, call)
        assert msg == f"no task {task.task_id}", (method, msg)
        assert expect(api, grpc.StatusCode.NOT_FOUND, every_method(api.stub, missing, auth("bob"))[method]) == \
            f"no task {missing}"
    assert list(api.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth("bob")).tasks) == []
    # The interceptor handed each call its own user: alice's calls see her task, untouched by bob's.
    assert api.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task.state == \
        tpb.TASK_STATE_RUNNING
    assert [t.task_id for t in api.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth()).tasks] == [task.task_id]


def test_open_streams_per_user_are_capped_naming_the_limit(api_factory):
    api = api_factory(max_streams_per_user=2)
    task, bobs = api.add_task("alice"), api.add_task("bob")
    watch = tpb.WatchTaskRequest(task_id=task.task_id)
    streams = [api.stub.WatchTask(watch, metadata=auth()) for _ in range(2)]
    try:
        assert all(next(s).task.task_id == task.task_id for s in streams)  # both open and served
        for call, what in ((lambda: next(api.stub.WatchTask(watch, metadata=auth())), "another watch"),
                           (lambda: api.stub.Upload(upload_requests(b"x"), metadata=auth()), "another upload"),
                           (lambda: list(api.stub.DownloadResult(tpb.DownloadResultRequest(
                               task_id=task.task_id, kind=KEYPOINTS), metadata=auth())), "another download")):
            msg = expect(api, grpc.StatusCode.RESOURCE_EXHAUSTED, call)
            assert "2 streams open" in msg and "at most 2 are allowed" in msg and what in msg, msg
        # Calls that are not streams, and other users' streams, are not affected.
        assert api.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task
        bob = api.stub.WatchTask(tpb.WatchTaskRequest(task_id=bobs.task_id), metadata=auth("bob"))
        assert next(bob).task.task_id == bobs.task_id
        bob.cancel()
        # A closed stream gives its slot back as soon as the server sees it go.
        streams.pop().cancel()
        deadline = time.monotonic() + 2
        while api.gateway.limits.streams.get("alice", 0) > 1:
            assert time.monotonic() < deadline, dict(api.gateway.limits.streams)
            time.sleep(0.01)
        streams.append(api.stub.WatchTask(watch, metadata=auth()))
        assert next(streams[-1]).task.task_id == task.task_id
    finally:
        for s in streams:
            s.cancel()


def test_active_task_limit_is_checked_where_a_task_is_made(api_factory):
    api = api_factory(max_active_tasks_per_user=1)
    api.add_task("alice")
    exhausted = uploads("resource_exhausted")
    msg = expect(api, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 lambda: api.stub.Upload(upload_requests(b"x" * 1000), metadata=auth()))
    assert "1 tasks queued, running or uploading" in msg and "at most 1 are allowed" in msg
    assert uploads("resource_exhausted") - exhausted == 1
    # bob is under his limit: his upload gets as far as its (empty) content, and gives its slot back.
    msg = expect(api, grpc.StatusCode.INVALID_ARGUMENT,
                 lambda: api.stub.Upload(upload_requests(b""), metadata=auth("bob")))
    assert "no bytes" in msg
    assert not api.gateway.limits.receiving and not api.gateway.limits.streams
    assert not list(api.gateway.settings.jobs_dir.iterdir())


def test_unexpected_errors_are_internal_with_a_reference_and_nothing_else(api, monkeypatch, caplog):
    task = api.add_task()
    db = api.gateway.settings.db_path

    def broken(*_args, **_kw):
        raise sqlite3.OperationalError(f"disk I/O error in {db}")

    monkeypatch.setattr(api.store, "get", broken)
    monkeypatch.setattr(api.store, "list", lambda *_a: open(api.gateway.settings.jobs_dir / "nope" / "upload"))
    caplog.set_level(logging.ERROR, logger="posemesh.gateway")
    calls = {"GetTask": lambda: api.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()),
             "WatchTask": lambda: list(api.stub.WatchTask(tpb.WatchTaskRequest(task_id=task.task_id),
                                                          metadata=auth())),
             "ListTasks": lambda: api.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth())}
    for method, call in calls.items():
        msg = expect(api, grpc.StatusCode.INTERNAL, call)
        assert "OperationalError" not in msg and "disk I/O" not in msg and "nope" not in msg, msg
        reference = re.search(r"error reference ([0-9a-f]{8})", msg).group(1)
        # The whole story is in the server's log, under that reference.
        [record] = [r for r in caplog.records if reference in r.getMessage()]
        assert method in record.getMessage() and record.exc_info is not None
    assert not api.gateway.limits.streams  # the failed stream gave its slot back


def test_the_task_store_is_never_called_on_the_event_loop(api_factory, monkeypatch):
    api = api_factory(max_active_tasks_per_user=2)
    callers: list[tuple[str, str]] = []

    def watched(name, method):
        def call(*args, **kwargs):
            callers.append((name, threading.current_thread().name))
            return method(*args, **kwargs)
        return call

    for name in ("get", "list", "admit", "release_admission", "by_idempotency_key", "create", "transition", "update"):
        monkeypatch.setattr(api.store, name, watched(name, getattr(api.store, name)))
    task = api.add_task()
    callers.clear()
    api.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth())
    api.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth())
    stream = api.stub.WatchTask(tpb.WatchTaskRequest(task_id=task.task_id), metadata=auth())
    next(stream)
    api.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    assert next(stream).task.state == tpb.TASK_STATE_CANCELLED  # woken by the change, read again
    stream.cancel()
    expect(api, grpc.StatusCode.INVALID_ARGUMENT,  # past the idempotency key's look-up and the task limit
           lambda: api.stub.Upload(upload_requests(b"", key="k-1"), metadata=auth()))
    assert {name for name, _thread in callers} >= {"get", "list", "admit", "release_admission", "by_idempotency_key"}
    assert [c for c in callers if c[1] == api.thread.name] == [], "the store was called on the event loop"


def test_a_watch_sees_a_change_made_while_it_read_the_task_before(api, monkeypatch):
    """The last progress report wakes a task's watchers, and its completion lands while they read the task:
    the watch must still send the completion at once, not at its next poll (it came 2 s late in the stack)."""
    import posemesh.gateway.service as service

    monkeypatch.setattr(service, "WATCH_POLL_S", 60.0)  # a missed change would wait this long
    task = api.add_task()
    read = api.store.get
    complete_after_next_read = threading.Event()

    def get_then_complete(task_id, user=None):
        seen = read(task_id, user)
        if complete_after_next_read.is_set():  # after the read, before the watch waits again
            complete_after_next_read.clear()
            api.store.transition(task_id, tpb.TASK_STATE_COMPLETED)
        return seen

    monkeypatch.setattr(api.store, "get", get_then_complete)
    stream = api.stub.WatchTask(tpb.WatchTaskRequest(task_id=task.task_id), metadata=auth(), timeout=20)
    try:
        assert next(stream).task.state == tpb.TASK_STATE_RUNNING
        complete_after_next_read.set()
        api.store.update(task.task_id, lambda t: t.warnings.append("a progress report"))
        progressed = next(stream).task
        assert progressed.state == tpb.TASK_STATE_RUNNING and list(progressed.warnings) == ["a progress report"]
        started = time.monotonic()
        assert next(stream).task.state == tpb.TASK_STATE_COMPLETED
        assert time.monotonic() - started < 10
    finally:
        stream.cancel()


def test_a_method_reached_without_the_interceptors_fails_closed(api):
    service = TaskService(api.gateway)
    with pytest.raises(Refused) as err:
        asyncio.run(service.ListTasks(tpb.ListTasksRequest(), None))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_repeated_or_unknown_outputs_are_invalid_argument_naming_the_field(api):
    """`outputs` is echoed back by every GetTask: 10,000 repeated entries were accepted and carried."""
    for outputs, says in (([KEYPOINTS] * 10_000, "more than once"), ([KEYPOINTS, 99], "unknown output kind 99")):
        options = tpb.TaskOptions(outputs=outputs)
        msg = expect(api, grpc.StatusCode.INVALID_ARGUMENT,
                     lambda options=options: api.stub.Upload(upload_requests(b"x", options=options), metadata=auth()))
        assert "options.outputs" in msg and says in msg, msg
    assert not api.gateway.limits.streams


def test_a_trickling_upload_ends_with_deadline_exceeded_and_frees_its_slots(api_factory):
    """One byte a second would hold a task slot for as long as the client liked: past the grace period an
    upload must keep the minimum average pace, or it ends, keeping nothing."""
    api = api_factory(upload_min_bytes_per_s=1000, upload_grace_s=0.5)

    def trickle():
        yield tpb.UploadRequest(metadata=tpb.UploadMetadata(file_name="slow.mp4"))
        for _ in range(30):
            time.sleep(1.0)
            yield tpb.UploadRequest(chunk=b"x")

    t0 = time.monotonic()
    msg = expect(api, grpc.StatusCode.DEADLINE_EXCEEDED, lambda: api.stub.Upload(trickle(), metadata=auth()))
    assert time.monotonic() - t0 < 5, "ended once behind the pace, not when the client gave up"
    assert "1000 bytes a second" in msg and "nothing was kept" in msg, msg
    assert not api.gateway.limits.streams and not api.gateway.limits.receiving  # both slots free again
    assert not list(api.gateway.settings.jobs_dir.glob("*/upload*")), "a refused upload left its bytes"

    # A client that sends nothing at all after opening the stream is cut off the same way.
    def silent():
        time.sleep(3)
        yield tpb.UploadRequest(metadata=tpb.UploadMetadata(file_name="silent.mp4"))

    expect(api, grpc.StatusCode.DEADLINE_EXCEEDED, lambda: api.stub.Upload(silent(), metadata=auth()))


def test_a_bad_region_of_interest_max_persons_sample_fps_or_given_boxes_is_invalid_argument_naming_the_field(api):
    def point(x, y):
        return tpb.Point(x=x, y=y)

    def boxes(index, *corners):
        return tpb.FrameBoxes(frame_index=index, boxes=[tpb.Box(x1=a, y1=b, x2=c, y2=d) for a, b, c, d in corners])

    square = [point(0, 0), point(100, 0), point(100, 100), point(0, 100)]
    for options, says in (
            (tpb.TaskOptions(region_of_interest=square[:2]), "options.region_of_interest: a polygon needs 3"),
            (tpb.TaskOptions(region_of_interest=[point(0, 0), point(10, 10), point(20, 20)]), "encloses no area"),
            (tpb.TaskOptions(region_of_interest=[*square[:3], point(float("nan"), 5)]), "point 3"),
            (tpb.TaskOptions(region_of_interest=[point(-1, 0), *square[1:]]), "point 0"),
            (tpb.TaskOptions(region_of_interest=square * 17), "3 to 64 points, not 68"),
            (tpb.TaskOptions(max_persons=1001), "options.max_persons must be at most 1000"),
            (tpb.TaskOptions(sample_fps=-1), "options.sample_fps must be between 0 (every frame) and 120"),
            (tpb.TaskOptions(sample_fps=float("inf")), "options.sample_fps must be between"),
            (tpb.TaskOptions(sample_fps=500), "options.sample_fps must be between"),
            (tpb.TaskOptions(given_boxes=[boxes(-1)]), "options.given_boxes[0] (frame_index -1): frame_index counts"),
            (tpb.TaskOptions(given_boxes=[boxes(0), boxes(3), boxes(0)]), "given_boxes[2] (frame_index 0): frame 0 "
                                                                          "is listed twice"),
            (tpb.TaskOptions(given_boxes=[boxes(4, (10, 10, 5, 20))]), "given_boxes[0] (frame_index 4), box 0: x2 "
                                                                       "must be right of x1"),
            (tpb.TaskOptions(given_boxes=[boxes(4, (0, 0, 9, 9), (0, float("nan"), 1, 1))]), "box 1: corners"),
            (tpb.TaskOptions(given_boxes=[boxes(3, *[(0, 0, 9, 9)] * 1001)]), "1001 boxes; at most 1000 in a frame"),
            (tpb.TaskOptions(given_boxes=[boxes(i, *[(0, 0, 9, 9)] * 1000) for i in range(101)]),
             "options.given_boxes: more than 100000 boxes in all")):
        msg = expect(api, grpc.StatusCode.INVALID_ARGUMENT,
                     lambda options=options: api.stub.Upload(upload_requests(b"x", options=options), metadata=auth()))
        assert says in msg, msg
    assert not api.gateway.limits.streams


def test_the_active_task_limit_holds_across_gateways_sharing_a_store(api_factory, postgres, tmp_path):
    """Two gateways on one PostgreSQL store: an upload being received on either counts against the user's
    limit on both, and the slot is given back in the store when the upload ends."""
    url = postgres.create_database(f"limits{time.monotonic_ns()}")
    key = tmp_path / "secrets.key"  # gateways sharing a store share the key sealing its secrets
    key.write_text(Fernet.generate_key().decode())
    a, b = (api_factory(store_url=url, max_active_tasks_per_user=2, secrets_key_file=str(key)) for _ in range(2))
    release = threading.Event()

    def held(api, results):
        def requests():
            yield tpb.UploadRequest(metadata=tpb.UploadMetadata(file_name="clip.mp4"))
            release.wait(30)  # received, never finished: its slot stays taken until the client gives up
        try:
            api.stub.Upload(requests(), metadata=auth())
        except grpc.RpcError as exc:
            results.append(exc.code())

    results: list = []
    threads = [threading.Thread(target=held, args=(api, results)) for api in (a, b)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while not (a.gateway.limits.receiving["alice"] == 1 == b.gateway.limits.receiving["alice"]):
            assert time.monotonic() < deadline, "both uploads to be admitted"
            time.sleep(0.05)
        for api in (a, b):
            msg = expect(api, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         lambda api=api: api.stub.Upload(upload_requests(b"x" * 1000), metadata=auth()))
            assert "you have 2 tasks queued, running or uploading; at most 2" in msg, msg
        msg = expect(a, grpc.StatusCode.INVALID_ARGUMENT,  # bob is under his limit: past it, to his empty upload
                     lambda: a.stub.Upload(upload_requests(b""), metadata=auth("bob")))
        assert "no bytes" in msg
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert results == [grpc.StatusCode.INVALID_ARGUMENT] * 2  # ended without a byte of video
    assert not a.gateway.limits.receiving and not b.gateway.limits.receiving
    assert a.store.admit("alice", "after", 2, 60.0) is None, "both slots were given back in the store"
