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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from attrs import fields, frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.telemetry import MemorySnapshot
from service.gpu import torch_allocator, torch_reset_peak

#: seconds; fine below 10 ms for small models on fast GPUs, up to minutes for long generations
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


class RequestTimer:
    """Timestamps of one request (perf_counter seconds).

    Per token-bearing frame it keeps one timestamp (`frame()`: one clock read, one append);
    first, last, gaps and count are folded from them when asked, once, at the end.
    """

    __slots__ = ("admitted_at", "handler_at", "stamps", "t0")

    def __init__(self, t0: float, handler_at: float) -> None:
        self.t0 = t0
        self.handler_at = handler_at
        self.admitted_at: float | None = None
        self.stamps: list[float] = []

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
        """Inter-token latencies: the gaps between consecutive frames."""
        stamps = self.stamps
        return [b - a for a, b in itertools.pairwise(stamps)]


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

    def metrics(self) -> dict[str, Any]:
        """The response's `metrics` object (numbers only; ids and labels live elsewhere)."""
        # every field is a scalar: read them by name, in field order, instead of attrs' asdict
        return {name: getattr(self, name) for name in _METRIC_FIELDS}


_LABEL_FIELDS = ("request_id", "model", "backend", "stream", "status", "started_at")
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
        mean_itl_ms=_ms(statistics.fmean(gaps)) if gaps else None,
        p50_itl_ms=_ms(statistics.median(gaps)) if gaps else None,
        max_itl_ms=_ms(max(gaps)) if gaps else None,
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
            "Memory above the pre-load baseline after the last unload settled.",
            registry=registry,
        )
        self.unload_returned = Gauge(
            "iw_unload_memory_returned",
            "1 if the last unload returned memory to the pre-load baseline (within tolerance).",
            registry=registry,
        )
        self.completion_hist = Histogram(
            "iw_request_generation_tokens", "Completion tokens per request.", labels,
            buckets=TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip

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
        self.requests.labels(*key, rec.status, rec.finish_reason or "none").inc()
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
        elif event.get("event") == "unload" and event.get("memory_not_returned_mib") is not None:
            self.unload_not_returned.set(event["memory_not_returned_mib"] * 1024 * 1024)
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

    __slots__ = ("_children", "_key")

    def __init__(self, key: tuple[str, str]) -> None:
        self._key = key
        self._children: dict[int, Any] = {}

    def of(self, metric: Any) -> Any:
        """`metric.labels(model, backend)`, cached."""
        child = self._children.get(id(metric))
        if child is None:
            child = self._children[id(metric)] = metric.labels(*self._key)
        return child


def observe_many(hist: Histogram, values: Iterable[float]) -> None:
    """`hist.observe(v)` for every value, folded: one increment per bucket touched.

    Reads prometheus_client's histogram internals (`_upper_bounds`, `_buckets`, `_sum`, stable
    since 0.4); where they are missing it falls back to observing one by one.
    """
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            hist.observe(value)
        return
    counts: dict[int, int] = {}
    added = 0.0
    for value in values:
        # the first bound >= value, as observe() picks it (the last bound is +Inf)
        index = bisect.bisect_left(bounds, value)
        counts[index] = counts.get(index, 0) + 1
        added += value
    if not counts:
        return
    total.inc(added)
    for index, count in counts.items():
        buckets[index].inc(count)


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
