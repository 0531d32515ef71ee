"""Blocking work called from the API's coroutines, so the grpc.aio event loop never waits on it.

The task store is synchronous SQLite behind one lock that the event reader, the sweep and the frame
producers take too: a coroutine calling it directly would stop every call and stream of the gateway for
as long as any of them holds that lock. So the API reaches the store only through `AsyncTaskStore`, whose
calls run on a few threads of their own: slow Kafka or probing work in the default executor can never
queue in front of a `GetTask`.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from posemesh.gateway.store import TaskStore
from posemesh.v1 import task_service_pb2 as tpb

# One pool for the process: the store serializes its statements anyway; a few threads keep one call that
# waits for the store's lock from holding up the others' turn to wait.
_STORE_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-call")


async def store_call(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the store's threads."""
    return await asyncio.get_running_loop().run_in_executor(_STORE_THREADS, functools.partial(fn, *args, **kwargs))


async def run_to_the_end(fn, *args):
    """fn(*args) in a thread of the default executor, for work that must not be cut off half-way (make a
    task, then start it). If the awaiting call is cancelled (the client went away), the work still runs to
    its end, and the caller is told only then, so what it holds (a task slot) outlives the work."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its error has nobody to go to
        await asyncio.wait([future])
        raise


class AsyncTaskStore:
    """The reads the API makes, as coroutines (writes go with the work that follows them: see
    TaskService._create_and_start)."""

    def __init__(self, store: TaskStore):
        self.store = store

    async def get(self, task_id: str, user: str | None = None) -> tpb.Task | None:
        return await store_call(self.store.get, task_id, user)

    async def list(self, user: str, offset: int, limit: int, state: int = 0) -> tuple[list[tpb.Task], bool]:
        return await store_call(self.store.list, user, offset, limit, state)

    async def by_idempotency_key(self, user: str, key: str) -> tuple[tpb.Task, str] | None:
        return await store_call(self.store.by_idempotency_key, user, key)

    async def count_active(self, user: str) -> int:
        return await store_call(self.store.count_active, user)
