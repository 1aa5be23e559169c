"""Two asyncio helpers for the hot path: finish a hand-stepped awaitable; a shield paid for lazily.

The SSE writer (service.datapath) steps the frame generator's `__anext__()` by hand to learn
whether the next frame is ready without waiting; `resume` finishes such a step once it did have
to wait. `shielded` runs a cleanup that must not be cut short, entering anyio's shield only when
the cleanup actually suspends.

Must never: swallow a cancellation (it is forwarded into the awaitable, then re-raised by it).
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Generator
from typing import Any

import anyio


@types.coroutine
def resume(step: Any, yielded: Any) -> Generator[Any, Any, Any]:
    """Finish an `__anext__()` that was started by hand and is now waiting on `yielded`.

    The loop's task waits on what the step yielded (a future, or None for a bare yield) and
    resumes us; we resume the step, forwarding a cancellation if the task was cancelled meanwhile.
    """
    while True:
        try:
            received = yield yielded
        except BaseException as exc:
            try:
                yielded = step.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = step.send(received)
            except StopIteration as stop:
                return stop.value


async def shielded(coro: Awaitable[None]) -> None:
    """Await `coro` shielded from cancellation, paying for the shield only if it suspends.

    Closing a run usually finishes without waiting on anything; anyio's `CancelScope` costs
    ~10 µs a request (the backend lookup, the scope bookkeeping) even then.
    """
    try:
        yielded = coro.send(None)  # type: ignore[attr-defined]
    except StopIteration:
        return
    with anyio.CancelScope(shield=True):
        await resume(coro, yielded)
