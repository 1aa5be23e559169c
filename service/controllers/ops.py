"""Operations routes: liveness, readiness, Prometheus metrics, telemetry as JSON.

`/health`, `/ready` and `/version` answer without a key (orchestrators probe them); `/metrics`
needs a key unless IW_METRICS_OPEN is set; `/v1/telemetry*` need a key.

Must never: expose a secret through a metric label or a telemetry field.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.params import Parameter
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from registry.manager import ModelManager, ModelState
from schemas.completions import VersionResponse
from schemas.converter import unstructure
from schemas.errors import ServiceUnavailableError
from service.admission import Admission, shutting_down
from service.auth import require_metrics, require_ops
from service.errors import json_response
from service.telemetry import TelemetryManager, vllm_exports_itself
from service.version import package_version
from service.watchdog import ResourceWatchdog


class HealthController(Controller):
    """Probes for the orchestrator."""

    path = "/"
    tags = ["ops"]  # noqa: RUF012

    @get("/health", operation_id="health", name="ops:health")
    async def health(self) -> Response[bytes]:
        """The process is alive and serving HTTP."""
        return json_response({"status": "ok"})

    @get("/version", operation_id="version", name="ops:version")
    async def version(self) -> Response[bytes]:
        """The wrapper's package version (vLLM's `GET /version` shape)."""
        return json_response(VersionResponse(package_version()))

    @get("/ready", operation_id="ready", name="ops:ready")
    async def ready(
        self,
        manager: NamedDependency[ModelManager],
        watchdog: NamedDependency[ResourceWatchdog],
        admission: NamedDependency[Admission],
    ) -> Response[bytes]:
        """200 only when a model is ready, the process is not stopping, memory is not short."""
        if admission.closing:
            raise shutting_down()
        if watchdog.under_pressure:
            raise ServiceUnavailableError(
                "not ready: host memory under pressure",
                code="memory_pressure",
                headers={"Retry-After": "10"},
            )
        if manager.state is not ModelState.READY or manager.current is None:
            raise ServiceUnavailableError(
                f"not ready (state: {manager.state.value})", headers={"Retry-After": "5"}
            )
        # unauthenticated: a served name that equals a secret must not leak here
        served = manager.secrets.mask(manager.current.plan.served_model_name)
        return json_response({"status": "ready", "model": served})


class MetricsController(Controller):
    """Prometheus exposition."""

    path = "/metrics"
    guards = [require_metrics]  # noqa: RUF012
    tags = ["ops"]  # noqa: RUF012

    @get("/", operation_id="metrics", name="ops:metrics")
    async def metrics(self, telemetry: NamedDependency[TelemetryManager]) -> Response[bytes]:
        """Request histograms, counters and resource gauges in Prometheus text format."""
        # ours, the request series under vLLM's names unless vLLM exports them itself, then the
        # default registry: process collectors and engines' own (vLLM's vllm:*)
        body = generate_latest(telemetry.registry)
        if not vllm_exports_itself():
            body += generate_latest(telemetry.vllm.registry)
        body += generate_latest(REGISTRY)
        # Litestar appends "; charset=utf-8" to text/* itself; prometheus_client's constant
        # already carries it, and a doubled parameter confuses strict scrapers
        return Response(body, media_type=CONTENT_TYPE_LATEST.replace("; charset=utf-8", ""))


class TelemetryController(Controller):
    """Recent per-request records and their percentiles."""

    path = "/v1/telemetry"
    guards = [require_ops]  # noqa: RUF012
    tags = ["ops"]  # noqa: RUF012

    @get("/", operation_id="telemetry", name="ops:telemetry")
    async def telemetry(
        self,
        telemetry: NamedDependency[TelemetryManager],
        limit: int = Parameter(default=50, ge=0, le=10_000),
        window_s: float | None = Parameter(default=None, gt=0),
    ) -> Response[bytes]:
        """The last `limit` request records, p50/p90/p99 per metric per model over `window_s`."""
        body: dict[str, Any] = {
            "records": [unstructure(r) for r in telemetry.recent(limit)],
            "summary": telemetry.summary(window_s),
            "lifecycle": telemetry.lifecycle,
        }
        return json_response(body)


class ResourcesController(Controller):
    """ResourceWatchdog samples."""

    path = "/v1/telemetry/resources"
    guards = [require_ops]  # noqa: RUF012
    tags = ["ops"]  # noqa: RUF012

    @get("/", operation_id="resources", name="ops:resources")
    async def resources(
        self,
        watchdog: NamedDependency[ResourceWatchdog],
        limit: int = Parameter(default=60, ge=0, le=100_000),
    ) -> Response[bytes]:
        """The last `limit` samples (CPU, RAM, GPUs), pressure flag and the watchdog's own cost."""
        body = {
            "interval_s": watchdog.interval_s,
            "nvml_available": watchdog.nvml.available,
            "under_pressure": watchdog.under_pressure,
            "cost_cpu_fraction": round(watchdog.cost_fraction, 6),
            "samples": [unstructure(s) for s in watchdog.samples(limit)],
        }
        return json_response(body)
