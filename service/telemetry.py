"""Per-request timing and the TelemetryManager that keeps, summarises and exports it.

Definitions (DESIGN.md; they match `vllm bench serve` and AIPerf so that a client-side benchmark
and these server-side numbers agree):
- t0: the ASGI app received the request (service.context), before body parsing and auth.
- TTFT: t0 → the first frame carrying at least one generated token is handed to the server.
- E2E: t0 → the last token-bearing frame (not the finish/usage chunk, not `[DONE]`).
- TPOT: (E2E - TTFT) / (completion_tokens - 1); null when completion_tokens <= 1.
- ITL: gaps between token-bearing frames (mean, p50, max).
- queue time: t0 → the engine starts the request (the engine's own scheduling time where it
  reports one, else the moment our admission gave the request a slot).
- generation time: first → last token-bearing frame (decode time).
- tokens/s: completion_tokens / E2E.
For non-streaming requests a "frame" is the moment a delta arrives from the adapter.

The `RequestTimer` is the only telemetry on the per-token path: one `perf_counter()` and one list
append per frame. Everything else happens once per request, after it ends.

Must never: use a secret, a prompt or an output as a label or field.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from attrs import field, fields, frozen
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.telemetry import MemorySnapshot
from service.gpu import torch_allocator, torch_reset_peak
from service.tracing import RequestTracer

#: seconds; fine below 10 ms for small models on fast GPUs, up to minutes for long generations
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)  # fmt: skip
#: distinct (tag, value) label pairs of `iw_request_tags_total`; later ones count as `other`
MAX_TAG_SERIES = 256
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)

# vLLM 0.32's own buckets (vllm/v1/metrics/buckets.py), so that vLLM's published Grafana
# dashboards read our `vllm:*` series exactly as they read vLLM's
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
#: vLLM builds 1-2-5 buckets up to max_model_len; ours cover the largest max_tokens cap
VLLM_TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5) if m * 10**e <= 131072)
#: a series vLLM's PrometheusStatLogger registers in the default registry when it runs here
_VLLM_OWN_SERIES = "vllm:num_requests_running"


def vllm_exports_itself() -> bool:
    """True while vLLM's own `vllm:*` collectors are in this process's default registry.

    vLLM's AsyncLLM always adds its PrometheusStatLogger (whatever `disable_log_stats` says), and
    it registers in prometheus_client's default registry. While it is there our `vllm:*` copies
    stay out of `/metrics` and record nothing: one family per name, no request counted twice.
    """
    return _VLLM_OWN_SERIES in REGISTRY._names_to_collectors  # noqa: SLF001  (vLLM reads it too)


class _VllmQueueGauges(Collector):
    """`vllm:num_requests_running/waiting` from admission control, labelled as vLLM labels them."""

    def __init__(self, model_name: Callable[[], str | None], admission: Any) -> None:
        self.model_name = model_name
        self.admission = admission

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """One sample each for the served model; nothing while no model is loaded."""
        name = self.model_name()
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=("model_name", "engine"),
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=("model_name", "engine"),
        )
        if name is not None:
            running.add_metric((name, "0"), self.admission.running)
            waiting.add_metric((name, "0"), self.admission.queued)
        return (running, waiting)


class VllmCompatMetrics:
    """The request series under vLLM's names, buckets and labels, for every backend.

    Lives in a registry of its own so that `/metrics` can leave it out while vLLM exports the
    same names itself (`vllm_exports_itself`). Labels are vLLM's: `model_name` (the served name)
    and `engine` (always "0": one engine per wrapper).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model_name", "engine")

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            VLLM_TTFT_BUCKETS,
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            VLLM_ITL_BUCKETS,
        )
        self.tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            VLLM_ITL_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            VLLM_LATENCY_BUCKETS,
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            VLLM_LATENCY_BUCKETS,
        )
        self.prompt_hist = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", VLLM_TOKEN_BUCKETS
        )
        self.generation_hist = hist(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            VLLM_TOKEN_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
            registry=self.registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels,
            registry=self.registry,
        )  # fmt: skip
        self.success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            (*labels, "finished_reason"), registry=self.registry,
        )  # fmt: skip
        self._series: dict[str, _Series] = {}

    def bind(self, model_name: Callable[[], str | None], admission: Any) -> None:
        """Add the scrape-time queue gauges."""
        self.registry.register(_VllmQueueGauges(model_name, admission))

    def record(self, rec: RequestRecord, itl_gaps: Iterable[float]) -> None:
        """Observe one finished request, as vLLM would have."""
        # labelled children looked up once per model, the ITL gaps folded: observing 63 gaps
        # one by one and 10 `labels()` calls cost ~60 µs a request (py-spy, bench/overhead.py)
        series = self._series.get(rec.model)
        if series is None:
            series = self._series[rec.model] = _Series((rec.model, "0"))
        of = series.of
        of(self.prompt_tokens).inc(rec.prompt_tokens)
        of(self.generation_tokens).inc(rec.completion_tokens)
        if rec.status != "ok":
            return  # vLLM's latency histograms and success counter see finished requests only
        series.with_label(self.success, rec.finish_reason or "stop").inc()
        of(self.prompt_hist).observe(rec.prompt_tokens)
        of(self.generation_hist).observe(rec.completion_tokens)
        for hist, value in (
            (self.ttft, rec.time_to_first_token_ms),
            (self.tpot, rec.tpot_ms),
            (self.e2e, rec.e2e_ms),
            (self.queue, rec.queue_time_ms),
        ):
            if value is not None:
                of(hist).observe(value / 1000)
        itl = of(self.itl)  # exported even before any gap, as vLLM does
        if itl_gaps:
            observe_many(itl, itl_gaps)


