"""The worker-thread → event-loop bridge a blocking engine needs (llama.cpp, transformers).

A blocking engine decodes in a thread; the service streams from the event loop. `ThreadBridge`
owns what sits between them, written once:

- **slots**: at most `max_concurrency` generations run at once (a thread pool of that size);
  further requests wait in FIFO order on an asyncio semaphore (`waiting` counts them);
- **the queue**: the worker hands each item to the loop with
  `loop.call_soon_threadsafe(queue.put_nowait, item)`, one callback per item and no thread hop on
  the loop side; when the loop is gone the job is cancelled instead of raising in the worker;
- **the cancel flag**: a `Job` carries a `threading.Event` the worker checks between tokens; it is
  set when the consumer closes the stream (`aclose()`, cancellation) and by `aclose()` on the
  bridge (unload);
- **the join**: closing a stream waits (shielded) for its worker to return, so a closed stream has
  really stopped and its slot is free; `aclose()` waits for every worker and shuts the pool down.

An exception the worker raises is re-raised in the consumer (the adapter turns it into a clean
error). The worker's return value is not used: it emits everything it has to say.

Two helpers cover what every token-streaming adapter does around the bridge:

- `stream_deltas` streams a worker's `TokenDelta`s and stamps on what only the loop side knows:
  the prompt size (first delta and every choice's last), the queue and schedule times (first
  delta), the prompt's ids (first delta, when the request asked for them);
- `each_choice` is the worker of an `n`-choice request on an engine that decodes one sequence:
  the choices run in turn in the request's slot, each ended by its final delta; once the job is
  cancelled the choices not yet begun end `abort` without running.

Must never: import an engine; let a stream end while its worker still runs (bar a second
cancellation, after which the pool's done-callback still frees the slot); block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from attrs import evolve

from schemas.errors import ServiceUnavailableError
from schemas.generation import TokenDelta

__all__ = ["BridgeClosedError", "Emit", "Job", "ThreadBridge", "each_choice", "stream_deltas"]

T = TypeVar("T")

#: what a worker calls with each item for the consumer
Emit = Callable[[T], None]


class BridgeClosedError(ServiceUnavailableError):
    """The bridge was closed (the model is being unloaded) before the job got a slot."""


class Job:
    """One generation's shared state: the loop sets `cancel`, the worker reads it."""

    __slots__ = ("cancel", "queued_at", "scheduled_at")

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.queued_at = time.perf_counter()
        """When the job was made (`perf_counter`), for TTFT breakdowns."""
        self.scheduled_at: float | None = None
        """When it got a slot and its worker was started."""

    @property
    def cancelled(self) -> bool:
        """Whether the worker should stop at its next check."""
        return self.cancel.is_set()


class _Done:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _Release:
    """Frees a job's slot exactly once: after the join, or on the future's done callback."""

    __slots__ = ("bridge", "done")

    def __init__(self, bridge: ThreadBridge[Any]) -> None:
        self.bridge = bridge
        self.done = False

    def __call__(self, _: object = None) -> None:
        if not self.done:
            self.done = True
            self.bridge._running -= 1  # noqa: SLF001  (the bridge's own helper)
            self.bridge._slots.release()  # noqa: SLF001


