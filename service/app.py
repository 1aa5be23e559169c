"""The Litestar application: `create_app()` wires controllers, providers, handlers and lifespan.

Singletons (ModelManager, TelemetryManager, Admission, ChatServing) are created by
`services_lifespan` and live on `app.state`; controllers receive them through `Provide` providers
(`sync_to_thread=False`: they only read state). Tests pass their own registry (fake adapters)
through `create_app(...)` arguments instead of monkeypatching.

Must never: import an engine (torch, vllm, sglang, transformers); do work at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from prometheus_client import CollectorRegistry

from registry.manager import ModelManager
from registry.registry import AdapterRegistry
from registry.secrets import SecretStore
from schemas.control import LoadRequest, LoadResponse, UnloadResponse
from schemas.converter import unstructure
from service.admission import Admission
from service.auth import KeyRing
from service.context import edge
from service.controllers.chat import ChatController
from service.controllers.control import AdapterController, ModelController
from service.controllers.ops import (
    HealthController,
    MetricsController,
    ResourcesController,
    TelemetryController,
)
from service.datapath import CHAT_PATH, ChatRoute
from service.errors import EXCEPTION_HANDLERS
from service.gpu import Nvml
from service.logs import mask_all_handlers
from service.serving import ChatServing
from service.settings import Settings
from service.telemetry import RequestMemoryMeter, TelemetryManager
from service.watchdog import PressureConfig, ResourceWatchdog, ServiceMemoryProbe

logger = logging.getLogger(__name__)


class WrapperApp(Litestar):
    """Litestar with an ASGI edge that stamps t0 and x-request-id on every HTTP exchange.

    Litestar's own middleware runs per route, after routing, so it would miss 404s and start the
    clock late; overriding `__call__` is the one place that sees every request first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chat = ChatRoute(self.state)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI entry: HTTP goes through the edge, lifespan and websockets straight through.

        `POST /v1/chat/completions` is served by `service.datapath` without Litestar's layers
        (it stamps its own context and request id the same way the edge does).
        """
        if scope["type"] == "http":
            if scope["path"] == CHAT_PATH and scope["method"] == "POST":
                await self._chat(scope, receive, send)
            else:
                await edge(super().__call__, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


# --- providers -----------------------------------------------------------------------------------


def provide_manager(state: State) -> ModelManager:
    """The lifecycle manager singleton."""
    manager: ModelManager = state.manager
    return manager


def provide_serving(state: State) -> ChatServing:
    """The chat serving singleton."""
    serving: ChatServing = state.serving
    return serving


def provide_telemetry(state: State) -> TelemetryManager:
    """The telemetry singleton."""
    telemetry: TelemetryManager = state.telemetry
    return telemetry


def provide_registry(state: State) -> AdapterRegistry:
    """The adapter registry (built before the app, immutable)."""
    registry: AdapterRegistry = state.registry
    return registry


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

    watchdog = ResourceWatchdog(
        nvml,
        metrics_registry,
        interval_s=settings.watchdog_interval_s,
        pressure=PressureConfig(min_available_mib=settings.min_available_mib),
        engine_pids=engine_pids,
    )
    manager = ModelManager(
        state.registry,
        state.secrets,
        probe=probe,
        guard=watchdog,
        listener=_TelemetryListener(telemetry, state.secrets),
        default_drain_timeout_s=settings.drain_timeout_s,
    )
    admission = Admission(settings.max_concurrency, settings.max_queue)
    telemetry.bind_gauges(manager, admission)
    state.telemetry = telemetry
    state.watchdog = watchdog
    state.manager = manager
    state.admission = admission
    state.serving = ChatServing(
        manager, admission, telemetry, settings, state.secrets, RequestMemoryMeter(probe, watchdog)
    )
    await watchdog.start()
    preload: asyncio.Task[None] | None = None
    if settings.preload:
        preload = asyncio.create_task(_preload(manager, settings.preload))
    try:
        yield
    finally:
        if preload is not None and not preload.done():
            preload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await preload
        await manager.shutdown()
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
) -> Litestar:
    """Build the application. Registry problems raise `RegistryError` before anything binds."""
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
        }
    )
    return WrapperApp(
        route_handlers=[
            ModelController,
            AdapterController,
            ChatController,
            HealthController,
            MetricsController,
            TelemetryController,
            ResourcesController,
        ],
        dependencies={
            "manager": Provide(provide_manager, sync_to_thread=False),
            "serving": Provide(provide_serving, sync_to_thread=False),
            "telemetry": Provide(provide_telemetry, sync_to_thread=False),
            "registry": Provide(provide_registry, sync_to_thread=False),
            "secrets": Provide(provide_secrets, sync_to_thread=False),
            "watchdog": Provide(provide_watchdog, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[services_lifespan],
        state=state,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        # logging is configured once by the CLI (masked handlers); Litestar must not replace it
        logging_config=None,
        debug=False,
    )


__all__ = ["WrapperApp", "create_app"]
