"""OpenTelemetry tracing: one span per chat request, off unless the standard OTEL_* say otherwise.

Enabled when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER`
is set (and `OTEL_SDK_DISABLED` is not true); the SDK then reads every other OTEL_* variable
itself (service name, headers, sampler). The SDK is the optional extra `otel`: without it the
service runs exactly as before and says once why there are no traces.

The span is opened at the ASGI edge around the whole exchange (so it is the current span while
the adapter runs, and `traceparent` reaches an upstream server), and gets its events from the
request's telemetry record when it ends: admission, engine start, first token, end, with the
times the record was measured at, so the trace and `/v1/telemetry` never disagree.

Must never: import the SDK when tracing is off; put a prompt, an output or a key on a span.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RequestTracer", "tracer_from_env", "tracing_requested"]

#: routes that get a span: the data plane (control calls are audited, not traced)
TRACED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _ns(unix_s: float) -> int:
    return int(unix_s * 1e9)


class RequestTracer:
    """Opens request spans and fills them from telemetry records."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self._open: dict[str, Any] = {}

    @contextlib.contextmanager
    def request_span(
        self, request_id: str, method: str, path: str, carrier: Mapping[str, str]
    ) -> Iterator[Any]:
        """A SERVER span, current for the whole exchange (streamed body included).

        `carrier` holds the request's `traceparent`/`tracestate`: a caller's trace continues.
        """
        from opentelemetry import propagate, trace  # noqa: PLC0415  (only when tracing is on)

        span = self.tracer.start_span(
            "chat.completions",
            context=propagate.extract(dict(carrier)),
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "inference_wrapper.request_id": request_id,
            },
        )
        self._open[request_id] = span
        try:
            with trace.use_span(span, end_on_exit=True, record_exception=False):
                yield span
        finally:
            self._open.pop(request_id, None)

    def on_record(self, rec: Any) -> None:
        """Events and attributes from a finished request's record (if its span is open)."""
        span = self._open.get(rec.request_id)
        if span is None:
            return
        t0 = rec.started_at
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": rec.model,
                "gen_ai.usage.input_tokens": rec.prompt_tokens,
                "gen_ai.usage.output_tokens": rec.completion_tokens,
                "inference_wrapper.backend": rec.backend,
                "inference_wrapper.status": rec.status,
                "inference_wrapper.stream": rec.stream,
            }
        )
        if rec.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [rec.finish_reason])
        for name, offset_ms in (
            ("admission", getattr(rec, "admission_ms", None)),
            ("engine start", rec.queue_time_ms),
            ("first token", rec.time_to_first_token_ms),
            ("end", rec.e2e_ms),
        ):
            if offset_ms is not None:
                span.add_event(name, timestamp=_ns(t0 + offset_ms / 1000))
        if rec.status == "error":
            from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

            span.set_status(Status(StatusCode.ERROR))


def tracer_from_env(tracer_provider: Any = None) -> RequestTracer | None:
    """A RequestTracer when OTEL_* ask for one (or a provider is given, as tests do), else None.

    With OTEL_* set, an SDK TracerProvider with a batch OTLP exporter (or the exporter named by
    OTEL_TRACES_EXPORTER: otlp or console) is built and made global.
    """
    if tracer_provider is None and not tracing_requested():
        return None
    try:
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        logger.warning(
            "OTEL_* variables ask for traces but opentelemetry-sdk is not installed "
            "(pip install 'inference-wrapper[otel]'); tracing stays off"
        )
        return None
    if tracer_provider is None:
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
        exporter: SpanExporter
        if exporter_name == "console":
            exporter = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                    OTLPSpanExporter,
                )
            except ImportError:
                logger.warning("the OTLP exporter is not installed; tracing stays off")
                return None
            exporter = OTLPSpanExporter()
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "inference-wrapper")}
        )
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        logger.info("OpenTelemetry tracing on (exporter %s)", exporter_name)
    return RequestTracer(tracer_provider.get_tracer("inference_wrapper"))
