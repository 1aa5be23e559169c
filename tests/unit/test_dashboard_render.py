"""bench/dashboard.py: it evaluates every query the Grafana dashboard has, and evaluates it right.

The PNG in deploy/grafana/ is drawn by it; a panel it could not read must stop it, not come out
empty, so every panel type, query, unit and override of the dashboard is parsed here, and every
query is evaluated over scrapes of the app's own /metrics (in-process client, echo backend).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from bench.dashboard import (
    DASHBOARD,
    Aggregate,
    Arith,
    Quantile,
    Rate,
    Scrapes,
    Selector,
    UnsupportedError,
    bucket_quantile,
    check,
    draw,
    evaluate,
    panels,
    parse,
)
from helpers import ADMIN, API, chat_body, load


def dashboard() -> dict[str, Any]:
    """The shipped dashboard."""
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_every_panel_and_query_of_the_dashboard_is_understood() -> None:
    """check() raises on anything unknown; it returns one tree per query of every panel."""
    board = dashboard()
    nodes = check(board)
    targets = [t for p in panels(board) for t in p.get("targets", [])]
    assert len(nodes) == len(targets) > 20


def test_the_parser_reads_the_dashboard_forms() -> None:
    """Selectors, rate, aggregations with `by`, histogram_quantile, scalar arithmetic."""
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(iw_ttft_bucket"
        '{model=~"$model"}[$__rate_interval])))'
    )
    assert parse(expr, rate_s=20) == Quantile(
        0.9,
        Aggregate("sum", ("le",), Rate(Selector("iw_ttft_bucket", (("model", "=~", ".*"),)), 20.0)),
    )
    assert parse("iw_watchdog_cpu_fraction * 100") == Arith(
        "*", Selector("iw_watchdog_cpu_fraction"), 100.0
    )
    assert parse("max(iw_model_state) by (state)") == Aggregate(
        "max", ("state",), Selector("iw_model_state")
    )


@pytest.mark.parametrize(
    "expr",
    [
        "increase(iw_requests_total[5m])",
        "iw_requests_total offset 5m",
        "iw_a / iw_b",
        "topk(3, iw_requests_total)",
        "sum without (le) (iw_requests_total)",
        "iw_requests_total[5m]",
        'iw_requests_total{code>"4"}',
        "rate(iw_requests_total[5 minutes])",
    ],
)
def test_anything_outside_the_subset_is_refused(expr: str) -> None:
    """A query it cannot evaluate is an error, never an empty panel."""
    with pytest.raises(UnsupportedError):
        parse(expr)


def test_an_unknown_panel_type_unit_or_override_is_refused() -> None:
    """A new kind of panel cannot be skipped silently either."""
    changes: tuple[Callable[[dict[str, Any]], None], ...] = (
        lambda p: p.update(type="heatmap"),
        lambda p: p["fieldConfig"]["defaults"].update(unit="decbytes"),
        lambda p: p["fieldConfig"]["overrides"].append(
            {"matcher": {"id": "byName", "options": "p50"}, "properties": [{"id": "color"}]}
        ),
        lambda p: p.update(targets=[]),
    )
    for change in changes:
        board = dashboard()
        panel = next(p for p in board["panels"] if p["type"] == "timeseries")
        change(panel)
        with pytest.raises(UnsupportedError):
            check(board)


def test_histogram_quantile_follows_prometheus() -> None:
    """Linear within a bucket; +Inf answers the highest finite bound; no observations: NaN."""
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (math.inf, 40.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.1 * 10 / 10)
    assert bucket_quantile(0.99, [(0.1, 1.0), (math.inf, 5.0)]) == 0.1
    assert math.isnan(bucket_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert math.isnan(bucket_quantile(0.5, [(0.1, 3.0)]))  # no +Inf bucket


def exposition(total: float, le_counts: dict[str, float]) -> str:
    """A counter and a histogram in the text format."""
    lines = [
        "# TYPE iw_requests counter",
        f'iw_requests_total{{status="ok"}} {total}',
        "# TYPE iw_t histogram",
    ]
    lines += [f'iw_t_bucket{{le="{le}"}} {n}' for le, n in le_counts.items()]
    lines += [f"iw_t_count {le_counts['+Inf']}", "iw_t_sum 1.0"]
    return "\n".join(lines) + "\n"


def test_rate_counts_resets_and_quantile_reads_the_rate_of_buckets() -> None:
    """A rate is the increase over the time between the samples in the window, a reset counted."""
    scrapes = Scrapes()
    scrapes.add(0.0, exposition(10, {"0.1": 0, "1.0": 0, "+Inf": 0}))
    scrapes.add(10.0, exposition(30, {"0.1": 4, "1.0": 8, "+Inf": 8}))
    scrapes.add(20.0, exposition(5, {"0.1": 8, "1.0": 16, "+Inf": 16}))  # counter reset to 0
    rate = parse("sum by (status) (rate(iw_requests_total[25s]))")
    [(labels, value)] = evaluate(rate, scrapes, 2)
    assert labels == {"status": "ok"}
    assert value == pytest.approx((20 + 5) / 20)
    assert evaluate(parse("rate(iw_requests_total[15s])"), scrapes, 0) == []  # one sample
    p50 = parse("histogram_quantile(0.5, sum by (le) (rate(iw_t_bucket[25s])))")
    # 16 observations in 20 s, 8 of them under 0.1: the median is the first bucket's top
    [(labels, value)] = evaluate(p50, scrapes, 2)
    assert labels == {}
    assert value == pytest.approx(0.1)


def scrape(client: TestClient[Litestar]) -> str:
    """GET /metrics with a key."""
    r = client.get("/metrics", headers=ADMIN)
    assert r.status_code == 200
    return r.text


def test_every_query_evaluates_over_the_apps_own_metrics(
    client: TestClient[Litestar], tmp_path: Path
) -> None:
    """Over real scrapes of the app, each query but NVML's (no GPU here) gives a series."""
    load(client, preset="echo")
    scrapes = Scrapes()
    for t in (0.0, 10.0):
        for _ in range(3):
            r = client.post("/v1/chat/completions", json=chat_body("one two three"), headers=API)
            assert r.status_code == 200
        assert client.get("/v1/nope", headers=API).status_code == 404
        scrapes.add(t, scrape(client))
    assert client.post("/v1/model/unload", headers=ADMIN).status_code == 200
    scrapes.add(20.0, scrape(client))
    board = dashboard()
    targets = [t for p in panels(board) for t in p.get("targets", [])]
    empty = [t["expr"] for t in targets if not evaluate(parse(t["expr"], rate_s=25), scrapes, 2)]
    # NVML's series exist only where a GPU is seen
    assert all(expr.startswith("iw_gpu_") for expr in empty), empty
    drawn = draw(board, scrapes, tmp_path / "board.png", 25, "test")
    assert (tmp_path / "board.png").stat().st_size > 10_000
    timeseries = [p["title"] for p in panels(board) if p["type"] != "row"]
    assert sorted(drawn) == sorted(timeseries)
