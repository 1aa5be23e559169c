"""The kit's thread bridge: items in order, errors re-raised, cancel on close, slots, join."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from adapters.kit.threads import BridgeClosedError, Emit, Job, ThreadBridge


def _counter(limit: int, delay: float = 0.0, stopped: list[int] | None = None):  # type: ignore[no-untyped-def]
    def work(job: Job, emit: Emit[int]) -> None:
        for i in range(limit):
            if job.cancelled:
                if stopped is not None:
                    stopped.append(i)
                return
            emit(i)
            time.sleep(delay)

    return work


async def test_items_arrive_in_order_and_the_stream_ends() -> None:
    """Every emitted item, in order; the slot is free afterwards."""
    bridge: ThreadBridge[int] = ThreadBridge(1)
    got = [i async for i in bridge.stream(_counter(50))]
    assert got == list(range(50))
    assert bridge.running == 0
    await bridge.aclose()


async def test_a_worker_error_is_reraised_after_its_items() -> None:
    """The items before the error arrive, then the worker's own exception."""
    bridge: ThreadBridge[int] = ThreadBridge(1)

    def work(job: Job, emit: Emit[int]) -> None:
        emit(1)
        raise KeyError("boom")

    stream = bridge.stream(work)
    assert await anext(stream) == 1
    with pytest.raises(KeyError):
        await anext(stream)
    await bridge.aclose()


async def test_closing_the_stream_stops_and_joins_the_worker() -> None:
    """aclose() on the stream returns only after the worker saw the cancel flag and returned."""
    bridge: ThreadBridge[int] = ThreadBridge(1)
    stopped: list[int] = []
    stream = bridge.stream(_counter(10_000, 0.001, stopped))
    assert await anext(stream) == 0
    await stream.aclose()
    # joined: the worker has returned before aclose() did, well before its 10 000 items
    assert stopped
    assert stopped[0] < 10_000
    assert bridge.running == 0
    await bridge.aclose()


async def test_slots_bound_concurrency_and_queue_the_rest() -> None:
    """One slot: the second stream waits until the first worker returns."""
    bridge: ThreadBridge[int] = ThreadBridge(1)
    release = threading.Event()

    def hold(job: Job, emit: Emit[int]) -> None:
        emit(0)
        release.wait(5)

    first = bridge.stream(hold)
    assert await anext(first) == 0
    second = asyncio.ensure_future(anext(bridge.stream(_counter(1))))
    await asyncio.sleep(0.05)
    assert (bridge.running, bridge.waiting) == (1, 1)
    release.set()
    with contextlib.suppress(StopAsyncIteration):
        await anext(first)
    assert await second == 0
    await bridge.aclose()


async def test_aclose_cancels_running_jobs_and_refuses_waiting_ones() -> None:
    """Unload: running workers stop and are joined, waiting and new streams are refused."""
    bridge: ThreadBridge[int] = ThreadBridge(1)
    stopped: list[int] = []
    running = bridge.stream(_counter(100_000, 0.001, stopped))
    assert await anext(running) == 0
    waiting = asyncio.ensure_future(anext(bridge.stream(_counter(1))))
    await asyncio.sleep(0.02)
    await bridge.aclose()
    assert stopped  # the running worker saw its cancel flag and returned
    with pytest.raises(BridgeClosedError):
        await waiting
    with pytest.raises(BridgeClosedError):
        await anext(bridge.stream(_counter(1)))
    await running.aclose()
