"""ModelManager: the one-engine lifecycle state machine, in-flight tracking and env scope.

    empty ──load──► loading ──ok──► ready ──unload──► unloading ──► empty
                       └──error (half-built engine unloaded, env restored)──► empty + last_error

    ready ──load(replace)──► alongside: the new engine loads while the old one serves, then
                             the served model switches in one step and the old one drains;
                             unload first: ready ──► unloading ──► loading ──► ready (new), and
                             if that load fails, loading (previous plan again) ──► ready (old)

One load or unload runs at a time; a second one gets 409 instead of queueing behind an engine
start that can take minutes. Data-plane requests `acquire()` an `InflightTicket` while they run:
while a load or swap is under way they wait for it (bounded by `swap_wait_s`) instead of failing;
with nothing loaded and nothing loading they get 503 at once, with a message that says what to do.
Unload waits for the tickets of the model it unloads up to a drain timeout, then marks the rest
aborted and unloads the adapter, which ends their streams (the service turns an aborted ticket
into a terminal stream error).

Like MLServer's registry, a model is *loading* before `load()` is called, and any exception makes
the manager unload what was half-built before it reports, so the next load starts clean. A failed
load is reported with the engine's own root cause (the exception chain is walked; the whole chain
goes to the log).

Must never: let an exception's text out unmasked; import an engine; leave env keys set after
the model that needed them is gone; tear down a serving model before the new one is known to be
loadable without loading (`plan()` checks everything a dry run can).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from attrs import define, evolve, field, frozen

from adapters.base import Adapter, LoadInfo, MemoryEstimate
from adapters.kit import clean_error_text
from registry.env import EnvScope, check_env
from registry.memory import (
    MemoryProbe,
    ProcessTreeProbe,
    freeze_heap,
    release_host_memory,
    tune_allocator,
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
from schemas.sampling import check_sampling_defaults, effective_defaults
from schemas.telemetry import MemorySnapshot

logger = logging.getLogger(__name__)

#: nesting `_mask_tree` walks before it cuts a value short
_MASK_DEPTH = 32

#: Retry-After (seconds) suggested to data-plane clients while no model is ready
RETRY_AFTER_S = 5
SwapKind = Literal["alongside", "unload_first"]
#: longest root-cause text kept for a load failure (after masking)
CAUSE_LIMIT = 600


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
    adapter: Adapter[Any]  # checked but not loaded
    model: str
    served_model_name: str
    preset: str | None
    params: Any
    env: EnvScope
    sampling_defaults: Mapping[str, Any] = field(factory=dict)
    """The preset's sampling for fields a request leaves unset (`schemas.sampling`)."""
    reasoning_parser: str | None = None
    """The parser `adapter` splits reasoning with (`AdapterRegistry.reasoning_parser`)."""

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
            sampling_defaults=dict(self.sampling_defaults),
            reasoning_parser=self.reasoning_parser,
        )

    def serves(self, name: str) -> bool:
        """Whether a data-plane request for `name` is for this model."""
        return name in (self.served_model_name, self.model)


@define
class LoadedModel:
    """The model being served."""

    plan: LoadPlan
    adapter: Adapter[Any]
    info: LoadInfo
    response: LoadResponse
    baseline: MemorySnapshot
    """Memory just before the load, for judging what unload gives back."""
    loaded_at: float
    """Unix time the load finished."""
    tickets: set[InflightTicket] = field(factory=set)
    """Data-plane requests running on this model (a swap drains the old model's alone)."""


def describe_capabilities(loaded: LoadedModel) -> dict[str, Any]:
    """What the loaded adapter honours and what unset sampling fields become (status)."""
    caps = loaded.adapter.capabilities
    model = loaded.info.details.get("sampling_defaults")
    model_defaults = dict(model) if isinstance(model, Mapping) else {}
    preset = dict(loaded.plan.sampling_defaults)
    return {
        "features": sorted(caps.features),
        "sampling": sorted(caps.sampling),
        "max_n": caps.max_n,
        "max_top_logprobs": caps.max_top_logprobs,
        "sampling_defaults": {
            "effective": effective_defaults(model_defaults, preset),
            "preset": preset,
            "model": model_defaults,
        },
    }


