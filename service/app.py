"""The Litestar application: `create_app()` wires controllers, providers, handlers and lifespan.

Singletons (ModelManager, TelemetryManager, Admission, ChatServing and the completions and
tokenize servings over it) are created by `services_lifespan` and live on `app.state`;
controllers receive them through `Provide` providers (`sync_to_thread=False`: they only read
state). Tests pass their own registry (fake adapters) through `create_app(...)` arguments
instead of monkeypatching.

Must never: import an engine (torch, vllm, sglang, transformers); do work at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from prometheus_client import CollectorRegistry

from hooks.chain import HookSet
from registry.manager import ModelManager
from registry.memory import MemoryLedger
from registry.registry import AdapterRegistry
from registry.secrets import SecretStore
from schemas.control import LoadRequest, LoadResponse, UnloadResponse
from schemas.converter import unstructure
from service.admission import Admission
from service.auth import KeyRing
from service.completions import CompletionServing, TokenServing
from service.context import SANE_ID_BYTES as SANE_ID
from service.context import (
    Exchanges,
    StallWatch,
    context_of,
    edge,
    new_request_id,
    request_id_from_headers,
)
from service.controllers.chat import ChatController, TokenizeController
from service.controllers.control import AdapterController, ModelController
from service.controllers.ops import (
    HealthController,
    MetricsController,
    ResourcesController,
    TelemetryController,
)
from service.datapath import CHAT_PATH, COMPLETIONS_PATH, ChatRoute
from service.errors import EXCEPTION_HANDLERS
from service.gpu import Nvml
from service.logs import mask_all_handlers
from service.openapi import OpenAPIController
from service.serving import ChatServing
from service.settings import Settings
from service.telemetry import RequestMemoryMeter, TelemetryManager
from service.tracing import TRACED_PATHS, RequestTracer, tracer_from_env
from service.watchdog import PressureConfig, ResourceWatchdog, ServiceMemoryProbe

logger = logging.getLogger(__name__)


_PROBE_METHODS = frozenset({"GET", "HEAD"})
_EDGE_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})
_HEALTH_BODY = b'{"status":"ok"}'
_HEALTH_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_HEALTH_BODY)).encode()),
    (b"cache-control", b"no-store"),
]


async def _liveness(scope: Any, send: Any) -> None:
    """`/health` answered before routing: two sends, no allocation beyond the request id."""
    rid = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
    rid = rid if rid is not None and SANE_ID.fullmatch(rid) else new_request_id().encode()
    headers = [*_HEALTH_HEADERS, (b"x-request-id", rid)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    body = b"" if scope["method"] == "HEAD" else _HEALTH_BODY
    await send({"type": "http.response.body", "body": body})


class WrapperApp(Litestar):
    """Litestar with an ASGI edge that stamps t0 and x-request-id on every HTTP exchange.

    Litestar's own middleware runs per route, after routing, so it would miss 404s and start the
    clock late; overriding `__call__` is the one place that sees every request first. The edge
    also keeps `exchanges`, the HTTP exchanges in progress, for the stall watch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.exchanges = Exchanges()
        super().__init__(*args, **kwargs)
        self._chat = ChatRoute(self.state, self.exchanges)
        self._completions = ChatRoute(self.state, self.exchanges, "completions")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI entry: HTTP goes through the edge, lifespan and websockets straight through.

        `POST /v1/chat/completions` and `POST /v1/completions` are served by `service.datapath`
        without Litestar's layers (it stamps its own context and request id the same way the
        edge does).
        """
        if scope["type"] == "http":
            if scope["path"] == "/health" and scope["method"] in _PROBE_METHODS:
                await _liveness(scope, send)
                return
            # responses by status code for the dashboards (telemetry exists once lifespan ran)
            telemetry: TelemetryManager | None = self.state.get("telemetry")
            if telemetry is not None:
                send = telemetry.counting(send)
            tracer: RequestTracer | None = self.state.get("tracer")
            path = scope["path"]
            if path in _EDGE_PATHS and scope["method"] == "POST":
                # the data plane's hot routes, served without Litestar's layers (service.datapath)
                route = self._chat if path == CHAT_PATH else self._completions
                if tracer is not None:
                    await _traced_chat(route, tracer)(scope, receive, send)
                else:
                    await route(scope, receive, send)
                return
            inner = super().__call__
            if tracer is not None and scope["path"] in TRACED_PATHS:
                inner = _traced(inner, tracer)
            await edge(inner, scope, receive, send, self.exchanges)
        else:
            await super().__call__(scope, receive, send)


class GracefulStop:
    """What SIGTERM does inside the app (DESIGN.md, lifecycle rules).

    `drain_and_stop()`: admission closes (new requests 503 `shutting_down`, `/ready` 503), the
    requests in flight get `drain_timeout_s` to finish, then what is left is aborted (streams end
    with a `shutting_down` error event and `[DONE]`, others get a 503 envelope) and the engine is
    unloaded. The server (service/server.py) closes connections only after it returns. `hurry()`
    (a second signal) ends the drain at once.
    """

    #: how long aborted streams may take to end, and a load in progress to finish, at stop time
    ABORT_GRACE_S = 5.0

    def __init__(self, manager: ModelManager, admission: Admission, drain_timeout_s: float) -> None:
        self.manager = manager
        self.admission = admission
        self.drain_timeout_s = drain_timeout_s
        self.preload: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._done = asyncio.Event()
        self._started = False

    @property
    def stopping(self) -> bool:
        """The process is stopping: not ready, admits nothing new."""
        return self.admission.closing

    def hurry(self) -> None:
        """Skip what is left of the drain (second signal)."""
        self._hurry.set()

    async def _until(self, done: Any, seconds: float) -> bool:
        """Poll `done()` every 50 ms for up to `seconds` or until `hurry()`; its last value."""
        deadline = time.perf_counter() + seconds
        while not done() and not self._hurry.is_set():
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), min(0.05, left))
        return bool(done())

    async def drain_and_stop(self) -> None:
        """Refuse, drain, abort the rest, unload; a second call waits for the first."""
        if self._started:
            await self._done.wait()
            return
        self._started = True
        started = time.perf_counter()
        try:
            self.admission.close()
            manager = self.manager
            waiting = manager.in_flight
            logger.info(
                "stopping: /ready is 503, new requests get 503; draining %d request(s) for up "
                "to %.1f s",
                waiting,
                self.drain_timeout_s,
            )
            if self.preload is not None and not self.preload.done():
                self.preload.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.preload
            await self._until(lambda: manager.in_flight == 0, self.drain_timeout_s)
            left = manager.in_flight
            if not await self._until(lambda: not manager.busy, self.ABORT_GRACE_S):
                logger.warning("stopping: a load or unload is still running; not waiting on it")
            report = await manager.stop_engine(self.ABORT_GRACE_S)
            logger.info(
                "stopped serving in %.2f s: %d request(s) finished, %d ended with shutting_down%s",
                time.perf_counter() - started,
                waiting - left,
                left,
                "; engine unloaded" if report is not None else "",
            )
        finally:
            self._done.set()


def _traced(app: Any, tracer: RequestTracer) -> Any:
    """`app` inside a request span that is current for the whole exchange."""

    async def traced(scope: Any, receive: Any, send: Any) -> None:
        ctx = context_of(scope)
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in (b"traceparent", b"tracestate")
        }
        with tracer.request_span(ctx.request_id, scope["method"], scope["path"], carrier):
            await app(scope, receive, send)

    return traced


def _traced_chat(app: Any, tracer: RequestTracer) -> Any:
    """The chat route inside a request span; the route makes the request's context itself."""

    async def traced(scope: Any, receive: Any, send: Any) -> None:
        headers = scope.get("headers", ())
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        request_id = request_id_from_headers(headers)
        # the route reads its id from this header: give it the span's (a no-op when sent sane)
        scope["headers"] = [
            *(h for h in headers if h[0] != b"x-request-id"),
            (b"x-request-id", request_id.encode()),
        ]
        with tracer.request_span(request_id, scope["method"], scope["path"], carrier):
            await app(scope, receive, send)

    return traced


