"""The hook runner: one chain per (backend, preset), its timing, budgets and failure rules.

`HookSet` is built once at start-up from the specs the registry validated; it instantiates every
hook, keeps one `HookChain` per served (backend, preset) and owns the bounded background queue
`after_response` runs from. A chain holds, per point, only the hooks that override it, so a
chain without `on_chunk` hooks costs the per-token path nothing; with no hooks at all the service
gets `None` from `chain_for` and never calls into this module for that request.

Rules (README, "Custom logic (hooks)"):
- order: the order in adapters.yaml, global hooks first, then the backend's, then the preset's;
- a hook that raises (or returns something that is not a request, or amends what it may not, or
  runs past `timeout_ms`) fails that request with 500 `hook_failed` naming the hook; the error is
  logged with the hook's name and counted; the next request runs the chain afresh;
- a refusal (400/403/422/429 from `schemas.errors`) is the hook's answer, passed on unchanged;
- a point that takes longer than its budget is reported (warning, counter), not stopped;
- `after_response` failures and overruns are logged and counted; nothing reaches the client.

Must never: let a hook's exception text reach a response; block the event loop on a queue; run
`after_response` before the response is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from attrs import frozen

from hooks.base import (
    MAX_TAG_VALUE,
    MAX_TAGS,
    REFUSAL_STATUSES,
    ChunkKind,
    Exchange,
    Hook,
    HookCall,
    HookFailedError,
    HookSetup,
    points_of,
)
from schemas.converter import unstructure
from schemas.errors import WrapperError
from schemas.generation import GenerationRequest
from schemas.jsonschema import attrs_json_schema

logger = logging.getLogger(__name__)

#: exchanges waiting for `after_response`; beyond it they are dropped (and counted), never awaited
AFTER_QUEUE_SIZE = 1024
#: seconds shutdown waits for queued `after_response` work before dropping it
DRAIN_TIMEOUT_S = 5.0


@frozen
class HookSpec:
    """One hook as adapters.yaml configures it, validated (class imported, params structured)."""

    name: str
    module: str
    cls: type[Hook]
    params: Any
    scope: str
    """`hooks`, `adapters.<name>.hooks` or `models.<alias>.hooks` (where it is configured)."""
    source: str = "adapters.yaml"
    """`built-in`, `entry-point` or `module` (how `module` was resolved)."""
    budget_ms: float = 50.0
    chunk_budget_ms: float = 1.0
    timeout_ms: float = 5000.0


class HookObserver(Protocol):
    """Where the chain reports failures and overruns (the service's telemetry)."""

    def hook_error(self, hook: str) -> None:
        """A hook failed."""
        ...

    def hook_over_budget(self, hook: str) -> None:
        """A hook took longer than its budget."""
        ...

    def hook_dropped(self, hook: str) -> None:
        """An exchange was not handed to this hook's `after_response` (queue full, shutdown)."""
        ...


class NullObserver:
    """Reports nothing (tests and benchmarks without telemetry)."""

    def hook_error(self, hook: str) -> None:
        """Ignored."""

    def hook_over_budget(self, hook: str) -> None:
        """Ignored."""

    def hook_dropped(self, hook: str) -> None:
        """Ignored."""


class BoundHook:
    """A hook instance with its spec's budgets, in seconds."""

    __slots__ = ("budget_s", "chunk_budget_s", "hook", "name", "spec", "timeout_s")

    def __init__(self, spec: HookSpec, hook: Hook) -> None:
        self.spec = spec
        self.hook = hook
        self.name = spec.name
        self.budget_s = spec.budget_ms / 1000
        self.chunk_budget_s = spec.chunk_budget_ms / 1000
        self.timeout_s = spec.timeout_ms / 1000


RequestCheck = Callable[[GenerationRequest, GenerationRequest], None]


class HookChain:
    """The hooks of one (backend, preset), split by point, in configuration order."""

    def __init__(self, hooks: Sequence[BoundHook], owner: HookSet) -> None:
        self.hooks = tuple(hooks)
        self.owner = owner
        self.observer = owner.observer
        self.before = tuple(b for b in hooks if "before_request" in points_of(type(b.hook)))
        self.chunk = tuple(b for b in hooks if "on_chunk" in points_of(type(b.hook)))
        self.after = tuple(b for b in hooks if "after_response" in points_of(type(b.hook)))
        self.names = tuple(b.name for b in hooks)

    def _failed(self, bound: BoundHook, point: str, exc: BaseException | None) -> HookFailedError:
        self.observer.hook_error(bound.name)
        if exc is None:
            logger.error("hook %s failed in %s", bound.name, point)
        else:
            logger.error("hook %s failed in %s", bound.name, point, exc_info=exc)
        return HookFailedError(f"hook '{bound.name}' failed", code="hook_failed")

    def _over(self, call: HookCall, bound: BoundHook, point: str, spent: float) -> None:
        key = (bound.name, point)
        if key in call.over_budget:
            return
        call.over_budget.add(key)
        self.observer.hook_over_budget(bound.name)
        budget = bound.chunk_budget_s if point == "on_chunk" else bound.budget_s
        logger.warning(
            "hook %s took %.2f ms in %s (budget %.2f ms)",
            bound.name,
            spent * 1000,
            point,
            budget * 1000,
        )

    async def before_request(
        self, call: HookCall, request: GenerationRequest, check: RequestCheck
    ) -> GenerationRequest:
        """Run the `before_request` hooks in order; the request as the last one left it.

        `check(old, new)` re-applies the service's limits to an amended request and raises
        `ValueError`/`TypeError` when the amendment is not allowed (a hook bug: 500 `hook_failed`).
        """
        for bound in self.before:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(bound.timeout_s):
                    # typed loosely on purpose: a third-party hook may return anything
                    amended: object = await bound.hook.before_request(call, request)
            except WrapperError as exc:
                if exc.status_code in REFUSAL_STATUSES:
                    raise  # the hook's own answer to the client
                raise self._failed(bound, "before_request", exc) from None
            except Exception as exc:
                raise self._failed(bound, "before_request", exc) from None
            finally:
                spent = time.perf_counter() - started
                call.hooks_s += spent
            if spent > bound.budget_s:
                self._over(call, bound, "before_request", spent)
            if amended is None:
                continue
            if not isinstance(amended, GenerationRequest):
                logger.error("hook %s returned %s", bound.name, type(amended).__name__)
                raise self._failed(bound, "before_request", None)
            try:
                check(request, amended)
            except (ValueError, TypeError) as exc:
                # our own check's message says what was wrong; a traceback would add nothing
                logger.error("hook %s amended the request wrongly: %s", bound.name, exc)  # noqa: TRY400
                raise self._failed(bound, "before_request", None) from None
            request = amended
        _bound_tags(call)
        return request

    def on_chunk(self, call: HookCall, index: int, kind: ChunkKind, text: str) -> str:
        """Pass one delta's text through the `on_chunk` hooks."""
        for bound in self.chunk:
            started = time.perf_counter()
            try:
                out: object = bound.hook.on_chunk(call, index, kind, text)
            except Exception as exc:
                raise self._failed(bound, "on_chunk", exc) from None
            spent = time.perf_counter() - started
            call.hooks_s += spent
            if spent > bound.chunk_budget_s:
                self._over(call, bound, "on_chunk", spent)
            if not isinstance(out, str):
                raise self._failed(bound, "on_chunk", None)
            text = out
        return text

    def on_chunk_end(self, call: HookCall, index: int, kind: ChunkKind) -> str:
        """Choice `index` ended: flush each hook in order, later hooks filtering earlier ones."""
        out = ""
        for bound in self.chunk:
            started = time.perf_counter()
            try:
                if out:
                    out = bound.hook.on_chunk(call, index, kind, out)
                out += bound.hook.on_chunk_end(call, index, kind)
            except Exception as exc:
                raise self._failed(bound, "on_chunk", exc) from None
            call.hooks_s += time.perf_counter() - started
        return out

    def after_response(self, exchange: Exchange) -> None:
        """Queue the exchange for the `after_response` hooks (never waits)."""
        if self.after:
            self.owner.enqueue(self.after, exchange)


def _bound_tags(call: HookCall) -> None:
    """Hooks may set tags; the service keeps them label-safe whatever a hook did."""
    tags = call.tags
    if not tags:
        return
    clean: dict[str, str] = {}
    for key, value in list(tags.items())[:MAX_TAGS]:
        if isinstance(key, str) and isinstance(value, str) and key.isidentifier():
            clean[key[:32]] = value[:MAX_TAG_VALUE]
    call.tags = clean


class HookSet:
    """Every configured hook, instantiated once; chains per (backend, preset); the after queue."""

    def __init__(
        self,
        specs: Sequence[HookSpec],
        *,
        mask: Callable[[str], str] = str,
        observer: HookObserver | None = None,
        queue_size: int = AFTER_QUEUE_SIZE,
    ) -> None:
        self.observer: HookObserver = observer or NullObserver()
        self.specs = tuple(specs)
        # a hook whose constructor raises stops start-up (the process exits; nothing to undo)
        self._bound = [
            BoundHook(spec, spec.cls(spec.params, HookSetup(spec.name, mask)))
            for spec in self.specs
        ]
        self._chains: dict[tuple[str, str | None], HookChain | None] = {}
        self._queue: asyncio.Queue[tuple[tuple[BoundHook, ...], Exchange]] | None = None
        self._queue_size = queue_size
        self._worker: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._bound)

    def chain_for(self, backend: str, preset: str | None) -> HookChain | None:
        """The chain of a served (backend, preset): global, backend, preset hooks; None if none."""
        key = (backend, preset)
        try:
            return self._chains[key]
        except KeyError:
            pass
        scopes = {"hooks", f"adapters.{backend}.hooks"}
        if preset is not None:
            scopes.add(f"models.{preset}.hooks")
        bound = [b for b in self._bound if b.spec.scope in scopes]
        # the order of the file: global, then backend, then preset (specs are kept in that order)
        rank = {"hooks": 0, f"adapters.{backend}.hooks": 1, f"models.{preset}.hooks": 2}
        bound.sort(key=lambda b: rank[b.spec.scope])
        chain = HookChain(bound, self) if bound else None
        self._chains[key] = chain
        return chain

    # --- after_response ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the background worker (in the running loop)."""
        if self._worker is None and any(
            "after_response" in points_of(type(b.hook)) for b in self._bound
        ):
            self._queue = asyncio.Queue(self._queue_size)
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def enqueue(self, hooks: tuple[BoundHook, ...], exchange: Exchange) -> None:
        """Hand an exchange to the worker, or drop it (counted) when the queue is full."""
        queue = self._queue
        if queue is None:
            for bound in hooks:
                self.observer.hook_dropped(bound.name)
            return
        try:
            queue.put_nowait((hooks, exchange))
        except asyncio.QueueFull:
            for bound in hooks:
                self.observer.hook_dropped(bound.name)
            logger.warning("after_response queue full; exchange %s dropped", exchange.request_id)

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None  # noqa: S101  (start() made it)
        while True:
            hooks, exchange = await queue.get()
            try:
                for bound in hooks:
                    await self._after_one(bound, exchange)
            finally:
                queue.task_done()

    async def _after_one(self, bound: BoundHook, exchange: Exchange) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(bound.timeout_s):
                await bound.hook.after_response(exchange)
        except Exception:
            self.observer.hook_error(bound.name)
            logger.exception("hook %s failed in after_response", bound.name)
            return
        spent = time.perf_counter() - started
        if spent > bound.budget_s:
            self.observer.hook_over_budget(bound.name)
            logger.warning(
                "hook %s took %.2f ms in after_response (budget %.2f ms)",
                bound.name,
                spent * 1000,
                bound.budget_s * 1000,
            )

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Wait (bounded) until queued exchanges have been handled."""
        if self._queue is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._queue.join()

    async def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Drain the queue (bounded), stop the worker, close every hook."""
        await self.drain(timeout_s)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        queue = self._queue
        while queue is not None and not queue.empty():
            hooks, _ = queue.get_nowait()
            for bound in hooks:
                self.observer.hook_dropped(bound.name)
        for bound in self._bound:
            try:
                await bound.hook.close()
            except Exception:
                logger.exception("hook %s failed to close", bound.name)

    def describe(self) -> list[dict[str, Any]]:
        """Every hook for `GET /v1/adapters` (see `describe_spec`)."""
        return [describe_spec(b.spec) for b in self._bound]


def describe_spec(spec: HookSpec) -> dict[str, Any]:
    """A hook's entry in `GET /v1/adapters`: where, what, its params and their schema."""
    doc = spec.cls.description or (spec.cls.__doc__ or "").strip().split("\n", 1)[0]
    return {
        "name": spec.name,
        "module": spec.module,
        "source": spec.source,
        "scope": spec.scope,
        "description": doc,
        "points": list(points_of(spec.cls)),
        "budget_ms": spec.budget_ms,
        "chunk_budget_ms": spec.chunk_budget_ms,
        "timeout_ms": spec.timeout_ms,
        "params": unstructure(spec.params) if attrs.has(type(spec.params)) else {},
        "params_schema": attrs_json_schema(spec.cls.params_type),
    }


__all__ = ["BoundHook", "HookChain", "HookObserver", "HookSet", "HookSpec", "describe_spec"]