class ThreadBridge(Generic[T]):
    """Runs blocking workers in slots and streams what they emit; see the module docstring."""

    def __init__(self, max_concurrency: int, *, name: str = "iw-engine") -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix=name
        )
        self._slots = asyncio.Semaphore(max_concurrency)
        self._jobs: set[Job] = set()
        self._running = 0
        self._waiting = 0
        self._closed = False

    @property
    def running(self) -> int:
        """Workers running now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Streams waiting for a slot."""
        return self._waiting

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has begun: no new job starts."""
        return self._closed

    async def stream(
        self, work: Callable[[Job, Emit[T]], object], job: Job | None = None
    ) -> AsyncGenerator[T, None]:
        """Run `work(job, emit)` in a slot and yield what it emits, until it returns.

        Raises `BridgeClosedError` when the bridge closes before a slot is free, and whatever
        `work` raised once the items emitted before it are consumed.
        """
        job = job if job is not None else Job()
        self._jobs.add(job)
        self._waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._waiting -= 1
            self._jobs.discard(job)
            raise
        self._waiting -= 1
        try:
            if self._closed or self._executor is None or job.cancelled:
                self._slots.release()
                if job.cancelled and not self._closed:
                    return
                raise BridgeClosedError("the model is being unloaded")
            async with contextlib.aclosing(self._relay(self._executor, work, job)) as relay:
                async for item in relay:
                    yield item
        finally:
            job.cancel.set()
            self._jobs.discard(job)

    async def _relay(
        self, executor: ThreadPoolExecutor, work: Callable[[Job, Emit[T]], object], job: Job
    ) -> AsyncGenerator[T, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[T | _Done] = asyncio.Queue()
        put = queue.put_nowait

        def emit(item: T | _Done) -> None:
            try:
                loop.call_soon_threadsafe(put, item)
            except RuntimeError:
                job.cancel.set()  # the loop is gone: nobody reads this stream any more

        def run() -> None:
            try:
                work(job, emit)
            except BaseException as exc:  # re-raised on the loop side
                emit(_Done(exc))
            else:
                emit(_Done(None))

        self._running += 1
        job.scheduled_at = time.perf_counter()
        future = loop.run_in_executor(executor, run)
        # accounting rides on the future, so it happens even if our task is cancelled twice
        free = _Release(self)
        future.add_done_callback(free)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Done):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            job.cancel.set()
            # wait (at most one engine step) so a closed stream has really stopped
            await asyncio.shield(future)
            free()  # now rather than on the done callback's later tick

    def cancel_all(self) -> None:
        """Set every live job's cancel flag (their streams end at the worker's next check)."""
        for job in list(self._jobs):
            job.cancel.set()

    async def aclose(self) -> None:
        """Cancel every job, refuse new ones, and wait until every worker has returned."""
        self._closed = True
        self.cancel_all()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)


async def stream_deltas(
    bridge: ThreadBridge[TokenDelta],
    work: Callable[[Job, Emit[TokenDelta]], object],
    job: Job,
    prompt: Sequence[int],
    *,
    prompt_token_ids: bool = False,
) -> AsyncGenerator[TokenDelta, None]:
    """`bridge.stream(work, job)`, each delta stamped with what the loop side knows.

    The first delta gets the prompt size, `job.queued_at` and `job.scheduled_at` (and the prompt's
    ids when `prompt_token_ids`); the final delta of every choice gets the prompt size. Other
    deltas pass as the worker made them (no copy per token). Closing this stream closes the
    bridge's stream at once, so the worker is joined before `aclose()` returns.
    """
    first = True
    async with contextlib.aclosing(bridge.stream(work, job)) as stream:
        async for delta in stream:
            if first:
                first = False
                ids = tuple(prompt) if prompt_token_ids else None
                yield evolve(
                    delta,
                    prompt_tokens=len(prompt),
                    engine_queued_at=job.queued_at,
                    engine_scheduled_at=job.scheduled_at,
                    prompt_token_ids=ids,
                )
            elif delta.finish_reason is not None:
                yield evolve(delta, prompt_tokens=len(prompt))
            else:
                yield delta


def each_choice(
    n: int, job: Job, emit: Emit[TokenDelta], choice: Callable[[int], TokenDelta]
) -> None:
    """Run choices `0..n-1` in turn in this worker, emitting the final delta each returns.

    `choice(index)` emits the choice's text deltas itself and returns its final one (with
    `finish_reason` set). A choice whose turn comes after the job was cancelled is not run: it
    ends `abort` at once, so a closed `n`-choice stream still gets one finish per choice.
    """
    for index in range(n):
        if job.cancelled:
            emit(TokenDelta("", 0, index, finish_reason="abort"))
        else:
            emit(choice(index))