# --- providers -----------------------------------------------------------------------------------


def provide_manager(state: State) -> ModelManager:
    """The lifecycle manager singleton."""
    manager: ModelManager = state.manager
    return manager


def provide_serving(state: State) -> ChatServing:
    """The chat serving singleton."""
    serving: ChatServing = state.serving
    return serving


def provide_completions(state: State) -> CompletionServing:
    """The completions serving singleton (over the chat serving's machinery)."""
    completions: CompletionServing = state.completions
    return completions


def provide_tokens(state: State) -> TokenServing:
    """The tokenize/detokenize serving singleton."""
    tokens: TokenServing = state.tokens
    return tokens


def provide_telemetry(state: State) -> TelemetryManager:
    """The telemetry singleton."""
    telemetry: TelemetryManager = state.telemetry
    return telemetry


def provide_registry(state: State) -> AdapterRegistry:
    """The adapter registry (built before the app, immutable)."""
    registry: AdapterRegistry = state.registry
    return registry


def provide_admission(state: State) -> Admission:
    """The admission controller (its `closing` flag says the process is stopping)."""
    admission: Admission = state.admission
    return admission


def provide_watchdog(state: State) -> ResourceWatchdog:
    """The resource watchdog singleton."""
    watchdog: ResourceWatchdog = state.watchdog
    return watchdog


