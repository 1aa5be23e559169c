"""The edge chat route's writer: frames ready together share a write, none waits on the engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import pytest

from schemas.errors import RequestTooLargeError
from service.aio import shielded
from service.datapath import _BATCH_FRAMES, _pump, read_body


class Recorder:
    """An ASGI `send` that keeps the bodies it was given and when."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.times: list[float] = []
        self.last_more: bool | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        """Record one body message."""
        self.bodies.append(message["body"])
        self.times.append(time.perf_counter())
        self.last_more = message.get("more_body", False)


async def ready_frames(count: int) -> AsyncIterator[bytes]:
    """Frames an engine hands over all at once (no await between them)."""
    for i in range(count):
        yield f"data: {i}\n\n".encode()


async def test_ready_frames_share_writes_and_the_first_leaves_alone() -> None:
    """Ready frames: the first alone, then full batches, the rest with the end of the body."""
    count = 2 * _BATCH_FRAMES + 8
    send = Recorder()
    await _pump(ready_frames(count), send)
    assert send.bodies[0] == b"data: 0\n\n"
    assert [b.count(b"data:") for b in send.bodies] == [1, _BATCH_FRAMES, _BATCH_FRAMES, 7]
    assert b"".join(send.bodies) == b"".join(f"data: {i}\n\n".encode() for i in range(count))
    assert send.last_more is False


async def test_a_frame_never_waits_for_the_engine() -> None:
    """When the engine blocks, what is ready is written first; then each frame as it comes."""
    yielded: list[float] = []

    async def slow() -> AsyncIterator[bytes]:
        for i in range(4):
            yielded.append(time.perf_counter())
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0.02)

    send = Recorder()
    await _pump(slow(), send)
    assert [b.count(b"data:") for b in send.bodies[:4]] == [1, 1, 1, 1]
    # each frame went out before the engine's next wait ended
    for frame_at, sent_at in zip(yielded[1:], send.times[1:4], strict=True):
        assert sent_at - frame_at < 0.015


async def test_cancelling_the_writer_reaches_the_engine() -> None:
    """A cancelled stream (client gone) runs the engine generator's cleanup."""
    cleaned = asyncio.Event()

    async def endless() -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            cleaned.set()

    frames = endless()
    task = asyncio.ensure_future(_pump(frames, Recorder()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await frames.aclose()
    assert cleaned.is_set()


async def test_shielded_close_finishes_when_its_scope_is_cancelled() -> None:
    """A close that has to wait still runs to its end when the request's scope is cancelled."""
    finished = asyncio.Event()
    started = asyncio.Event()

    async def close() -> None:
        started.set()
        await asyncio.sleep(0.05)
        finished.set()

    async with anyio.create_task_group() as group:

        async def request() -> None:
            await shielded(close())

        group.start_soon(request)
        await started.wait()
        group.cancel_scope.cancel()
    assert finished.is_set()


async def test_shielded_close_that_does_not_wait_costs_no_scope() -> None:
    """A close that finishes at once is simply run (no suspension, nothing scheduled)."""
    ran = []

    async def close() -> None:
        ran.append(1)

    await shielded(close())
    assert ran == [1]


async def test_body_over_the_limit_is_refused_while_reading() -> None:
    """A chunked body is refused once it passes the limit, before the rest is read."""
    messages = [
        {"type": "http.request", "body": b"x" * 60, "more_body": True},
        {"type": "http.request", "body": b"x" * 60, "more_body": True},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    with pytest.raises(RequestTooLargeError):
        await read_body([], receive, 100)
    assert messages == []


async def test_body_in_parts_is_joined() -> None:
    """A body in several messages comes back whole."""
    messages = [
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b"1}", "more_body": False},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    assert await read_body([(b"content-length", b"7")], receive, 100) == b'{"a":1}'
