"""Per-request metric math against DESIGN.md's definitions, percentiles, and the exports."""

from __future__ import annotations

import time
from typing import Any

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry import (
    LATENCY_BUCKETS,
    SUMMARY_FIELDS,
    RequestRecord,
    RequestTimer,
    TelemetryManager,
    build_record,
    observe_many,
    percentile,
)

# perf_counter values that are exact in binary, so the expected figures are exact too
T0 = 1.0


def timer(
    *,
    handler_at: float = 1.0625,
    admitted_at: float | None = 1.125,
    frames: tuple[float, ...] = (1.25, 1.5, 2.0),
) -> RequestTimer:
    """A timer whose token-bearing frames were handed over at `frames`."""
    t = RequestTimer(T0, handler_at)
    t.admitted_at = admitted_at
    t.stamps = list(frames)
    return t


def record(t: RequestTimer, completion_tokens: int = 4, **kwargs: Any) -> RequestRecord:
    """build_record with fixed labels."""
    values: dict[str, Any] = {
        "request_id": "r1",
        "model": "m",
        "backend": "echo",
        "stream": True,
        "status": "ok",
        "finish_reason": "stop",
        "prompt_tokens": 7,
        "completion_tokens": completion_tokens,
    }
    values.update(kwargs)
    return build_record(t, **values)


def test_wrapper_metrics_follow_the_definitions() -> None:
    """TTFT, E2E, TPOT, ITL, queue, handler start, generation time and tokens/s, exactly."""
    rec = record(timer(), completion_tokens=4)
    assert rec.time_to_first_token_ms == 250.0  # t0 → first token-bearing frame
    assert rec.e2e_ms == 1000.0  # t0 → last token-bearing frame
    assert rec.tpot_ms == 250.0  # (1000 - 250) / (4 - 1)
    assert rec.mean_itl_ms == 375.0  # gaps 250 and 500
    assert rec.p50_itl_ms == 375.0
    assert rec.max_itl_ms == 500.0
    assert rec.queue_time_ms == 125.0  # t0 → admission (no engine timestamp)
    assert rec.handler_start_ms == 62.5
    assert rec.generation_time_ms == 750.0  # first → last frame
    assert rec.tokens_per_second == 4.0  # 4 tokens / 1 s
    assert rec.engine_ttft_ms is None
    assert rec.engine_tpot_ms is None


def test_tpot_is_null_for_one_token_or_none() -> None:
    """TPOT needs at least two tokens; without frames TTFT, E2E and ITL are null too."""
    assert record(timer(frames=(1.25,)), completion_tokens=1).tpot_ms is None
    assert record(timer(), completion_tokens=0).tpot_ms is None
    empty = record(timer(frames=()), completion_tokens=0)
    assert empty.time_to_first_token_ms is None
    assert empty.e2e_ms is None
    assert empty.mean_itl_ms is None
    assert empty.max_itl_ms is None
    assert empty.generation_time_ms is None
    assert empty.tokens_per_second is None
    assert empty.queue_time_ms == 125.0


def test_engine_scheduling_time_is_the_queue_end_when_known() -> None:
    """Queue time runs to the engine's own start when it reports one, else to admission."""
    rec = record(timer(), engine_scheduled_at=1.5)
    assert rec.queue_time_ms == 500.0
    assert record(timer(admitted_at=None)).queue_time_ms is None
    # an engine clock slightly behind ours never gives a negative queue time
    assert record(timer(), engine_scheduled_at=0.5).queue_time_ms == 0.0


def test_engine_side_ttft_and_tpot() -> None:
    """Engine TTFT runs from the engine's queue (or schedule) time; engine TPOT as TPOT."""
    rec = record(
        timer(),
        completion_tokens=5,
        engine_queued_at=1.125,
        engine_scheduled_at=1.25,
        engine_first_token_at=1.375,
        engine_last_token_at=1.875,
    )
    assert rec.engine_ttft_ms == 250.0
    assert rec.engine_tpot_ms == 125.0
    scheduled_only = record(timer(), engine_scheduled_at=1.25, engine_first_token_at=1.375)
    assert scheduled_only.engine_ttft_ms == 125.0


