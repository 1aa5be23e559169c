"""OpenTelemetry: a span per chat request with its events; traceparent reaches the upstream."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers import (
    ADMIN,
    API,
    ROOT,
    TEST_REGISTRY,
    LiveServer,
    chat_body,
    make_registry,
    make_settings,
)
from service.app import create_app
from service.tracing import tracing_requested

PROMPT = "secret-ish prompt words"
UPSTREAM_REGISTRY = """
adapters:
  upstream:
    module: adapters.openai_upstream:OpenAIUpstreamAdapter
    allowed_hosts: ["127.0.0.1"]
"""


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider exporting synchronously into memory."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def chat_spans(memory: InMemorySpanExporter) -> list[ReadableSpan]:
    """The finished request spans."""
    return [s for s in memory.get_finished_spans() if s.name == "chat.completions"]


def test_tracing_is_off_unless_otel_variables_ask() -> None:
    """Only the standard variables turn tracing on; `none` and OTEL_SDK_DISABLED turn it off."""
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )


def test_span_per_request_with_lifecycle_events(tmp_path: Path, exporter: Any) -> None:
    """Whole and streamed requests each get a span: admission → engine start → first token → end."""
    provider, memory = exporter
    registry = make_registry(tmp_path, TEST_REGISTRY)
    app = create_app(make_settings(), registry=registry, tracer_provider=provider)
    with TestClient(app) as client:
        assert client.post("/v1/model/load", json={"preset": "echo"}, headers=ADMIN).is_success
        assert client.get("/health").is_success  # not traced
        whole = client.post("/v1/chat/completions", json=chat_body(PROMPT), headers=API)
        assert whole.status_code == 200
        streamed = client.post(
            "/v1/chat/completions", json=chat_body(PROMPT, stream=True), headers=API
        )
        assert streamed.status_code == 200
    spans = chat_spans(memory)
    assert len(spans) == 2
    for span, response in zip(spans, (whole, streamed), strict=True):
        events = [e.name for e in span.events]
        assert events == ["admission", "engine start", "first token", "end"]
        times = [e.timestamp for e in span.events]
        assert times == sorted(times)
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= times[0]
        assert times[-1] <= span.end_time
        attrs = dict(span.attributes or {})
        assert attrs["gen_ai.request.model"] == "echo"
        assert attrs["gen_ai.usage.output_tokens"] == len(PROMPT.split())
        assert attrs["inference_wrapper.request_id"] == response.headers["x-request-id"]
        assert attrs["inference_wrapper.status"] == "ok"
        assert PROMPT not in str(attrs)


def test_traceparent_reaches_the_upstream_and_continues_the_trace(
    tmp_path: Path, exporter: Any
) -> None:
    """Wrapper B's span is the parent of upstream A's span: traceparent was forwarded."""
    provider, memory = exporter
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    app_a = create_app(
        make_settings(api_keys=()), registry=make_registry(a_dir), tracer_provider=provider
    )
    app_b = create_app(
        make_settings(),
        registry=make_registry(b_dir, UPSTREAM_REGISTRY),
        tracer_provider=provider,
    )
    with LiveServer(app_a) as a, LiveServer(app_b) as b:
        assert httpx.post(f"{a.url}/v1/model/load", json={"preset": "echo"}, headers=ADMIN)
        load = httpx.post(
            f"{b.url}/v1/model/load",
            json={"backend": "upstream", "model": "echo",
                  "engine_params": {"base_url": f"{a.url}/v1"}},
            headers=ADMIN,
            timeout=30,
        )  # fmt: skip
        assert load.status_code == 200, load.text
        r = httpx.post(f"{b.url}/v1/chat/completions", json=chat_body(), headers=API, timeout=30)
        assert r.status_code == 200, r.text
    spans = chat_spans(memory)
    assert len(spans) == 2
    by_id = {s.attributes["inference_wrapper.request_id"]: s for s in spans if s.attributes}
    outer = by_id[r.headers["x-request-id"]]
    (inner,) = [s for s in spans if s is not outer]
    assert outer.context is not None
    assert inner.parent is not None
    assert inner.context is not None
    assert inner.context.trace_id == outer.context.trace_id
    assert inner.parent.span_id == outer.context.span_id


def test_service_imports_and_serves_without_opentelemetry(tmp_path: Path) -> None:
    """With the SDK absent, OTEL_* set only logs why, and the app still builds."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from service.app import create_app\n"
        "from service.tracing import tracer_from_env\n"
        "assert tracer_from_env() is None\n"
        "from helpers import make_registry, make_settings\n"
        "from pathlib import Path\n"
        f"create_app(make_settings(), registry=make_registry(Path({str(tmp_path)!r})))\n"
        "print('ok')\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
    }
    proc = subprocess.run(  # noqa: S603  (our interpreter, fixed code)
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "opentelemetry-sdk is not installed" in proc.stderr
