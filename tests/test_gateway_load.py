"""No user can starve another: 200 open WatchTask streams and uploads from several users, and every
other call is still answered; one user's streams are capped with RESOURCE_EXHAUSTED. Real gateway on a
free port, real clients (grpc.aio for the crowd of streams)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from tests.conftest import media
from tests.helpers import upload, upload_requests, wait_for

KEYS = {u: f"{u}-key" for u in ("alice", "bob", "carol", "dave", "erin")}


def meta(user: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[user]}")]


class Crowd:
    """`per_user` WatchTask streams for each user, held open from one asyncio thread until stop()."""

    def __init__(self, address: str, tasks: dict[str, str], per_user: int):
        self.address, self.tasks, self.per_user = address, tasks, per_user
        self.open = 0
        self.errors: list = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),), daemon=True)
        self.stop_event: asyncio.Event | None = None

    async def _watch(self, stub, user: str) -> None:
        try:
            call = stub.WatchTask(tpb.WatchTaskRequest(task_id=self.tasks[user]), metadata=meta(user))
            await call.read()  # the snapshot: the stream is open and served
            self.open += 1
            if self.open == self.per_user * len(self.tasks):
                self.ready.set()
            await self.stop_event.wait()
            call.cancel()
        except grpc.RpcError as exc:
            self.errors.append(exc.code())
            self.ready.set()

    async def _run(self) -> None:
        self.stop_event = asyncio.Event()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = tpb_grpc.TaskServiceStub(channel)
            await asyncio.gather(*(self._watch(stub, u) for u in self.tasks for _ in range(self.per_user)))

    def start(self) -> Crowd:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


@pytest.fixture
def crowded_gateway(gateway_factory):
    return gateway_factory(api_keys=",".join(f"{u}:{k}" for u, k in KEYS.items()), max_streams_per_user=64,
                           max_active_tasks_per_user=20, stall_timeout_s=600.0)


def test_200_open_streams_do_not_starve_anyone(crowded_gateway):
    gw = crowded_gateway
    clip = media("mmpose_demo_960x540_5f.mp4")
    tasks = {u: upload(gw.stub, clip, meta(u)).task_id for u in ("alice", "bob", "carol", "dave")}
    crowd = Crowd(gw.address, tasks, per_user=50).start()  # 200 streams
    try:
        assert crowd.ready.wait(60) and crowd.open == 200 and not crowd.errors, (crowd.open, crowd.errors[:3])
        latencies = []
        for _ in range(50):  # erin's calls while 200 streams are open
            t0 = time.perf_counter()
            gw.stub.GetTask(tpb.GetTaskRequest(task_id=tasks["alice"]), metadata=meta("alice"), timeout=5)
            latencies.append(time.perf_counter() - t0)
            gw.stub.ListTasks(tpb.ListTasksRequest(), metadata=meta("erin"), timeout=5)
        for _ in range(3):  # and uploads still go through
            task = gw.stub.Upload(upload_requests(clip.read_bytes()), metadata=meta("erin"), timeout=30).task
            assert task.state == tpb.TASK_STATE_RUNNING
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.5 and latencies[-1] < 5, latencies
    finally:
        crowd.stop()


def test_one_user_cannot_hold_more_streams_than_the_limit(crowded_gateway):
    gw = crowded_gateway
    task = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), meta("alice")).task_id
    crowd = Crowd(gw.address, {"alice": task}, per_user=64).start()
    try:
        assert crowd.ready.wait(60) and crowd.open == 64
        with pytest.raises(grpc.RpcError) as err:
            next(gw.stub.WatchTask(tpb.WatchTaskRequest(task_id=task), metadata=meta("alice"), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "64" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # uploads are streams too
            gw.stub.Upload(upload_requests(media("mmpose_demo_960x540_5f.mp4").read_bytes()), metadata=meta("alice"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Everyone else is unaffected.
        other = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), meta("bob")).task_id
        assert next(gw.stub.WatchTask(tpb.WatchTaskRequest(task_id=other), metadata=meta("bob"), timeout=5)).task
    finally:
        crowd.stop()
    # Closed streams give their slots back (as soon as the server has seen the cancellations).
    def watch_again():
        try:
            return next(gw.stub.WatchTask(tpb.WatchTaskRequest(task_id=task), metadata=meta("alice"), timeout=5)).task
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return None
    assert wait_for(watch_again, 15, 0.2, "closed streams to give their slots back")