def test_metrics_object_holds_numbers_not_labels() -> None:
    """The response's metrics object leaves out ids and labels."""
    metrics = record(timer()).metrics()
    for key in ("request_id", "model", "backend", "stream", "status", "started_at"):
        assert key not in metrics
    assert metrics["completion_tokens"] == 4
    assert metrics["time_to_first_token_ms"] == 250.0


def test_started_at_is_the_wall_time_of_t0() -> None:
    """started_at converts t0 to Unix time using the current offset between the clocks."""
    now = time.perf_counter()
    t = RequestTimer(now - 2.0, now - 2.0)
    before = time.time()
    rec = record(t)
    assert before - 2.5 < rec.started_at < time.time() - 1.5


def test_timer_frames_record_first_last_and_gaps() -> None:
    """Each frame() call moves `last_at`; gaps add up to the first→last span."""
    t = RequestTimer(time.perf_counter(), time.perf_counter())
    for _ in range(4):
        t.frame()
    assert t.frames == 4
    assert len(t.gaps) == 3
    assert t.first_at is not None
    assert t.last_at is not None
    assert all(g >= 0 for g in t.gaps)
    assert sum(t.gaps) == pytest.approx(t.last_at - t.first_at)


# --- percentiles and summaries -------------------------------------------------------------------

_VALUES = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(values=_VALUES, q=st.floats(min_value=0.0, max_value=1.0))
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    """percentile() equals numpy's default (linear) quantile for any data and q."""
    ordered = sorted(values)
    expected = float(np.quantile(np.array(ordered), q))
    assert percentile(ordered, q) == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_percentile_fixed_points() -> None:
    """Known values: the median of 1..4 is 2.5, p90 of 1..11 is 10, a single value is itself."""
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([float(i) for i in range(1, 12)], 0.9) == 10.0
    assert percentile([7.0], 0.99) == 7.0


def with_ttft(model: str, ttft_ms: float, started_at: float | None = None) -> RequestRecord:
    """A record of `model` whose TTFT is `ttft_ms`."""
    rec = record(timer(), model=model)
    changes: dict[str, Any] = {"time_to_first_token_ms": ttft_ms}
    if started_at is not None:
        changes["started_at"] = started_at
    return attrs.evolve(rec, **changes)


def test_summary_percentiles_per_model() -> None:
    """Summary gives count, mean, p50/p90/p99 per metric per model, like numpy."""
    manager = TelemetryManager(CollectorRegistry())
    ttfts = [float(v) for v in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10)]
    for v in ttfts:
        manager.record(with_ttft("a", v))
    manager.record(with_ttft("b", 42.0))
    summary = manager.summary()
    assert set(summary) == {"a", "b"}
    stats = summary["a"]["time_to_first_token_ms"]
    assert summary["a"]["requests"] == 10
    assert stats["count"] == 10
    assert stats["mean"] == 5.5
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert stats[name] == round(float(np.quantile(ttfts, q)), 3)
    assert summary["b"]["time_to_first_token_ms"]["p99"] == 42.0
    assert "engine_ttft_ms" not in summary["a"]  # all null: no entry
    assert set(summary["a"]) - {"requests"} <= set(SUMMARY_FIELDS)


def test_summary_window_keeps_only_recent_records() -> None:
    """window_s drops records that started before the window."""
    manager = TelemetryManager(CollectorRegistry())
    manager.record(with_ttft("a", 1.0, started_at=time.time() - 3600))
    manager.record(with_ttft("a", 3.0, started_at=time.time()))
    assert manager.summary(window_s=60)["a"]["time_to_first_token_ms"]["count"] == 1
    assert manager.summary()["a"]["time_to_first_token_ms"]["count"] == 2