class RequestTimer:
    """Timestamps of one request (perf_counter seconds).

    Per token-bearing frame it keeps one timestamp (`frame()`: one clock read, one append);
    first, last, gaps and count are folded from them when asked, once, at the end.
    """

    __slots__ = ("_gaps", "_gaps_for", "admitted_at", "handler_at", "stamps", "t0")

    def __init__(self, t0: float, handler_at: float) -> None:
        self.t0 = t0
        self.handler_at = handler_at
        self.admitted_at: float | None = None
        self.stamps: list[float] = []
        self._gaps: list[float] = []
        self._gaps_for = 0

    def frame(self) -> None:
        """A token-bearing frame is being handed to the server now."""
        self.stamps.append(time.perf_counter())

    @property
    def frames(self) -> int:
        """Token-bearing frames so far."""
        return len(self.stamps)

    @property
    def first_at(self) -> float | None:
        """When the first token-bearing frame was handed over."""
        return self.stamps[0] if self.stamps else None

    @property
    def last_at(self) -> float | None:
        """When the last token-bearing frame was handed over."""
        return self.stamps[-1] if self.stamps else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive frames (do not modify).

        Folded once per number of frames: the record and the histograms both read them.
        """
        stamps = self.stamps
        if self._gaps_for != len(stamps):
            self._gaps = [b - a for a, b in itertools.pairwise(stamps)]
            self._gaps_for = len(stamps)
        return self._gaps


@frozen
class RequestRecord:
    """Everything measured about one finished request; `None` where not applicable."""

    request_id: str
    model: str
    backend: str
    stream: bool
    status: str
    """ok | error | cancelled (client went away) | aborted (unload ended it)."""
    finish_reason: str | None
    started_at: float
    """Unix time of t0."""
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None
    e2e_ms: float | None
    tpot_ms: float | None
    mean_itl_ms: float | None
    p50_itl_ms: float | None
    max_itl_ms: float | None
    queue_time_ms: float | None
    handler_start_ms: float
    generation_time_ms: float | None
    tokens_per_second: float | None
    engine_ttft_ms: float | None = None
    engine_tpot_ms: float | None = None
    vram_delta_mib: float | None = None
    peak_vram_mib: float | None = None
    rss_delta_mib: float | None = None
    memory_method: str | None = None
    gpu_util_mean: float | None = None
    device_memory_max_mib: float | None = None
    cpu_percent_mean: float | None = None
    kv_cache_usage: float | None = None
    hooks_ms: float | None = None
    """Time this request spent in hooks on its own path (null when it ran none)."""
    tags: dict[str, str] = field(factory=dict)
    """Labels hooks set (header_tags), bounded; not part of `metrics`."""
    admission_ms: float | None = None
    """t0 → admission control gave the request a slot (the trace's "admission" event)."""

    def metrics(self) -> dict[str, Any]:
        """The response's `metrics` object (numbers only; ids and labels live elsewhere)."""
        # every field is a scalar: read them by name, in field order, instead of attrs' asdict
        return {name: getattr(self, name) for name in _METRIC_FIELDS}


_LABEL_FIELDS = (
    "request_id", "model", "backend", "stream", "status", "started_at", "admission_ms", "tags",
)  # fmt: skip
#: the fields of `RequestRecord.metrics()`, in declaration order
_METRIC_FIELDS = tuple(f.name for f in fields(RequestRecord) if f.name not in _LABEL_FIELDS)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def build_record(
    timer: RequestTimer,
    *,
    request_id: str,
    model: str,
    backend: str,
    stream: bool,
    status: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    engine_scheduled_at: float | None = None,
    engine_first_token_at: float | None = None,
    engine_last_token_at: float | None = None,
    engine_queued_at: float | None = None,
    extra: dict[str, Any] | None = None,
) -> RequestRecord:
    """Turn a finished request's timestamps into the metrics of DESIGN.md."""
    t0 = timer.t0
    ttft = None if timer.first_at is None else timer.first_at - t0
    e2e = None if timer.last_at is None else timer.last_at - t0
    tpot = None
    if ttft is not None and e2e is not None and completion_tokens > 1:
        tpot = (e2e - ttft) / (completion_tokens - 1)
    gaps = timer.gaps
    mean_itl = p50_itl = max_itl = None
    if gaps:
        # one sort for the median and the maximum (statistics.median would sort again)
        ordered = sorted(gaps)
        mid = len(ordered) // 2
        p50_itl = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        mean_itl, max_itl = statistics.fmean(gaps), ordered[-1]
    started = engine_scheduled_at if engine_scheduled_at is not None else timer.admitted_at
    engine_ttft = engine_tpot = None
    if engine_first_token_at is not None:
        engine_start = engine_queued_at if engine_queued_at is not None else engine_scheduled_at
        if engine_start is not None:
            engine_ttft = engine_first_token_at - engine_start
        if engine_last_token_at is not None and completion_tokens > 1:
            engine_tpot = (engine_last_token_at - engine_first_token_at) / (completion_tokens - 1)
    wall_now = time.time() - (time.perf_counter() - t0)
    return RequestRecord(
        request_id=request_id,
        model=model,
        backend=backend,
        stream=stream,
        status=status,
        finish_reason=finish_reason,
        started_at=round(wall_now, 6),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        time_to_first_token_ms=_ms(ttft),
        e2e_ms=_ms(e2e),
        tpot_ms=_ms(tpot),
        mean_itl_ms=_ms(mean_itl),
        p50_itl_ms=_ms(p50_itl),
        max_itl_ms=_ms(max_itl),
        queue_time_ms=_ms(None if started is None else max(0.0, started - t0)),
        handler_start_ms=round((timer.handler_at - t0) * 1000, 3),
        generation_time_ms=_ms(
            None
            if timer.first_at is None or timer.last_at is None
            else timer.last_at - timer.first_at
        ),
        tokens_per_second=(
            round(completion_tokens / e2e, 3) if e2e and completion_tokens else None
        ),
        engine_ttft_ms=_ms(engine_ttft),
        engine_tpot_ms=_ms(engine_tpot),
        admission_ms=_ms(None if timer.admitted_at is None else timer.admitted_at - t0),
        **(extra or {}),
    )


SUMMARY_FIELDS = (
    "time_to_first_token_ms",
    "tpot_ms",
    "mean_itl_ms",
    "e2e_ms",
    "queue_time_ms",
    "tokens_per_second",
    "engine_ttft_ms",
    "engine_tpot_ms",
)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class _CountedSend:
    """An ASGI `send` that counts response status codes.

    Returned as a bound method whose `__self__` carries the server's `transport`, as uvicorn's
    own `send` does: the stall watch (service.context) finds the transport that way.
    """

    __slots__ = ("_inner", "_responses", "transport")

    def __init__(self, inner: Callable[[Any], Awaitable[None]], responses: Counter) -> None:
        self._inner = inner
        self._responses = responses
        self.transport = getattr(getattr(inner, "__self__", None), "transport", None)

    async def send(self, message: Any) -> None:
        """Count a response start, then send."""
        if message["type"] == "http.response.start":
            self._responses.labels(str(message["status"])).inc()
        await self._inner(message)


class TelemetryManager:
    """Keeps the last N request records, summarises them, and feeds Prometheus."""

    def __init__(self, registry: CollectorRegistry, *, max_records: int = 1000) -> None:
        self.registry = registry
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._lifecycle: deque[dict[str, Any]] = deque(maxlen=100)
        self._series: dict[tuple[str, str], _Series] = {}
        labels = ("model", "backend")
        self.requests = Counter(
            "iw_requests", "Finished chat requests.", (*labels, "status", "finish_reason"),
            registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "iw_prompt_tokens", "Prompt tokens processed.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "iw_generation_tokens", "Tokens generated.", labels, registry=registry
        )
        self.in_flight = Gauge(
            "iw_requests_in_flight", "Data-plane requests running now.", registry=registry
        )

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=registry)

        self.ttft = hist("iw_time_to_first_token_seconds", "Time to first token (from t0).")
        self.tpot = hist(
            "iw_time_per_output_token_seconds", "Mean time per output token after the first."
        )
        self.itl = hist("iw_inter_token_latency_seconds", "Gaps between token-bearing frames.")
        self.e2e = hist("iw_e2e_request_latency_seconds", "t0 to the last token-bearing frame.")
        self.queue = hist("iw_request_queue_time_seconds", "t0 to the engine starting the request.")
        self.engine_ttft = hist("iw_engine_time_to_first_token_seconds", "Engine-reported TTFT.")
        self.load_seconds = Gauge(
            "iw_model_load_seconds", "Last load's time by phase.", ("phase",), registry=registry
        )
        self.load_rss_delta = Gauge(
            "iw_model_load_rss_delta_bytes", "RSS the last load added.", registry=registry
        )
        self.load_device_delta = Gauge(
            "iw_model_load_device_memory_delta_bytes", "Device memory the last load added.",
            registry=registry,
        )  # fmt: skip
        self.unload_not_returned = Gauge(
            "iw_unload_memory_not_returned_bytes",
            "Memory above the backend's first baseline (after its first unload), last unload.",
            registry=registry,
        )
        self.unload_returned = Gauge(
            "iw_unload_memory_returned",
            "1 if the last unload left memory within tolerance of the backend's first baseline.",
            registry=registry,
        )
        self.hook_error_count = Counter(
            "iw_hook_errors", "Hook failures (the request got 500 hook_failed, or an "
            "after_response hook failed).", ("hook",), registry=registry,
        )  # fmt: skip
        self.hook_budget_count = Counter(
            "iw_hook_budget_exceeded", "Hook calls slower than their budget_ms.", ("hook",),
            registry=registry,
        )  # fmt: skip
        self.hook_drop_count = Counter(
            "iw_hook_dropped", "Exchanges an after_response hook never saw (queue full).",
            ("hook",), registry=registry,
        )  # fmt: skip
        self.request_tags = Counter(
            "iw_request_tags", "Finished requests by hook-set tag (header_tags).",
            ("tag", "value"), registry=registry,
        )  # fmt: skip
        self._tag_pairs: set[tuple[str, str]] = set()
        self.completion_hist = Histogram(
            "iw_request_generation_tokens", "Completion tokens per request.", labels,
            buckets=TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.vllm = VllmCompatMetrics()
        #: set by the app when OpenTelemetry tracing is on (service.tracing)
        self.tracer: RequestTracer | None = None
        self.http_responses = Counter(
            "iw_http_responses",
            "HTTP responses by status code (every route, errors included).",
            ("code",),
            registry=registry,
        )

    def counting(self, send: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        """Wrap an ASGI `send` so that each response's status code is counted once."""
        return _CountedSend(send, self.http_responses).send

    def record(self, rec: RequestRecord, itl_gaps: Sequence[float] = ()) -> None:
        """Store a finished request and update the Prometheus series.

        Once per request, never per token: the ITL gaps go into their histogram in one fold
        (`observe_many`), because observing 63 gaps one by one cost ~190 µs a request, more
        than the rest of the request's serving (bench/overhead.py).
        """
        self._records.append(rec)
        key = (rec.model, rec.backend)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(key)
        of = series.of
        series.with_label(self.requests, rec.status, rec.finish_reason or "none").inc()
        of(self.prompt_tokens).inc(rec.prompt_tokens)
        of(self.generation_tokens).inc(rec.completion_tokens)
        of(self.completion_hist).observe(rec.completion_tokens)
        for hist, value in (
            (self.ttft, rec.time_to_first_token_ms),
            (self.tpot, rec.tpot_ms),
            (self.e2e, rec.e2e_ms),
            (self.queue, rec.queue_time_ms),
            (self.engine_ttft, rec.engine_ttft_ms),
        ):
            if value is not None:
                of(hist).observe(value / 1000)
        itl = of(self.itl)  # exported even before any gap, as before
        if itl_gaps:
            observe_many(itl, itl_gaps)
        for pair in rec.tags.items():
            # hooks bound their own values; this bounds the series whatever a hook does
            if pair not in self._tag_pairs:
                if len(self._tag_pairs) >= MAX_TAG_SERIES:
                    pair = (pair[0], "other")  # noqa: PLW2901
                else:
                    self._tag_pairs.add(pair)
            self.request_tags.labels(*pair).inc()
        if not vllm_exports_itself():
            self.vllm.record(rec, itl_gaps)
        if self.tracer is not None:
            self.tracer.on_record(rec)

    # the service's HookObserver: failures, overruns and drops per hook (names from adapters.yaml)
    def hook_error(self, hook: str) -> None:
        """A hook failed."""
        self.hook_error_count.labels(hook).inc()

    def hook_over_budget(self, hook: str) -> None:
        """A hook call took longer than its budget."""
        self.hook_budget_count.labels(hook).inc()

    def hook_dropped(self, hook: str) -> None:
        """An exchange was not handed to an after_response hook."""
        self.hook_drop_count.labels(hook).inc()

    def bind_gauges(self, manager: Any, admission: Any) -> None:
        """Gauges read at scrape time from the manager and admission control."""
        self.in_flight.set_function(lambda: manager.in_flight)
        running = Gauge(
            "iw_requests_running", "Generations holding a slot.", registry=self.registry
        )
        running.set_function(lambda: admission.running)
        queued = Gauge("iw_requests_queued", "Requests waiting for a slot.", registry=self.registry)
        queued.set_function(lambda: admission.queued)
        state = Gauge(
            "iw_model_state",
            "1 for the current lifecycle state.",
            ("state",),
            registry=self.registry,
        )

        def is_state(name: str) -> Callable[[], float]:
            return lambda: 1.0 if manager.state.value == name else 0.0

        for name in ("empty", "loading", "ready", "unloading"):
            state.labels(name).set_function(is_state(name))

        def served_name() -> str | None:
            current = manager.current
            return current.plan.served_model_name if current is not None else None

        self.vllm.bind(served_name, admission)

    def record_lifecycle(self, event: dict[str, Any]) -> None:
        """Remember a load/unload report for `GET /v1/telemetry` and export its figures."""
        self._lifecycle.append(event)
        if event.get("event") == "load":
            timings = event["timings"]
            for phase in ("import_s", "init_s", "warmup_s", "total_s"):
                self.load_seconds.labels(phase.removesuffix("_s")).set(timings[phase])
            memory = event["memory"]
            self.load_rss_delta.set(memory["rss_delta_mib"] * 1024 * 1024)
            if memory.get("device_delta_mib") is not None:
                self.load_device_delta.set(memory["device_delta_mib"] * 1024 * 1024)
        elif (
            event.get("event") == "unload" and event.get("memory_vs_first_baseline_mib") is not None
        ):
            self.unload_not_returned.set(event["memory_vs_first_baseline_mib"] * 1024 * 1024)
            if event.get("memory_returned") is not None:
                self.unload_returned.set(1 if event["memory_returned"] else 0)

    def recent(self, limit: int = 50) -> list[RequestRecord]:
        """The last `limit` records, newest last."""
        records = list(self._records)
        return records[-limit:] if limit else []

    def summary(self, window_s: float | None = None) -> dict[str, Any]:
        """p50/p90/p99 (and mean, count) per metric, per model, over the window."""
        cutoff = time.time() - window_s if window_s else None
        by_model: dict[str, list[RequestRecord]] = {}
        for rec in self._records:
            if cutoff is None or rec.started_at >= cutoff:
                by_model.setdefault(rec.model, []).append(rec)
        out: dict[str, Any] = {}
        for model, recs in by_model.items():
            stats: dict[str, Any] = {"requests": len(recs)}
            for name in SUMMARY_FIELDS:
                values = sorted(v for r in recs if (v := getattr(r, name)) is not None)
                if values:
                    stats[name] = {
                        "count": len(values),
                        "mean": round(statistics.fmean(values), 3),
                        "p50": round(percentile(values, 0.5), 3),
                        "p90": round(percentile(values, 0.9), 3),
                        "p99": round(percentile(values, 0.99), 3),
                    }
            out[model] = stats
        return out

    @property
    def lifecycle(self) -> list[dict[str, Any]]:
        """Recent load/unload reports."""
        return list(self._lifecycle)


class _Series:
    """The labelled children of one (model, backend), each looked up once, when first used.

    A child is made on first use only: making one exports its series (at zero), and a series
    such as the engine's TTFT must stay absent for engines that never report it.
    """

    __slots__ = ("_children", "_extra", "_key")

    def __init__(self, key: tuple[str, str]) -> None:
        self._key = key
        self._children: dict[int, Any] = {}
        self._extra: dict[tuple[int | str, ...], Any] = {}

    def of(self, metric: Any) -> Any:
        """`metric.labels(model, backend)`, cached."""
        child = self._children.get(id(metric))
        if child is None:
            child = self._children[id(metric)] = metric.labels(*self._key)
        return child

    def with_label(self, metric: Any, *values: str) -> Any:
        """`metric.labels(model, backend, *values)`, cached (values are bounded enums)."""
        key: tuple[int | str, ...] = (id(metric), *values)
        child = self._extra.get(key)
        if child is None:
            child = self._extra[key] = metric.labels(*self._key, *values)
        return child


def observe_many(hist: Histogram, values: Iterable[float]) -> None:
    """`hist.observe(v)` for every value, folded: one increment per bucket touched.

    The values are sorted once and cut at the bucket bounds (a bisection per bucket touched,
    usually two or three, instead of one per value). Reads prometheus_client's histogram
    internals (`_upper_bounds`, `_buckets`, `_sum`, stable since 0.4); where they are missing it
    falls back to observing one by one.
    """
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            hist.observe(value)
        return
    seq = values if isinstance(values, list | tuple) else list(values)
    if not seq:
        return
    ordered = sorted(seq)
    n = len(ordered)
    # summed in the order given, as observing one by one would add them
    total.inc(sum(seq, 0.0))
    lo = 0
    for index, bound in enumerate(bounds):
        # observe() counts a value in the first bucket whose bound is >= it (the last is +Inf)
        hi = bisect.bisect_right(ordered, bound, lo)
        if hi > lo:
            buckets[index].inc(hi - lo)
            lo = hi
            if lo == n:
                break


class MemoryMark:
    """Memory at the start of a request."""

    __slots__ = ("alone", "snapshot", "started")

    def __init__(self, snapshot: MemorySnapshot, alone: bool, started: float) -> None:
        self.snapshot = snapshot
        self.alone = alone
        self.started = started


class RequestMemoryMeter:
    """Per-request memory figures, each labelled with the method that produced it.

    - In-process CUDA engines (torch allocator is up): VRAM delta from the allocator; the peak
      from `max_memory_allocated`, reset at the start of a request only when it runs alone (a
      shared peak would be someone else's).
    - Engines in their own processes, on GPU: NVML device memory (all processes) at start and end,
      and the maximum the watchdog saw during the request, plus the engine's KV-cache usage.
    - Always: RSS delta of our process tree (engine processes included).

    Two snapshots per request, on the event loop, so they must be cheap: RSS is read from the
    process objects the watchdog keeps (refreshed every sample in its thread), one
    `/proc/<pid>/statm` read each. Finding the tree afresh scans every `/proc/*/stat` of the
    machine; done twice per request it blocked the loop long enough to cost 17 % of throughput at
    16 concurrent streams against `vllm serve` (bench/vs_vllm_serve.py).
    """

    def __init__(self, probe: Any, watchdog: Any | None) -> None:
        self.probe = probe
        self.watchdog = watchdog

    def _snapshot(self, pids: Sequence[int]) -> MemorySnapshot:
        procs = self.watchdog.tree_procs() if self.watchdog is not None else None
        if procs and set(pids) <= {p.pid for p in procs}:
            snap: MemorySnapshot = self.probe.snapshot(pids, procs)
        else:
            # no sample yet since the engine started: the slow, fresh way this once
            snap = self.probe.snapshot(pids)
        return snap

    def start(self, pids: Sequence[int], alone: bool) -> MemoryMark:
        """Snapshot at admission (resetting the torch peak if the request runs alone)."""
        if alone:
            torch_reset_peak()
        return MemoryMark(self._snapshot(pids), alone, time.perf_counter())

    def finish(
        self, mark: MemoryMark, pids: Sequence[int], kv_usage: float | None
    ) -> dict[str, Any]:
        """Fields for the request record."""
        end = self._snapshot(pids)
        start = mark.snapshot
        out: dict[str, Any] = {"rss_delta_mib": round(end.rss_mib - start.rss_mib, 1)}
        methods = ["rss: psutil process tree"]
        torch_now = torch_allocator()
        if torch_now is not None and start.torch_allocated_mib is not None:
            out["vram_delta_mib"] = round(torch_now[0] - start.torch_allocated_mib, 1)
            if mark.alone:
                out["peak_vram_mib"] = round(torch_now[1], 1)
                methods.append("vram: torch allocator, peak over this request (ran alone)")
            else:
                methods.append("vram: torch allocator delta (concurrent requests: no peak)")
        elif end.device_used_mib is not None and start.device_used_mib is not None:
            out["vram_delta_mib"] = round(end.device_used_mib - start.device_used_mib, 1)
            methods.append("vram: NVML device memory, all processes")
        if self.watchdog is not None:
            win = self.watchdog.window(mark.started, time.perf_counter())
            out["gpu_util_mean"] = win.gpu_util_mean
            out["device_memory_max_mib"] = win.device_memory_max_mib
            out["cpu_percent_mean"] = win.cpu_percent_mean
            if "peak_vram_mib" not in out and win.device_memory_max_mib is not None:
                out["peak_vram_mib"] = win.device_memory_max_mib
                methods.append("peak: NVML max over watchdog samples in the request window")
        if kv_usage is not None:
            out["kv_cache_usage"] = round(kv_usage, 4)
            methods.append("kv: engine-reported KV-cache usage at the end")
        out["memory_method"] = "; ".join(methods)
        return out
