"""Admission control: at most `max_concurrency` generations at once, a bounded queue, then 429.

A request reserves a place before its response starts (so "queue full" is a real 429 status, not
an error inside a 200 stream), then waits for a slot. Engines that batch internally (vLLM, SGLang)
get a high limit and do their own queueing; the limit here protects the process, and the time a
request spends waiting is part of its queue time.

When the process is stopping (SIGTERM), `close()` makes every later `reserve()` a 503
`shutting_down`: the requests already admitted drain, no new one starts.

Must never: leak a place: `release()` is idempotent and every path calls it.
"""

from __future__ import annotations

import asyncio

from schemas.errors import RateLimitError, ServiceUnavailableError


class Slot:
    """One request's place: queued, then running, then released."""

    __slots__ = ("_admission", "released", "running")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.running = False
        self.released = False

    async def acquire(self) -> None:
        """Wait for a generation slot."""
        await self._admission._acquire(self)  # noqa: SLF001

    def release(self) -> None:
        """Give the place back (idempotent)."""
        self._admission._release(self)  # noqa: SLF001


class Admission:
    """Counts running and queued requests; see the module docstring."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self.running = 0
        self.queued = 0
        self.closing = False
        """Set once the process is stopping: nothing new is admitted."""

    def close(self) -> None:
        """Admit nothing more (the process is stopping); places already taken keep running."""
        self.closing = True

    def check_open(self) -> None:
        """503 `shutting_down` once `close()` was called."""
        if self.closing:
            raise shutting_down()

    def reserve(self) -> Slot:
        """Take a place in the queue; 429 when every place is taken, 503 when stopping."""
        self.check_open()
        if self.running + self.queued >= self.max_concurrency + self.max_queue:
            raise RateLimitError(
                f"server busy: {self.running} running, {self.queued} queued; retry later",
                headers={"Retry-After": "1"},
            )
        self.queued += 1
        return Slot(self)

    async def _acquire(self, slot: Slot) -> None:
        await self._semaphore.acquire()
        if slot.released:  # released while waiting (cancelled): give the slot straight back
            self._semaphore.release()
            return
        self.queued -= 1
        self.running += 1
        slot.running = True

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        if slot.running:
            self.running -= 1
            self._semaphore.release()
        else:
            self.queued -= 1


def shutting_down() -> ServiceUnavailableError:
    """The error a request gets while (or because) the process is stopping."""
    return ServiceUnavailableError(
        "the server is shutting down; retry on another replica",
        code="shutting_down",
        headers={"Retry-After": "1"},
    )