def provide_secrets(state: State) -> SecretStore:
    """The process's secret store."""
    secrets: SecretStore = state.secrets
    return secrets


class _TelemetryListener:
    """Feeds load/unload reports to telemetry and re-masks handlers engines added."""

    def __init__(self, telemetry: TelemetryManager, secrets: SecretStore) -> None:
        self.telemetry = telemetry
        self.secrets = secrets

    def on_load(self, response: LoadResponse) -> None:
        # engines (vLLM, transformers) install their own log handlers on import
        mask_all_handlers(self.secrets)
        self.telemetry.record_lifecycle({"event": "load", **unstructure(response)})

    def on_unload(self, response: UnloadResponse) -> None:
        self.telemetry.record_lifecycle({"event": "unload", **unstructure(response)})


@contextlib.asynccontextmanager
async def services_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Create the singletons, preload a preset if asked, and tear down in reverse order."""
    state = app.state
    settings: Settings = state.settings
    metrics_registry = CollectorRegistry()
    telemetry = TelemetryManager(metrics_registry, max_records=settings.telemetry_records)
    nvml = Nvml()
    probe = ServiceMemoryProbe(nvml)
    manager: ModelManager

    def engine_pids() -> tuple[int, ...]:
        current = manager.current
        return current.info.engine_pids if current is not None else ()

    def engine_died(reason: str) -> None:
        manager.engine_failed(reason)

    watchdog = ResourceWatchdog(
        nvml,
        metrics_registry,
        interval_s=settings.watchdog_interval_s,
        pressure=PressureConfig(min_available_mib=settings.min_available_mib),
        engine_pids=engine_pids,
        on_engine_death=engine_died,
    )
    manager = ModelManager(
        state.registry,
        state.secrets,
        memory=MemoryLedger(probe, guard=watchdog),
        listener=_TelemetryListener(telemetry, state.secrets),
        default_drain_timeout_s=settings.drain_timeout_s,
        swap_wait_s=settings.swap_wait_s,
    )
    admission = Admission(settings.max_concurrency, settings.max_queue)
    telemetry.bind_gauges(manager, admission)
    # every hook of adapters.yaml, instantiated once (specs were validated with the registry)
    hooks = HookSet(state.registry.hook_specs, mask=state.secrets.mask, observer=telemetry)
    hooks.start()
    state.hooks = hooks
    telemetry.tracer = state.get("tracer")
    state.telemetry = telemetry
    state.watchdog = watchdog
    state.manager = manager
    state.admission = admission
    state.serving = ChatServing(
        manager,
        admission,
        telemetry,
        settings,
        state.secrets,
        RequestMemoryMeter(probe, watchdog),
        hooks,
    )
    state.completions = CompletionServing(state.serving)
    state.tokens = TokenServing(state.serving)
    stopper = GracefulStop(manager, admission, settings.drain_timeout_s)
    state.stopper = stopper
    exchanges = app.exchanges if isinstance(app, WrapperApp) else Exchanges()
    stall = StallWatch(exchanges, settings.stream_stall_s)
    state.stall = stall
    await watchdog.start()
    stall.start()
    preload: asyncio.Task[None] | None = None
    if settings.preload:
        preload = stopper.preload = asyncio.create_task(_preload(manager, settings.preload))
    try:
        yield
    finally:
        if preload is not None and not preload.done():
            preload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await preload
        await manager.shutdown()
        await stall.stop()
        # after the requests: their after_response work is queued by then (drain is bounded)
        await hooks.close()
        await watchdog.stop()


async def _preload(manager: ModelManager, preset: str) -> None:
    """Load the start-up preset in the background so /health answers while it loads."""
    logger.info("preloading preset %s", preset)
    try:
        report = await manager.load(LoadRequest(preset=preset))
    except Exception as exc:
        logger.error("preload of preset %s failed: %s", preset, exc)  # noqa: TRY400
        return
    logger.info(
        "preset %s ready as %r in %.1f s",
        preset,
        report.plan.served_model_name,
        report.timings.total_s,
    )


def create_app(
    settings: Settings | None = None,
    *,
    registry: AdapterRegistry | None = None,
    secrets: SecretStore | None = None,
    tracer_provider: Any = None,
) -> Litestar:
    """Build the application. Registry problems raise `RegistryError` before anything binds.

    `tracer_provider`: an OpenTelemetry TracerProvider (tests pass one with an in-memory
    exporter); without it tracing is on only when the standard OTEL_* variables ask for it.
    """
    settings = settings or Settings.from_env()
    if secrets is None:
        secrets = SecretStore(settings.max_secrets)
    for key in (*settings.admin_keys, *settings.api_keys):
        secrets.add(key)
    if registry is None:
        registry = AdapterRegistry.from_file(
            settings.registry_path, model_roots=settings.model_roots, cache_dir=settings.cache_dir
        )
    state = State(
        {
            "settings": settings,
            "registry": registry,
            "secrets": secrets,
            "keyring": KeyRing.from_keys(
                settings.admin_keys, settings.api_keys, metrics_open=settings.metrics_open
            ),
            "tracer": tracer_from_env(tracer_provider),
        }
    )
    return WrapperApp(
        route_handlers=[
            ModelController,
            AdapterController,
            ChatController,
            TokenizeController,
            HealthController,
            MetricsController,
            TelemetryController,
            ResourcesController,
            OpenAPIController,
        ],
        dependencies={
            "manager": Provide(provide_manager, sync_to_thread=False),
            "serving": Provide(provide_serving, sync_to_thread=False),
            "completions": Provide(provide_completions, sync_to_thread=False),
            "tokens": Provide(provide_tokens, sync_to_thread=False),
            "telemetry": Provide(provide_telemetry, sync_to_thread=False),
            "registry": Provide(provide_registry, sync_to_thread=False),
            "secrets": Provide(provide_secrets, sync_to_thread=False),
            "watchdog": Provide(provide_watchdog, sync_to_thread=False),
            "admission": Provide(provide_admission, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[services_lifespan],
        state=state,
        request_max_body_size=settings.max_body_bytes,
        # the API description is built from the attrs schemas the handlers really use and
        # served by OpenAPIController (service/openapi.py); Litestar's would describe raw bytes
        openapi_config=None,
        # logging is configured once by the CLI (masked handlers); Litestar must not replace it
        logging_config=None,
        debug=False,
    )


__all__ = ["GracefulStop", "WrapperApp", "create_app"]