class InflightTicket:
    """One data-plane request in flight; `aborted` is set when unload ends it."""

    __slots__ = ("aborted", "loaded", "request_id", "started_at")

    def __init__(self, request_id: str, loaded: LoadedModel | None = None) -> None:
        self.request_id = request_id
        self.started_at = time.perf_counter()
        self.aborted = False
        self.loaded = loaded


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


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of `exc`'s chain (`__cause__`, else an unsuppressed context)."""
    seen = {id(exc)}
    current = exc
    while True:
        nxt = current.__cause__
        if nxt is None and not current.__suppress_context__:
            nxt = current.__context__
        if nxt is None or id(nxt) in seen:
            return current
        seen.add(id(nxt))
        current = nxt


def describe_load_failure(exc: BaseException, secrets: SecretStore) -> str:
    """Why a load failed, for the admin: our summary plus the engine's root cause.

    Secrets are masked first and the text truncated after (a cut secret would escape the mask).
    Local paths stay: the load response and status are admin-only, and a path is often the
    answer (which config.json is broken).
    """
    cause = root_cause(exc)
    parts: list[str] = []
    if isinstance(exc, WrapperError):
        parts.append(exc.message)
    if cause is not exc or not isinstance(exc, WrapperError):
        text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        described = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
        if not parts or described not in parts[0]:
            parts.append(described)
    message = secrets.mask(": ".join(parts) if len(parts) > 1 else parts[0])
    return message if len(message) <= CAUSE_LIMIT else message[: CAUSE_LIMIT - 1] + "…"


