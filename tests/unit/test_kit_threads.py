"""The kit's thread bridge: items in order, errors re-raised, cancel on close, slots, join.

Then its two delta helpers: `stream_deltas` (what the loop side stamps on) and `each_choice`
(n choices in turn, the rest `abort` once cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from adapters.kit.threads import (
    BridgeClosedError,
    Emit,
    Job,
    ThreadBridge,
    each_choice,
    stream_deltas,
)
from schemas.generation import TokenDelta


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


def _choices(n: int, pieces: int, cancel_after: int | None = None):  # type: ignore[no-untyped-def]
    """A worker of `n` choices of `pieces` text deltas each; cancels itself after a count."""
    made: list[int] = []

    def work(job: Job, emit: Emit[TokenDelta]) -> None:
        def choice(index: int) -> TokenDelta:
            made.append(index)
            for i in range(pieces):
                if cancel_after is not None and len(made) * pieces + i > cancel_after:
                    job.cancel.set()
                if job.cancelled:
                    return TokenDelta("", 0, index, finish_reason="abort")
                emit(TokenDelta(f"{index}.{i} ", 1, index, engine_first_token_at=1.0 + i))
            return TokenDelta("", 0, index, finish_reason="length")

        each_choice(n, job, emit, choice)

    return work, made


async def test_stream_deltas_stamps_the_first_delta_and_every_final() -> None:
    """Prompt size, queue and schedule times and prompt ids on the first; prompt size on finals."""
    bridge: ThreadBridge[TokenDelta] = ThreadBridge(1)
    work, _ = _choices(2, 2)
    job = Job()
    prompt = (5, 6, 7)
    deltas = [d async for d in stream_deltas(bridge, work, job, prompt, prompt_token_ids=True)]
    first, *rest = deltas
    assert (first.text, first.prompt_tokens, first.prompt_token_ids) == ("0.0 ", 3, prompt)
    assert first.engine_queued_at == job.queued_at
    assert first.engine_scheduled_at == job.scheduled_at is not None
    assert job.queued_at <= job.scheduled_at
    assert first.engine_first_token_at == 1.0  # what the worker set passes through
    for d in rest:
        assert (d.engine_queued_at, d.engine_scheduled_at, d.prompt_token_ids) == (None,) * 3
        assert d.prompt_tokens == (3 if d.finish_reason else None)
    assert [(d.index, d.finish_reason) for d in deltas if d.finish_reason] == [
        (0, "length"),
        (1, "length"),
    ]
    # without prompt_token_ids the prompt's ids stay off
    plain = [d async for d in stream_deltas(bridge, _choices(1, 1)[0], Job(), prompt)]
    assert plain[0].prompt_token_ids is None
    await bridge.aclose()


async def test_stream_deltas_first_delta_may_be_a_final() -> None:
    """A stream whose only delta is its finish still gets the first delta's stamps."""
    bridge: ThreadBridge[TokenDelta] = ThreadBridge(1)
    (only,) = [d async for d in stream_deltas(bridge, _choices(1, 0)[0], Job(), (1, 2))]
    assert (only.finish_reason, only.prompt_tokens) == ("length", 2)
    assert only.engine_scheduled_at is not None
    await bridge.aclose()


async def test_each_choice_runs_in_turn_and_aborts_the_rest_once_cancelled() -> None:
    """Choices run 0, 1, 2 in order; after a cancel, the ones not begun end abort unrun."""
    bridge: ThreadBridge[TokenDelta] = ThreadBridge(1)
    work, made = _choices(3, 2)
    deltas = [d async for d in bridge.stream(work)]
    assert [d.index for d in deltas] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert made == [0, 1, 2]
    work, made = _choices(4, 2, cancel_after=4)  # cancelled during choice 1
    deltas = [d async for d in bridge.stream(work)]
    finals = [(d.index, d.finish_reason) for d in deltas if d.finish_reason]
    assert finals == [(0, "length"), (1, "abort"), (2, "abort"), (3, "abort")]
    assert made == [0, 1]  # 2 and 3 never ran
    await bridge.aclose()


async def test_closing_stream_deltas_joins_the_worker() -> None:
    """aclose() on the helper's stream returns once the worker saw the flag and returned."""
    bridge: ThreadBridge[TokenDelta] = ThreadBridge(1)
    returned = threading.Event()

    def work(job: Job, emit: Emit[TokenDelta]) -> None:
        while not job.cancelled:
            emit(TokenDelta("x", 1))
            time.sleep(0.001)
        returned.set()

    stream = stream_deltas(bridge, work, Job(), (1,))
    await anext(stream)
    await stream.aclose()
    assert returned.is_set()
    assert bridge.running == 0
    await bridge.aclose()
