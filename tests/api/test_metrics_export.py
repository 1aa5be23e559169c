"""/metrics as scrapers and dashboards read it: one content type, the series dashboards query."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import REGISTRY, Gauge
from prometheus_client.parser import text_string_to_metric_families

from helpers import ADMIN, API, ROOT, LiveServer, chat_body, load


def test_metrics_content_type_has_one_charset(client: TestClient[Litestar]) -> None:
    """The exposition's content type names its charset once (strict scrapers reject two)."""
    r = client.get("/metrics", headers=ADMIN)
    assert r.status_code == 200
    content_type = r.headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert content_type.lower().count("charset") == 1


def vllm_constants() -> dict[str, Any]:
    """The bucket constants of vLLM, read from its source (importing vLLM takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None
    assert spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "buckets.py"
    out: dict[str, Any] = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            with contextlib.suppress(ValueError):
                out[node.target.id] = ast.literal_eval(node.value) if node.value else None
    return out


def families(text: str) -> dict[str, Any]:
    """Metric families of an exposition, by name."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def scrape(client: TestClient[Litestar]) -> str:
    """GET /metrics with a key."""
    r = client.get("/metrics", headers=ADMIN)
    assert r.status_code == 200
    return r.text


def test_every_backend_exports_vllm_named_series(client: TestClient[Litestar]) -> None:
    """Echo requests appear under vLLM's names, labels and buckets, next to the iw_* series."""
    load(client, preset="echo")
    for _ in range(3):
        r = client.post("/v1/chat/completions", json=chat_body("one two three"), headers=API)
        assert r.status_code == 200
    found = families(scrape(client))
    constants = vllm_constants()
    itl = constants["INTER_TOKEN_LATENCY_BUCKETS"]
    for name, buckets, observed in (
        ("vllm:time_to_first_token_seconds", constants["TIME_TO_FIRST_TOKEN_BUCKETS"], 3),
        ("vllm:e2e_request_latency_seconds", constants["REQUEST_LATENCY_BUCKETS"], 3),
        ("vllm:request_queue_time_seconds", constants["REQUEST_LATENCY_BUCKETS"], 3),
        ("vllm:request_time_per_output_token_seconds", itl, 3),
        # two gaps between three tokens, per request
        ("vllm:inter_token_latency_seconds", itl, 6),
    ):
        family = found[name]
        assert family.type == "histogram"
        count = [s for s in family.samples if s.name == f"{name}_count"]
        assert count[0].labels == {"model_name": "echo", "engine": "0"}
        assert count[0].value == observed
        les = [float(s.labels["le"]) for s in family.samples if s.name == f"{name}_bucket"]
        assert les[:-1] == [float(b) for b in buckets]
    prompt = found["vllm:prompt_tokens"]
    assert prompt.type == "counter"
    ours = [s.value for s in found["iw_prompt_tokens"].samples if s.name.endswith("_total")]
    assert [s.value for s in prompt.samples if s.name == "vllm:prompt_tokens_total"] == ours
    assert ours[0] > 0
    generated = found["vllm:generation_tokens"].samples
    assert [s.value for s in generated if s.name == "vllm:generation_tokens_total"] == [9]
    running = found["vllm:num_requests_running"].samples
    assert running[0].labels == {"model_name": "echo", "engine": "0"}
    assert running[0].value == 0
    assert found["vllm:num_requests_waiting"].samples[0].value == 0
    assert "iw_time_to_first_token_seconds" in found


def test_vllm_named_series_step_aside_while_vllm_exports_its_own(
    client: TestClient[Litestar],
) -> None:
    """With vLLM's collectors registered, /metrics has one family per name and nothing twice."""
    load(client, preset="echo")
    own = Gauge("vllm:num_requests_running", "vLLM's own", ("model_name", "engine"))
    own.labels("echo", "0").set(7)
    try:
        r = client.post("/v1/chat/completions", json=chat_body("a b"), headers=API)
        assert r.status_code == 200
        text = scrape(client)
        assert text.count("# TYPE vllm:num_requests_running gauge") == 1
        assert 'vllm:num_requests_running{engine="0",model_name="echo"} 7.0' in text
        # ours are left out, and the request was not recorded into them
        assert "vllm:time_to_first_token_seconds" not in text
    finally:
        REGISTRY.unregister(own)
    found = families(scrape(client))
    assert "vllm:time_to_first_token_seconds" in found
    count = [
        s for s in found["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_count")
    ]
    assert count == []


DASHBOARD = ROOT / "deploy" / "grafana" / "inference-wrapper.json"
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels, strings and ranges removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _PROMQL_WORDS:
            continue  # a function or an operator keyword
        names.add(match.group())
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every query of every panel (rows' nested panels included)."""
    out: list[str] = []
    for panel in dashboard["panels"]:
        for inner in (panel, *panel.get("panels", [])):
            out.extend(t["expr"] for t in inner.get("targets", []))
    return out


def test_promql_parser_finds_names_and_only_names() -> None:
    """The name extraction the dashboard test relies on is right on a typical query."""
    expr = (
        "histogram_quantile(0.9, sum by (le, model) (rate(iw_e2e_request_latency_seconds_bucket"
        '{model=~"$model"}[$__rate_interval]))) / on (model) iw_requests_total * 100'
    )
    assert promql_metric_names(expr) == {
        "iw_e2e_request_latency_seconds_bucket",
        "iw_requests_total",
    }


def exported_names(text: str) -> set[str]:
    """Sample names and family names (with their sample suffixes) of an exposition."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
        }.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_every_dashboard_query_names_an_exported_metric(live: LiveServer) -> None:
    """Each metric a dashboard panel queries is on a live /metrics after echo traffic."""
    for _ in range(3):
        r = httpx.post(f"{live.url}/v1/chat/completions", json=chat_body(), headers=API)
        assert r.status_code == 200
    assert httpx.get(f"{live.url}/v1/nope", headers=API).status_code == 404
    unload = httpx.post(f"{live.url}/v1/model/unload", headers=ADMIN)
    assert unload.status_code == 200
    text = httpx.get(f"{live.url}/metrics", headers=ADMIN).text
    exported = exported_names(text)
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dashboard)))
    assert queried, "the dashboard queries nothing"
    assert queried - exported == set()
    # the three areas the dashboard is for are all there
    assert {"iw_model_state", "iw_process_cpu_percent", "iw_http_responses_total"} <= queried