class ReplaceRolledBackError(Exception):
    """A `replace` failed and the previous model serves (again): the load's answer.

    Not a `WrapperError`: its body is a `LoadResponse` (with the OpenAI `error` object in it),
    which the load handler renders with the failure's status code. Any other caller sees an
    exception, so a failed load is never taken for a successful one.
    """

    def __init__(
        self, response: LoadResponse, status_code: int, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(response.error.message if response.error else "replace rolled back")
        self.response = response
        self.status_code = status_code
        self.headers = headers or {}


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
        swap_wait_s: float = 60.0,
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
        self.swap_wait_s = swap_wait_s
        self._clock = clock
        self._state = ModelState.EMPTY
        self._state_since = clock()
        self._busy: str | None = None
        """The lifecycle operation running ("load" or "unload"), None when idle."""
        self._plan: LoadPlan | None = None
        self._pending: LoadPlan | None = None
        """What a load in progress will serve (requests for its name wait for it)."""
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.last_unload: UnloadResponse | None = None
        self._inflight: dict[int, InflightTicket] = {}
        # per backend: memory after its first unload (one-time costs of the engine's libraries
        # and a CUDA context are paid by then, so later growth is creep) and after the last one
        self._first_baseline: dict[str, MemorySnapshot] = {}
        self._previous_unload: dict[str, MemorySnapshot] = {}
        self._failure_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # replaced on every change waiters care about (state, busy, a released ticket)
        self._changed = asyncio.Event()
        # before any engine allocates: its big buffers must go back to the OS at unload
        tune_allocator()

    # --- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        """Current lifecycle state."""
        return self._state

    def _set_state(self, state: ModelState) -> None:
        self._state = state
        self._state_since = self._clock()
        logger.info("model state -> %s", state.value)
        self._notify()

    def _notify(self) -> None:
        """Wake everything waiting for a lifecycle change; later waiters get a fresh event."""
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """Data-plane requests running now."""
        return len(self._inflight)

    def status(self) -> ModelStatus:
        """Snapshot for `GET /v1/model/status`."""
        engine: dict[str, Any] | None = None
        capabilities: dict[str, Any] | None = None
        if self.current is not None:
            engine = unstructure(self.current.adapter.stats())
            capabilities = describe_capabilities(self.current)
        return ModelStatus(
            state=self._state.value,
            in_flight=self.in_flight,
            plan=self._plan.view(self.secrets) if self._plan is not None else None,
            load=self.current.response if self.current is not None else None,
            last_error=self.last_error,
            last_unload=self.last_unload,
            pending=self._pending.view(self.secrets) if self._pending is not None else None,
            state_since=self._state_since,
            engine=engine,
            capabilities=capabilities,
        )

    # --- data plane ----------------------------------------------------------------------------

    def _unavailable(self) -> ServiceUnavailableError:
        """The 503 for "nothing can serve", saying what the operator can do about it."""
        if self._busy == "unload" and self._pending is None:
            message = "no model is ready: an unload is in progress"
        elif self.last_error is not None:
            message = (
                "no model is loaded: the last load failed: see last_error in GET /v1/model/status"
            )
        else:
            message = "no model is loaded: load one with POST /v1/model/load"
        return ServiceUnavailableError(message, headers={"Retry-After": str(RETRY_AFTER_S)})

    def ready_model(self) -> LoadedModel:
        """The loaded model, or 503 with Retry-After while none is ready."""
        if self._state is not ModelState.READY or self.current is None:
            raise self._unavailable()
        return self.current

    def _waiting_is_useful(self, model_name: str | None) -> bool:
        """Whether a load in progress may still give this request a model to run on."""
        if self._busy is None or self._pending is None:
            return False
        current = self.current
        if self._state is ModelState.READY and current is not None:
            # a replace loading alongside: only requests for the incoming name need to wait
            return (
                model_name is not None
                and self._pending.serves(model_name)
                and not current.plan.serves(model_name)
            )
        return True

    def _register(self, loaded: LoadedModel, request_id: str) -> InflightTicket:
        ticket = InflightTicket(request_id, loaded)
        self._inflight[id(ticket)] = ticket
        loaded.tickets.add(ticket)
        self._idle.clear()
        return ticket

    def track(self, request_id: str) -> InflightTicket:
        """Register a data-plane request; 503 unless a model is ready."""
        return self._register(self.ready_model(), request_id)

    async def acquire(
        self, request_id: str, model_name: str | None = None
    ) -> tuple[LoadedModel, InflightTicket]:
        """The model to run on and the request's ticket, waiting out a load or swap.

        While a load is in progress (also the unload half of a `replace`), the request waits up
        to `swap_wait_s` for whichever model ends up loaded; with nothing loaded and nothing
        loading it gets 503 at once.
        """
        deadline: float | None = None
        while True:
            current = self.current
            if (
                self._state is ModelState.READY
                and current is not None
                and not self._waiting_is_useful(model_name)
            ):
                return current, self._register(current, request_id)
            if not self._waiting_is_useful(model_name):
                raise self._unavailable()
            now = time.monotonic()
            deadline = now + self.swap_wait_s if deadline is None else deadline
            if now >= deadline:
                raise ServiceUnavailableError(
                    f"no model became ready within {self.swap_wait_s:g} s: a load is still in "
                    "progress (see GET /v1/model/status)",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=deadline - now)
            except TimeoutError:
                continue

    def release(self, ticket: InflightTicket) -> None:
        """The request is over (idempotent)."""
        if self._inflight.pop(id(ticket), None) is None:
            return
        if ticket.loaded is not None:
            ticket.loaded.tickets.discard(ticket)
        if not self._inflight:
            self._idle.set()
        self._notify()

    def engine_failed(self, reason: str) -> None:
        """The engine died under a request: unload it in the background so /ready tells.

        An engine whose process died answers every later request with an error; keeping the
        state `ready` would hide that from the orchestrator, which polls /ready and reloads.
        """
        if self._state is not ModelState.READY or self._busy is not None:
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
        """Validate a load request without loading anything (also `/v1/model/validate`).

        The adapter's `check()` runs with the request's env applied for its duration (a hub
        token decides whether a gated model is reachable), and restored right after.
        """
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
            sampling_defaults = check_sampling_defaults(preset.sampling_defaults)
        else:
            backend_name = req.backend or ""
            if req.model is None:
                raise ParamsValidationError("'model' is required with 'backend'", param="$.model")
            model = req.model
            overrides = dict(req.engine_params)
            served = req.served_model_name or model
            sampling_defaults = {}
        backend = self.registry.resolve(backend_name)
        params = self.registry.build_params(backend_name, overrides)
        check_env(req.env, backend.entry.env_allow, backend_name)
        env = EnvScope({**backend.entry.env, **req.env})
        # the adapter masks engine text with the store, and takes secrets from this load's env
        context = evolve(
            self.registry.context(backend_name), mask=self.secrets.mask, load_env=dict(req.env)
        )
        parser = self.registry.reasoning_parser(backend_name, preset_name, req.reasoning_parser)
        adapter = self.registry.make_adapter(backend_name, context, parser)
        # the reachability check reads the load's env (HF_TOKEN, HF_HUB_OFFLINE), never ours
        probe_env = EnvScope({**backend.entry.env, **req.env})
        probe_env.apply()
        try:
            adapter.check(model, params)
        finally:
            probe_env.restore()
        return LoadPlan(
            backend=backend,
            adapter=adapter,
            model=model,
            served_model_name=served,
            preset=preset_name,
            params=params,
            env=env,
            sampling_defaults=sampling_defaults,
            reasoning_parser=parser,
        )

    def _begin(self, operation: str) -> None:
        if self._busy is not None:
            article = "an" if self._busy == "unload" else "a"
            raise ConflictError(f"{article} {self._busy} is in progress", code="lifecycle_busy")
        self._busy = operation
        self._notify()

    def _end(self) -> None:
        self._busy = None
        self._pending = None
        self._notify()

    async def load(self, req: LoadRequest) -> LoadResponse:
        """Load a model (see the module docstring for the state machine)."""
        self._begin("load")
        try:
            plan = self.plan(req)
            # only values of env keys the plan accepted; past IW_MAX_SECRETS the load is refused
            self.secrets.add_many(req.env.values())
            previous = self.current
            if self._state is ModelState.READY and previous is not None:
                if not req.replace:
                    raise ConflictError(
                        f"model '{previous.plan.served_model_name}' is loaded; unload it first "
                        "or pass replace: true",
                        code="model_already_loaded",
                    )
                return await self._replace(previous, plan, req.drain_timeout_s)
            self._pending = plan
            if self.guard is not None:
                self.guard.check_load(plan.adapter.estimate_memory(plan.model, plan.params))
            return self._activate(await self._build(plan))
        finally:
            self._end()

    async def _replace(
        self, previous: LoadedModel, plan: LoadPlan, drain_timeout_s: float | None
    ) -> LoadResponse:
        """Swap `previous` for `plan`: alongside when memory allows, else unload first."""
        self._pending = plan
        if self._fits_alongside(plan):
            try:
                loaded = await self._build(plan, alongside=True)
            except WrapperError as exc:
                if exc.status_code < 500 and exc.code != "insufficient_memory":
                    raise
                # the old model never stopped serving: say so the way a rollback does
                raise self._rolled_back(previous, exc) from None
            response = self._activate(loaded, swap="alongside")
            await self._unload(drain_timeout_s, loaded=previous, successor=loaded)
            freeze_heap()  # the unload unfroze the heap to collect the old engine
            return response
        await self._unload(drain_timeout_s)
        self.last_error = None
        try:
            if self.guard is not None:
                self.guard.check_load(plan.adapter.estimate_memory(plan.model, plan.params))
            loaded = await self._build(plan)
        except WrapperError as exc:
            failure = exc
        else:
            return self._activate(loaded, swap="unload_first")
        cause = self.last_error or failure.message
        # a fresh adapter instance: the failed one (and the old one) may hold state to the end
        again = evolve(
            previous.plan,
            # same context (mask, the load's own env) as the plan that loaded it
            adapter=self.registry.make_adapter(
                previous.plan.backend.name,
                previous.plan.adapter.context,
                previous.plan.reasoning_parser,
            ),
        )
        self._pending = again
        gc.collect()  # what the failed engine left must be gone before the old one comes back
        release_host_memory()
        logger.warning("restoring the previous model after a failed replace: %s", cause)
        try:
            restored = await self._build(again)
        except WrapperError as exc:
            self.last_error = f"{cause}; restoring the previous model failed too: {exc.message}"
            raise failure from None
        self._activate(restored)
        self.last_error = cause
        raise self._rolled_back(restored, failure) from None

    def _fits_alongside(self, plan: LoadPlan) -> bool:
        """Whether the watchdog's estimate says the new engine fits beside the serving one."""
        try:
            estimate = plan.adapter.estimate_memory(plan.model, plan.params)
        except Exception:
            logger.exception("memory estimate failed; swapping by unloading first")
            return False
        if estimate is None:
            return False  # unknown: two engines at once could take the machine down
        if self.guard is not None:
            try:
                self.guard.check_load(estimate)  # free memory now: the old engine is counted
            except WrapperError as exc:
                logger.info("swap unloads first: %s", exc.message)
                return False
        return True

    def _rolled_back(self, serving: LoadedModel, failure: WrapperError) -> ReplaceRolledBackError:
        """The answer to a failed replace: what serves now, and why the new model does not."""
        message = self.last_error or failure.message
        self.last_error = message
        error = type(failure)(message, param=failure.param, code=failure.code).to_response()
        response = evolve(
            serving.response, status="rolled_back", rolled_back=True, error=error.error
        )
        return ReplaceRolledBackError(response, failure.status_code, failure.headers)

    async def _build(self, plan: LoadPlan, *, alongside: bool = False) -> LoadedModel:
        """Load `plan`'s engine; on failure clean up and raise a sanitised `WrapperError`."""
        self.last_error = None
        if not alongside:
            self._plan = plan
            self._set_state(ModelState.LOADING)
        baseline = await asyncio.to_thread(self.probe.snapshot)
        started = time.perf_counter()
        plan.env.apply()
        adapter: Adapter[Any] = plan.adapter
        failure: WrapperError | None = None
        try:
            info = await adapter.load(plan.model, plan.params)
        except BaseException as exc:
            await self._abandon(plan, exc, alongside=alongside)
            if isinstance(exc, asyncio.CancelledError):
                raise
            failure = self._load_error(exc)
        if failure is not None:
            # raised outside the except block: no traceback of the failed engine rides along
            # (its frames would keep the half-built engine's memory alive, e.g. during a rollback)
            raise failure
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
        return LoadedModel(plan, adapter, info, response, baseline, self._clock())

    def _load_error(self, exc: BaseException) -> WrapperError:
        """The client's error for a failed load: its class kept for 4xx/upstream, else 500."""
        message = self.last_error or sanitize_exception(exc, self.secrets)
        if isinstance(exc, WrapperError) and exc.status_code < 500:
            return type(exc)(message, param=exc.param, code=exc.code, headers=exc.headers)
        if isinstance(exc, UpstreamError):  # 502/504: the upstream failed, not our engine
            return type(exc)(f"load failed: {message}", code=exc.code)
        return EngineError(f"engine failed to load: {message}")

    def _activate(self, loaded: LoadedModel, swap: SwapKind | None = None) -> LoadResponse:
        """Serve `loaded` from now on: one step, so no request sees a gap between models."""
        if swap is not None:
            loaded.response = evolve(loaded.response, swap=swap)
        self.current = loaded
        self._plan = loaded.plan
        freeze_heap()
        self._set_state(ModelState.READY)
        if self.listener is not None:
            self.listener.on_load(loaded.response)
        return loaded.response

    async def _abandon(self, plan: LoadPlan, exc: BaseException, *, alongside: bool) -> None:
        """Clean up after a failed load: unload the half-built engine, restore env, go empty."""
        reason = describe_load_failure(exc, self.secrets)
        # the whole chain goes to the log (tracebacks are masked by the log filter)
        logger.error("load of backend %s failed: %s", plan.backend.name, reason, exc_info=exc)
        try:
            await plan.adapter.unload()
        except Exception:
            logger.exception("cleanup after a failed load raised")
        plan.env.restore()
        self.last_error = reason
        gc.collect()
        release_host_memory()
        if not alongside:
            self._plan = None
            self.current = None
            self._set_state(ModelState.EMPTY)

    async def unload(self, drain_timeout_s: float | None = None) -> UnloadResponse:
        """Drain and unload; `status: empty` when nothing was loaded (idempotent)."""
        self._begin("unload")
        try:
            if self._state is ModelState.EMPTY:
                return UnloadResponse(status="empty")
            return await self._unload(drain_timeout_s)
        finally:
            self._end()

    async def _unload(
        self,
        drain_timeout_s: float | None,
        *,
        loaded: LoadedModel | None = None,
        successor: LoadedModel | None = None,
    ) -> UnloadResponse:
        """Unload `loaded` (default: the current model); with `successor`, it serves meanwhile."""
        loaded = self.current if loaded is None else loaded
        assert loaded is not None  # noqa: S101  (READY implies a loaded model)
        timeout = self.default_drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if successor is None:
            self._set_state(ModelState.UNLOADING)
        started = time.perf_counter()
        before_drain = len(loaded.tickets)
        drained_all = await self._wait_drained(loaded, timeout)
        aborted = 0
        if not drained_all:
            for ticket in loaded.tickets:
                ticket.aborted = True
            aborted = len(loaded.tickets)
        drain_s = time.perf_counter() - started
        before = await asyncio.to_thread(self.probe.snapshot, loaded.info.engine_pids)
        unload_started = time.perf_counter()
        try:
            await loaded.adapter.unload()
        except Exception as exc:
            logger.exception("adapter unload raised")
            self.last_error = "unload: " + sanitize_exception(exc, self.secrets)
        # aborted streams end once the adapter stops them; give them a bounded moment to say so
        await self._wait_drained(loaded, self.abort_grace_s)
        if successor is None:
            loaded.plan.env.restore()
        else:
            successor.plan.env.take_over(loaded.plan.env)
        served, backend = loaded.plan.served_model_name, loaded.plan.backend.name
        pre_load = loaded.baseline
        # drop every reference to the adapter before collecting, or its engine survives the gc
        if successor is None:
            self.current = None
            self._plan = None
        for ticket in loaded.tickets:
            ticket.loaded = None
        loaded.tickets.clear()
        del loaded
        unfreeze_heap()  # frozen objects are never collected: the engine's must be again
        gc.collect()
        release_host_memory()
        after, settled = await self._settle()
        unload_s = time.perf_counter() - unload_started
        response = UnloadResponse(
            status="unloaded",
            model=self.secrets.mask(served),
            drained=before_drain - aborted,
            aborted=aborted,
            drain_s=round(drain_s, 4),
            unload_s=round(unload_s, 4),
            memory=_change(before, after),
            memory_settled=settled,
            **self._judge_memory(backend, pre_load, after, comparable=successor is None),
        )
        self.last_unload = response
        if successor is None:
            self._set_state(ModelState.EMPTY)
        if self.listener is not None:
            self.listener.on_unload(response)
        return response

    def _judge_memory(
        self, backend: str, pre_load: MemorySnapshot, after: MemorySnapshot, *, comparable: bool
    ) -> dict[str, Any]:
        """The unload's memory figures against the backend's first baseline and last unload."""
        compared = (
            "device"
            if after.device_used_mib is not None and pre_load.device_used_mib is not None
            else "rss"
        )
        figures: dict[str, Any] = {
            "memory_compared": compared,
            "memory_vs_pre_load_mib": _above(pre_load, after, compared),
            "memory_tolerance_mib": self.settle_tolerance_mib,
        }
        if not comparable:
            # another model is still loaded: its memory is in `after`, so no verdict is honest
            return figures
        first = self._first_baseline.setdefault(backend, after)
        previous = self._previous_unload.get(backend)
        self._previous_unload[backend] = after
        vs_first = _above(first, after, compared)
        returned = vs_first <= self.settle_tolerance_mib
        if not returned:
            logger.warning(
                "unload left %.0f MiB above the backend's first baseline (tolerance %.0f MiB)",
                vs_first,
                self.settle_tolerance_mib,
            )
        return {
            **figures,
            "memory_vs_first_baseline_mib": vs_first,
            "memory_vs_previous_unload_mib": (
                None if previous is None else _above(previous, after, compared)
            ),
            "memory_returned": returned,
        }

    async def _wait_idle(self, seconds: float) -> bool:
        """Wait until no request runs at all, at most `seconds`; True when none does."""
        if not self._inflight:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _wait_drained(self, loaded: LoadedModel, seconds: float) -> bool:
        """Wait until no request runs on `loaded`, at most `seconds`; True when none does."""
        deadline = time.monotonic() + seconds
        while loaded.tickets:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                return not loaded.tickets
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
        return self._busy is not None

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


def _above(baseline: MemorySnapshot, after: MemorySnapshot, compared: str) -> float:
    """`after` minus `baseline` in MiB: device memory when `compared` says so, else host RSS."""
    if compared == "device" and baseline.device_used_mib is not None:
        return round((after.device_used_mib or 0.0) - baseline.device_used_mib, 1)
    return round(after.rss_mib - baseline.rss_mib, 1)


__all__: Sequence[str] = [
    "InflightTicket",
    "LoadPlan",
    "LoadedModel",
    "ModelManager",
    "ModelState",
    "ReplaceRolledBackError",
    "describe_load_failure",
    "root_cause",
]