def test_recent_records_are_bounded_and_ordered() -> None:
    """Only the last max_records are kept; recent(limit) returns the newest last."""
    manager = TelemetryManager(CollectorRegistry(), max_records=3)
    for i in range(5):
        manager.record(attrs.evolve(record(timer()), request_id=f"r{i}"))
    assert [r.request_id for r in manager.recent()] == ["r2", "r3", "r4"]
    assert [r.request_id for r in manager.recent(2)] == ["r3", "r4"]
    assert manager.recent(0) == []


def test_lifecycle_events_are_kept_in_order() -> None:
    """Load/unload reports are returned oldest first, as recorded."""
    manager = TelemetryManager(CollectorRegistry())
    load = {
        "event": "load",
        "timings": {"import_s": 0.0, "init_s": 1.0, "warmup_s": 0.5, "total_s": 1.5},
        "memory": {"rss_delta_mib": 10.0, "device_delta_mib": None},
    }
    manager.record_lifecycle(load)
    manager.record_lifecycle({"event": "unload", "memory_vs_first_baseline_mib": None})
    assert [e["event"] for e in manager.lifecycle] == ["load", "unload"]
    assert manager.lifecycle[0] == load


# --- Prometheus ----------------------------------------------------------------------------------


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, parsed back, keyed by name and sorted labels."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_prometheus_exposition_parses_and_counts() -> None:
    """Counters, token totals and latency histograms (in seconds) come out as recorded."""
    registry = CollectorRegistry()
    manager = TelemetryManager(registry)
    t = timer()
    manager.record(record(t, completion_tokens=4), t.gaps)
    manager.record(record(t, completion_tokens=4, status="error", finish_reason=None), t.gaps)
    got = samples(registry)
    labels = (("backend", "echo"), ("model", "m"))
    ok = (*labels[:1], ("finish_reason", "stop"), labels[1], ("status", "ok"))
    err = (*labels[:1], ("finish_reason", "none"), labels[1], ("status", "error"))
    assert got["iw_requests_total", ok] == 1.0
    assert got["iw_requests_total", err] == 1.0
    assert got["iw_prompt_tokens_total", labels] == 14.0
    assert got["iw_generation_tokens_total", labels] == 8.0
    assert got["iw_time_to_first_token_seconds_count", labels] == 2.0
    assert got["iw_time_to_first_token_seconds_sum", labels] == pytest.approx(0.5)
    assert got["iw_e2e_request_latency_seconds_sum", labels] == pytest.approx(2.0)
    assert got["iw_time_per_output_token_seconds_sum", labels] == pytest.approx(0.5)
    assert got["iw_request_queue_time_seconds_sum", labels] == pytest.approx(0.25)
    assert got["iw_inter_token_latency_seconds_count", labels] == 4.0
    assert got["iw_inter_token_latency_seconds_sum", labels] == pytest.approx(1.5)
    assert got["iw_request_generation_tokens_count", labels] == 2.0
    le_quarter = (*labels[:1], ("le", "0.3"), labels[1])
    assert got["iw_time_to_first_token_seconds_bucket", le_quarter] == 2.0
    assert ("iw_engine_time_to_first_token_seconds_count", labels) not in got


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0, max_value=1000, allow_nan=False),
            st.sampled_from([*LATENCY_BUCKETS, 0.0]),  # values on a bucket bound exactly
        ),
        max_size=80,
    )
)
def test_observe_many_equals_observing_one_by_one(values: list[float]) -> None:
    """The folded ITL observation leaves the histogram exactly as per-value observe() would."""
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("h", "d", buckets=LATENCY_BUCKETS, registry=one)
    h_many = Histogram("h", "d", buckets=LATENCY_BUCKETS, registry=many)
    for value in values:
        h_one.observe(value)
    observe_many(h_many, values)

    def exposed(registry: CollectorRegistry) -> list[bytes]:
        # `_created` is each histogram's own creation time
        return [ln for ln in generate_latest(registry).splitlines() if b"_created" not in ln]

    assert exposed(one) == exposed(many)
