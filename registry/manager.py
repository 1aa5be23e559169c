"""ModelManager: the one-engine lifecycle state machine, in-flight tracking and env scope.

    empty ──load──► loading ──ok──► ready ──unload──► unloading ──► empty
                       └──error (half-built engine unloaded, env restored)──► empty + last_error

One load or unload runs at a time; a second one gets 409 instead of queueing behind an engine
start that can take minutes. Data-plane requests take an `InflightTicket` while they run; unload
waits for them up to a drain timeout, then marks the rest aborted and unloads the adapter, which
ends their streams (the service turns an aborted ticket into a terminal stream error).

Like MLServer's registry, a model is *loading* before `load()` is called, and any exception makes
the manager unload what was half-built before it reports, so the next load starts clean.

Must never: let an exception's text out unmasked; import an engine; leave env keys set after
the model that needed them is gone.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from attrs import define, frozen

from adapters.base import Adapter, LoadInfo, MemoryEstimate
from adapters.kit import clean_error_text
from registry.env import EnvScope, check_env
from registry.memory import (
    MemoryProbe,
    ProcessTreeProbe,
    freeze_heap,
    release_host_memory,
    unfreeze_heap,
)
from registry.registry import AdapterRegistry, RegisteredAdapter, deep_merge
from registry.secrets import SecretStore
from schemas.control import (
    LoadPlanView,
    LoadRequest,
    LoadResponse,
    LoadTimings,
    MemoryChange,
    ModelStatus,
    UnloadResponse,
)
from schemas.converter import unstructure
from schemas.errors import (
    ConflictError,
    EngineError,
    ParamsValidationError,
    ServiceUnavailableError,
    UpstreamError,
    WrapperError,
)
from schemas.telemetry import MemorySnapshot

logger = logging.getLogger(__name__)

#: nesting `_mask_tree` walks before it cuts a value short
_MASK_DEPTH = 32

#: Retry-After (seconds) suggested to data-plane clients while no model is ready
RETRY_AFTER_S = 5


class ModelState(enum.StrEnum):
    """Lifecycle states (DESIGN.md)."""

    EMPTY = "empty"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"


class LoadGuard(Protocol):
    """Refuses a load that will not fit (the watchdog implements it)."""

    def check_load(self, estimate: MemoryEstimate | None) -> None:
        """Raise `InsufficientMemoryError` when the load should not start."""
        ...


class LifecycleListener(Protocol):
    """Told about finished loads and unloads (telemetry implements it)."""

    def on_load(self, response: LoadResponse) -> None:
        """A load succeeded."""
        ...

    def on_unload(self, response: UnloadResponse) -> None:
        """An unload finished."""
        ...


@frozen
class LoadPlan:
    """A validated load request: everything `load()` needs, nothing loaded yet."""

    backend: RegisteredAdapter
    adapter: Any  # an Adapter instance, checked but not loaded
    model: str
    served_model_name: str
    preset: str | None
    params: Any
    env: EnvScope

    def view(self, secrets: SecretStore) -> LoadPlanView:
        """What status and responses may show: params masked, env key names only."""
        params = _mask_tree(unstructure(self.params), secrets)
        return LoadPlanView(
            backend=self.backend.name,
            model=secrets.mask(self.model),
            served_model_name=secrets.mask(self.served_model_name),
            preset=self.preset,
            engine_params=params,
            env_keys=list(self.env.keys),
        )


@define
class LoadedModel:
    """The model being served."""

    plan: LoadPlan
    adapter: Any
    info: LoadInfo
    response: LoadResponse
    baseline: MemorySnapshot
    """Memory just before the load, for judging what unload gives back."""
    loaded_at: float
    """Unix time the load finished."""


class InflightTicket:
    """One data-plane request in flight; `aborted` is set when unload ends it."""

    __slots__ = ("aborted", "request_id", "started_at")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started_at = time.perf_counter()
        self.aborted = False


def _mask_tree(value: Any, secrets: SecretStore, depth: int = 0) -> Any:
    # capped: params are bounded at depth 8 before they get here; a deeper value is cut, not
    # walked (a RecursionError here once turned a bad load request into a 500)
    if depth > _MASK_DEPTH:
        return "…"
    if isinstance(value, str):
        return secrets.mask(value)
    if isinstance(value, dict):
        return {k: _mask_tree(v, secrets, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_tree(v, secrets, depth + 1) for v in value]
    return value


def sanitize_exception(exc: BaseException, secrets: SecretStore, limit: int = 300) -> str:
    """A short, secret-free description of an engine exception for clients and status."""
    if isinstance(exc, WrapperError):
        # already one cleaned line; masked again whole before it is cut
        return clean_error_text(exc.message, secrets.mask, limit=limit, paths=False)
    text = clean_error_text(str(exc), secrets.mask, limit=limit)
    name = type(exc).__name__
    return clean_error_text(f"{name}: {text}" if text else name, limit=limit, paths=False)


class ModelManager:
    """Owns the adapter instance and its lifecycle; see the module docstring."""

    def __init__(
        self,
        registry: AdapterRegistry,
        secrets: SecretStore,
        *,
        probe: MemoryProbe | None = None,
        guard: LoadGuard | None = None,
        listener: LifecycleListener | None = None,
        default_drain_timeout_s: float = 30.0,
        abort_grace_s: float = 10.0,
        settle_timeout_s: float = 10.0,
        settle_tolerance_mib: float = 64.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.secrets = secrets
        self.probe: MemoryProbe = ProcessTreeProbe() if probe is None else probe
        self.guard = guard
        self.listener = listener
        self.default_drain_timeout_s = default_drain_timeout_s
        self.abort_grace_s = abort_grace_s
        self.settle_timeout_s = settle_timeout_s
        self.settle_tolerance_mib = settle_tolerance_mib
        self._clock = clock
        self._state = ModelState.EMPTY
        self._state_since = clock()
        self._busy = False
        self._plan: LoadPlan | None = None
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.last_unload: UnloadResponse | None = None
        self._inflight: dict[int, InflightTicket] = {}
        # memory after the last unload of each backend: the baseline for the next cycle, because
        # the first load of a backend also pays one-time costs that never go back (the engine's
        # libraries, a CUDA context), which are not a leak
        self._warm: dict[str, MemorySnapshot] = {}
        self._failure_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # --- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        """Current lifecycle state."""
        return self._state

    def _set_state(self, state: ModelState) -> None:
        self._state = state
        self._state_since = self._clock()
        logger.info("model state -> %s", state.value)

    @property
    def in_flight(self) -> int:
        """Data-plane requests running now."""
        return len(self._inflight)

    def status(self) -> ModelStatus:
        """Snapshot for `GET /v1/model/status`."""
        engine: dict[str, Any] | None = None
        if self.current is not None:
            engine = unstructure(self.current.adapter.stats())
        return ModelStatus(
            state=self._state.value,
            in_flight=self.in_flight,
            plan=self._plan.view(self.secrets) if self._plan is not None else None,
            load=self.current.response if self.current is not None else None,
            last_error=self.last_error,
            last_unload=self.last_unload,
            state_since=self._state_since,
            engine=engine,
        )

    # --- data plane ----------------------------------------------------------------------------

    def ready_model(self) -> LoadedModel:
        """The loaded model, or 503 with Retry-After while none is ready."""
        if self._state is not ModelState.READY or self.current is None:
            raise ServiceUnavailableError(
                f"no model is ready (state: {self._state.value})",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return self.current

    def track(self, request_id: str) -> InflightTicket:
        """Register a data-plane request; 503 unless a model is ready."""
        self.ready_model()
        ticket = InflightTicket(request_id)
        self._inflight[id(ticket)] = ticket
        self._idle.clear()
        return ticket

    def release(self, ticket: InflightTicket) -> None:
        """The request is over (idempotent)."""
        if self._inflight.pop(id(ticket), None) is not None and not self._inflight:
            self._idle.set()

    def engine_failed(self, reason: str) -> None:
        """The engine died under a request: unload it in the background so /ready tells.

        An engine whose process died answers every later request with an error; keeping the
        state `ready` would hide that from the orchestrator, which polls /ready and reloads.
        """
        if self._state is not ModelState.READY or self._busy:
            return
        self.last_error = f"engine died: {self.secrets.mask(reason)}"
        logger.error("engine died (%s); unloading the model", reason)
        self._failure_task = asyncio.get_running_loop().create_task(self._unload_dead())

    async def _unload_dead(self) -> None:
        reason = self.last_error
        try:
            await self.unload(drain_timeout_s=0)
        except Exception:
            logger.exception("unloading a dead engine failed")
        self.last_error = reason

    # --- control plane -------------------------------------------------------------------------

    def plan(self, req: LoadRequest) -> LoadPlan:
        """Validate a load request against the registry without loading anything."""
        preset_name = req.preset
        if (req.backend is None) == (req.preset is None):
            raise ParamsValidationError("give exactly one of 'backend' or 'preset'", param="$")
        if preset_name is not None:
            preset = self.registry.preset(preset_name)
            if req.backend is not None and req.backend != preset.backend:
                raise ParamsValidationError("backend contradicts the preset", param="$.backend")
            backend_name = preset.backend
            model = req.model or preset.model
            overrides = deep_merge(preset.engine_params, req.engine_params)
            served = req.served_model_name or preset.served_model_name or preset_name
        else:
            backend_name = req.backend or ""
            if req.model is None:
                raise ParamsValidationError("'model' is required with 'backend'", param="$.model")
            model = req.model
            overrides = dict(req.engine_params)
            served = req.served_model_name or model
        backend = self.registry.resolve(backend_name)
        params = self.registry.build_params(backend_name, overrides)
        check_env(req.env, backend.entry.env_allow, backend_name)
        env = {**backend.entry.env, **req.env}
        # the adapter masks engine text with the store, and takes secrets from this load's env
        context = attrs.evolve(
            self.registry.context(backend_name), mask=self.secrets.mask, load_env=dict(req.env)
        )
        adapter = backend.adapter_cls(context)
        adapter.check(model, params)
        return LoadPlan(
            backend=backend,
            adapter=adapter,
            model=model,
            served_model_name=served,
            preset=preset_name,
            params=params,
            env=EnvScope(env),
        )

    def _begin(self) -> None:
        if self._busy:
            raise ConflictError(
                f"a {self._state.value} operation is in progress", code="lifecycle_busy"
            )
        self._busy = True

    async def load(self, req: LoadRequest) -> LoadResponse:
        """Load a model (see the module docstring for the state machine)."""
        self._begin()
        try:
            plan = self.plan(req)
            # only values of env keys the plan accepted; past IW_MAX_SECRETS the load is refused
            self.secrets.add_many(req.env.values())
            if self._state is ModelState.READY:
                if not req.replace:
                    loaded = self.current.plan.served_model_name if self.current else "?"
                    raise ConflictError(
                        f"model '{loaded}' is loaded; unload it first or pass replace: true",
                        code="model_already_loaded",
                    )
                await self._unload(req.drain_timeout_s)
            if self.guard is not None:
                self.guard.check_load(plan.adapter.estimate_memory(plan.model, plan.params))
            return await self._load(plan)
        finally:
            self._busy = False

    async def _load(self, plan: LoadPlan) -> LoadResponse:
        self._plan = plan
        self.last_error = None
        self._set_state(ModelState.LOADING)
        baseline = await asyncio.to_thread(self.probe.snapshot)
        started = time.perf_counter()
        plan.env.apply()
        adapter: Adapter[Any] = plan.adapter
        try:
            info = await adapter.load(plan.model, plan.params)
        except BaseException as exc:
            await self._abandon(plan, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            message = sanitize_exception(exc, self.secrets)
            if isinstance(exc, WrapperError) and exc.status_code < 500:
                raise type(exc)(message, param=exc.param, code=exc.code) from None
            if isinstance(exc, UpstreamError):  # 502/504: the upstream failed, not our engine
                raise type(exc)(f"load failed: {message}", code=exc.code) from None
            raise EngineError(f"engine failed to load: {message}") from None
        total = time.perf_counter() - started
        after = await asyncio.to_thread(self.probe.snapshot, info.engine_pids)
        response = LoadResponse(
            status="loaded",
            plan=plan.view(self.secrets),
            timings=LoadTimings(
                round(info.import_s, 4),
                round(info.init_s, 4),
                round(info.warmup_s, 4),
                round(total, 4),
            ),
            memory=_change(baseline, after),
            device=info.device,
            max_context=info.max_context,
            details=_mask_tree(info.details, self.secrets),
        )
        self.current = LoadedModel(plan, adapter, info, response, baseline, self._clock())
        freeze_heap()
        self._set_state(ModelState.READY)
        if self.listener is not None:
            self.listener.on_load(response)
        return response

    async def _abandon(self, plan: LoadPlan, exc: BaseException) -> None:
        """Clean up after a failed load: unload the half-built engine, restore env, go empty."""
        logger.error("load of backend %s failed", plan.backend.name, exc_info=exc)
        try:
            await plan.adapter.unload()
        except Exception:
            logger.exception("cleanup after a failed load raised")
        plan.env.restore()
        self.last_error = sanitize_exception(exc, self.secrets)
        self._plan = None
        self.current = None
        gc.collect()
        release_host_memory()
        self._set_state(ModelState.EMPTY)

    async def unload(self, drain_timeout_s: float | None = None) -> UnloadResponse:
        """Drain and unload; `status: empty` when nothing was loaded (idempotent)."""
        self._begin()
        try:
            if self._state is ModelState.EMPTY:
                return UnloadResponse(status="empty")
            return await self._unload(drain_timeout_s)
        finally:
            self._busy = False

    async def _unload(self, drain_timeout_s: float | None) -> UnloadResponse:
        loaded = self.current
        assert loaded is not None  # noqa: S101  (READY implies a loaded model)
        timeout = self.default_drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._set_state(ModelState.UNLOADING)
        started = time.perf_counter()
        before_drain = self.in_flight
        drained_all = await self._wait_idle(timeout)
        aborted = 0
        if not drained_all:
            for ticket in self._inflight.values():
                ticket.aborted = True
            aborted = self.in_flight
        drain_s = time.perf_counter() - started
        before = await asyncio.to_thread(self.probe.snapshot, loaded.info.engine_pids)
        unload_started = time.perf_counter()
        try:
            await loaded.adapter.unload()
        except Exception as exc:
            logger.exception("adapter unload raised")
            self.last_error = "unload: " + sanitize_exception(exc, self.secrets)
        # aborted streams end once the adapter stops them; give them a bounded moment to say so
        await self._wait_idle(self.abort_grace_s)
        loaded.plan.env.restore()
        served, backend = loaded.plan.served_model_name, loaded.plan.backend.name
        warm = self._warm.get(backend)
        baseline = warm if warm is not None else loaded.baseline
        # drop every reference to the adapter before collecting, or its engine survives the gc
        self.current = None
        self._plan = None
        del loaded
        unfreeze_heap()  # frozen objects are never collected: the engine's must be again
        gc.collect()
        release_host_memory()
        after, settled = await self._settle()
        unload_s = time.perf_counter() - unload_started
        not_returned = _above_baseline(baseline, after)
        self._warm[backend] = after
        response = UnloadResponse(
            status="unloaded",
            model=self.secrets.mask(served),
            drained=before_drain - aborted,
            aborted=aborted,
            drain_s=round(drain_s, 4),
            unload_s=round(unload_s, 4),
            memory=_change(before, after),
            memory_settled=settled,
            memory_not_returned_mib=not_returned,
            memory_returned=None if warm is None else not_returned <= self.settle_tolerance_mib,
            memory_baseline="pre-load" if warm is None else "after the previous unload",
        )
        if warm is not None and not_returned > self.settle_tolerance_mib:
            logger.warning(
                "unload left %.0f MiB above the pre-load baseline (tolerance %.0f MiB)",
                not_returned,
                self.settle_tolerance_mib,
            )
        self.last_unload = response
        self._set_state(ModelState.EMPTY)
        if self.listener is not None:
            self.listener.on_unload(response)
        return response

    async def _wait_idle(self, seconds: float) -> bool:
        if not self._inflight:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _settle(self) -> tuple[MemorySnapshot, bool]:
        """Poll memory until two readings agree within 2 MiB, or the settle timeout passes."""
        deadline = time.perf_counter() + self.settle_timeout_s
        previous = await asyncio.to_thread(self.probe.snapshot)
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.2)
            current = await asyncio.to_thread(self.probe.snapshot)
            if abs(current.rss_mib - previous.rss_mib) < 2.0:
                return current, True
            previous = current
        return previous, False

    async def shutdown(self, drain_timeout_s: float = 5.0) -> None:
        """Unload on process exit (lifespan), never raising."""
        if self._state is ModelState.READY:
            try:
                await self.unload(drain_timeout_s)
            except Exception:
                logger.exception("unload at shutdown failed")

    # --- process stop (SIGTERM) ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A load or unload is in progress (a second one would get 409)."""
        return self._busy

    async def stop_engine(self, abort_grace_s: float) -> UnloadResponse | None:
        """End what is still in flight now and unload, for a stopping process; never raises.

        `abort_grace_s` bounds the wait for aborted streams to end (a SIGTERM has a budget).
        None when nothing was loaded or a load/unload was still running.
        """
        if self._state is not ModelState.READY or self._busy:
            return None
        self.abort_grace_s = min(self.abort_grace_s, abort_grace_s)
        # the memory report of a last unload is worth less than staying inside the grace period
        self.settle_timeout_s = min(self.settle_timeout_s, abort_grace_s)
        try:
            return await self.unload(drain_timeout_s=0)
        except Exception:
            logger.exception("unload at shutdown failed")
            return None


def _change(before: MemorySnapshot, after: MemorySnapshot) -> MemoryChange:
    def delta(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 1)

    return MemoryChange(
        rss_before_mib=round(before.rss_mib, 1),
        rss_after_mib=round(after.rss_mib, 1),
        rss_delta_mib=round(after.rss_mib - before.rss_mib, 1),
        device_before_mib=before.device_used_mib,
        device_after_mib=after.device_used_mib,
        device_delta_mib=delta(before.device_used_mib, after.device_used_mib),
        method=after.method,
    )


def _above_baseline(baseline: MemorySnapshot, after: MemorySnapshot) -> float:
    """What an unload did not give back: device memory on GPU, else host RSS, in MiB."""
    if baseline.device_used_mib is not None and after.device_used_mib is not None:
        return round(after.device_used_mib - baseline.device_used_mib, 1)
    return round(after.rss_mib - baseline.rss_mib, 1)


__all__: Sequence[str] = [
    "InflightTicket",
    "LoadPlan",
    "LoadedModel",
    "ModelManager",
    "ModelState",
]
