"""Blocking work called from coroutines (posemesh.gateway.blocking): off the event loop, and work that must
not be cut off half-way outlives a caller that is cancelled."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from posemesh.gateway.blocking import run_to_the_end, store_call


def test_store_calls_run_on_their_own_threads():
    async def main():
        return threading.current_thread(), await store_call(threading.current_thread)

    loop_thread, call_thread = asyncio.run(main())
    assert call_thread is not loop_thread and call_thread.name.startswith("store-call")


def test_work_run_to_the_end_finishes_before_its_cancelled_caller_lets_go():
    order: list[str] = []

    def make_task():
        time.sleep(0.1)
        order.append("task made")

    async def upload():
        try:
            await run_to_the_end(make_task)
        finally:
            order.append("slot released")

    async def main():
        call = asyncio.create_task(upload())
        await asyncio.sleep(0.02)
        call.cancel()  # the client went away while the task was being made
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    assert order == ["task made", "slot released"]
