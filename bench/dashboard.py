"""The Grafana dashboard (deploy/grafana/inference-wrapper.json) drawn from real data, no Grafana.

No Grafana or Prometheus can be installed on the dev/CI machines (neither is on PyPI), so this
does what the two would do, on a small scale: it starts the wrapper, drives real traffic through it
(a load, three concurrency levels on SmolLM2 with transformers, errors of several kinds, an unload,
a swap to the echo backend at a higher concurrency, a last unload), scrapes `/metrics` every
`--scrape-s` seconds, then evaluates every panel's PromQL over those scrapes and draws the panels
with matplotlib, laid out by their `gridPos` like the dashboard's rows. The result is
`deploy/grafana/inference-wrapper.png`: a rendering of the dashboard's own queries over scraped
data, not a Grafana screenshot.

The PromQL it evaluates is the subset the dashboard uses, and nothing is skipped silently: an
expression, panel type, unit or field override it does not know stops the rendering with an
error (`tests/unit/test_dashboard_render.py` parses every query of the dashboard), so a new panel
cannot be drawn as if it were empty. Supported:

- a selector `name{label="v", label=~"re", label!="v", label!~"re"}` (instant: the value at the
  latest scrape);
- `rate(selector[range])`: the increase between the first and the last sample in the range
  (counter resets counted) over the time between them; Prometheus extrapolates both to the range's
  edges, which changes a rate little (its ratio stays the same) but leaves the first points of a
  series where Prometheus would already have one;
- `sum|max|min|avg|count [by (labels)] (expr)`;
- `histogram_quantile(q, expr)`: Prometheus' algorithm (linear within the bucket, the +Inf bucket
  answers the highest finite bound, buckets made monotonic first);
- `expr * number` (also `/ + -`).

Template variables: `$model` is "All" (`.*`); `$__rate_interval` is `--rate-s` (Grafana makes it
four scrape intervals at least; the default here is 15 s for 2.5 s scrapes, so that a few
requests per second give a readable rate on 2 cores).

    python -m bench.dashboard                          # serve, drive, scrape, render (~3 min)
    python -m bench.dashboard --render-only bench/results/dashboard-scrapes.json.gz

The scrapes are kept in `bench/results/dashboard-scrapes.json.gz` (not committed), so a change to
the dashboard or the renderer can be drawn again without another run.

Must never: leave the server behind (it runs in a process group of its own, stopped in
`finally`); talk to anything but 127.0.0.1; draw a query it did not evaluate.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gzip
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "inference-wrapper.json"
PNG = ROOT / "deploy" / "grafana" / "inference-wrapper.png"
SCRAPES = ROOT / "bench" / "results" / "dashboard-scrapes.json.gz"

ADMIN_KEY = "dashboard-admin-key-0001"
API_KEY = "dashboard-api-key-0001"


class UnsupportedError(ValueError):
    """A query, panel type, unit or override the renderer cannot draw faithfully."""


# --- PromQL: the subset the dashboard uses ------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """`name{matchers}`."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Rate:
    """`rate(selector[range])`."""

    selector: Selector
    range_s: float


@dataclass(frozen=True)
class Aggregate:
    """`op by (labels) (inner)`."""

    op: str
    by: tuple[str, ...] | None
    inner: Node


@dataclass(frozen=True)
class Quantile:
    """`histogram_quantile(q, inner)`."""

    q: float
    inner: Node


@dataclass(frozen=True)
class Arith:
    """`inner <op> number`."""

    op: str
    inner: Node
    number: float


Node = Selector | Rate | Aggregate | Quantile | Arith

AGGREGATIONS = ("sum", "max", "min", "avg", "count")
ARITH: dict[str, Callable[[float, float], float]] = {
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else math.nan,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
}
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<range>\[[^\]]*\])
    | (?P<op>=~|!~|!=|[-+*/(){},=])
    )""",
    re.VERBOSE,
)
_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def substitute(expr: str, rate_s: float) -> str:
    """The dashboard's template variables, as Grafana would fill them with `$model` = All."""
    expr = expr.replace("${model}", ".*").replace("$model", ".*")
    return expr.replace("$__rate_interval", f"{round(rate_s * 1000)}ms")


def _duration(text: str) -> float:
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UnsupportedError(f"range [{text}] is not a duration")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) tokens; anything outside the grammar raises."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    expr = expr.rstrip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            raise UnsupportedError(f"cannot read {expr[pos:]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = tokenize(expr)
        self.pos = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self, kind: str, text: str | None = None) -> str:
        got = self.peek()
        if got[0] != kind or (text is not None and got[1] != text):
            raise UnsupportedError(f"expected {text or kind}, found {got[1]!r} in {self.expr!r}")
        self.pos += 1
        return got[1]

    def parse(self) -> Node:
        node = self.expr_()
        if self.peek()[0] != "end":
            raise UnsupportedError(f"unexpected {self.peek()[1]!r} in {self.expr!r}")
        return node

    def expr_(self) -> Node:
        node = self.unary()
        while self.peek() in {("op", o) for o in ARITH}:
            op = self.take("op")
            node = Arith(op, node, float(self.take("num")))
        return node

    def labels(self) -> tuple[str, ...]:
        self.take("op", "(")
        names = [self.take("ident")]
        while self.peek() == ("op", ","):
            self.take("op", ",")
            names.append(self.take("ident"))
        self.take("op", ")")
        return tuple(names)

    def unary(self) -> Node:
        kind, word = self.peek()
        if kind == "op" and word == "(":
            self.take("op", "(")
            inner = self.expr_()
            self.take("op", ")")
            return inner
        word = self.take("ident")
        if word in AGGREGATIONS:
            by = None
            if self.peek() == ("ident", "by"):
                self.take("ident")
                by = self.labels()
            self.take("op", "(")
            inner = self.expr_()
            self.take("op", ")")
            if by is None and self.peek() == ("ident", "by"):
                self.take("ident")
                by = self.labels()
            if self.peek() in {("ident", "without"), ("ident", "by")}:
                raise UnsupportedError(f"grouping in {self.expr!r}")
            return Aggregate(word, by, inner)
        if word == "histogram_quantile":
            self.take("op", "(")
            q = float(self.take("num"))
            self.take("op", ",")
            inner = self.expr_()
            self.take("op", ")")
            return Quantile(q, inner)
        if word == "rate":
            self.take("op", "(")
            selector = self.selector(self.take("ident"), ranged=True)
            range_s = _duration(self.take("range")[1:-1])
            self.take("op", ")")
            return Rate(selector, range_s)
        if self.peek() == ("op", "(") or word in {"by", "without", "on", "ignoring", "offset"}:
            raise UnsupportedError(f"{word} in {self.expr!r}")
        return self.selector(word)

    def selector(self, name: str, ranged: bool = False) -> Selector:
        matchers: list[tuple[str, str, str]] = []
        if self.peek() == ("op", "{"):
            self.take("op", "{")
            while self.peek() != ("op", "}"):
                label = self.take("ident")
                op = self.take("op")
                if op not in {"=", "!=", "=~", "!~"}:
                    raise UnsupportedError(f"matcher {op} in {self.expr!r}")
                value = json.loads(self.take("str"))
                matchers.append((label, op, value))
                if self.peek() == ("op", ","):
                    self.take("op", ",")
            self.take("op", "}")
        if self.peek()[0] == "range" and not ranged:
            raise UnsupportedError(f"a range vector outside rate() in {self.expr!r}")
        return Selector(name, tuple(matchers))


def parse(expr: str, rate_s: float = 15.0) -> Node:
    """The expression's tree, template variables filled; UnsupportedError if outside the subset."""
    return _Parser(substitute(expr, rate_s)).parse()


# --- evaluation over scrapes ---------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]
Vector = list[tuple[dict[str, str], float]]


@dataclass
class Scrapes:
    """Samples of successive /metrics scrapes, per series: times and values."""

    times: list[float] = field(default_factory=list)
    #: (name, labels) -> {scrape index: value}
    series: dict[tuple[str, Labels], dict[int, float]] = field(default_factory=dict)

    def add(self, t: float, text: str) -> None:
        """One scrape's exposition text, taken at `t`."""
        index = len(self.times)
        self.times.append(t)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.series.setdefault(key, {})[index] = float(sample.value)

    def names(self) -> set[str]:
        """Every sample name seen."""
        return {name for name, _ in self.series}


def _matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "=~" and re.fullmatch(value, have) is None:
            return False
        if op == "!~" and re.fullmatch(value, have) is not None:
            return False
    return True


def _selected(
    scrapes: Scrapes, selector: Selector
) -> Iterator[tuple[dict[str, str], dict[int, float]]]:
    for (name, labels), values in scrapes.series.items():
        if name == selector.name and _matches(dict(labels), selector.matchers):
            yield dict(labels), values


def _rate(times: list[float], values: dict[int, float], index: int, range_s: float) -> float | None:
    start = bisect.bisect_right(times, times[index] - range_s)
    points = [(times[i], values[i]) for i in range(start, index + 1) if i in values]
    if len(points) < 2:
        return None
    increase = 0.0
    for (_, before), (_, after) in itertools.pairwise(points):
        increase += after - before if after >= before else after  # a reset starts from zero
    return increase / (points[-1][0] - points[0][0])


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs."""
    if not 0 <= q <= 1:
        return -math.inf if q < 0 else math.inf
    buckets = sorted(buckets)
    if not buckets or buckets[-1][0] != math.inf or len(buckets) < 2:
        return math.nan
    monotonic: list[tuple[float, float]] = []
    highest = 0.0
    for upper, count in buckets:
        highest = max(highest, count)
        monotonic.append((upper, highest))
    observations = monotonic[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next(i for i, (_, count) in enumerate(monotonic) if count >= rank)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    start, below = (0.0, 0.0) if b == 0 else monotonic[b - 1]
    end, count = monotonic[b]
    return start + (end - start) * ((rank - below) / (count - below))


def evaluate(node: Node, scrapes: Scrapes, index: int) -> Vector:
    """The instant vector `node` gives at scrape `index`."""
    if isinstance(node, Selector):
        return [
            (labels, values[index])
            for labels, values in _selected(scrapes, node)
            if index in values
        ]
    if isinstance(node, Rate):
        out: Vector = []
        for labels, values in _selected(scrapes, node.selector):
            if index in values:
                rate = _rate(scrapes.times, values, index, node.range_s)
                if rate is not None:
                    out.append((labels, rate))
        return out
    if isinstance(node, Arith):
        return [
            (labels, ARITH[node.op](v, node.number))
            for labels, v in evaluate(node.inner, scrapes, index)
        ]
    if isinstance(node, Aggregate):
        groups: dict[Labels, list[float]] = {}
        for labels, value in evaluate(node.inner, scrapes, index):
            key = tuple((k, labels.get(k, "")) for k in node.by or ())
            groups.setdefault(key, []).append(value)
        combine: dict[str, Callable[[list[float]], float]] = {
            "sum": sum, "max": max, "min": min, "avg": lambda v: sum(v) / len(v), "count": len,
        }  # fmt: skip
        return [(dict(key), combine[node.op](values)) for key, values in groups.items()]
    histograms: dict[Labels, list[tuple[float, float]]] = {}
    for labels, value in evaluate(node.inner, scrapes, index):
        if "le" not in labels:
            continue  # Prometheus ignores series without `le` here as well
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        histograms.setdefault(key, []).append((float(labels["le"]), value))
    return [(dict(key), bucket_quantile(node.q, b)) for key, b in histograms.items()]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend format."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


# --- panels ---------------------------------------------------------------------------------------

PANEL_TYPES = {"row", "timeseries", "state-timeline"}
UNITS = {"s", "bytes", "percent", "reqps", "short"}
OVERRIDE_PROPERTIES = {"unit", "custom.axisPlacement"}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included, in grid order."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return sorted(out, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def check(dashboard: dict[str, Any], rate_s: float = 15.0) -> list[Node]:
    """Every query parsed and every panel type, unit and override known; else UnsupportedError."""
    nodes: list[Node] = []
    for panel in panels(dashboard):
        if panel.get("type") not in PANEL_TYPES:
            raise UnsupportedError(f"panel type {panel.get('type')!r} ({panel.get('title')!r})")
        if panel["type"] == "row":
            continue
        config = panel.get("fieldConfig", {})
        unit = config.get("defaults", {}).get("unit", "short")
        if unit not in UNITS:
            raise UnsupportedError(f"unit {unit!r} ({panel['title']!r})")
        for override in config.get("overrides", []):
            if override["matcher"]["id"] not in {"byName", "byRegexp"}:
                raise UnsupportedError(f"override matcher {override['matcher']['id']!r}")
            for prop in override["properties"]:
                if prop["id"] not in OVERRIDE_PROPERTIES:
                    raise UnsupportedError(f"override property {prop['id']!r} ({panel['title']!r})")
                if prop["id"] == "unit" and prop["value"] not in UNITS:
                    raise UnsupportedError(f"unit {prop['value']!r} ({panel['title']!r})")
        if not panel.get("targets"):
            raise UnsupportedError(f"panel {panel['title']!r} has no query")
        nodes.extend(parse(t["expr"], rate_s) for t in panel["targets"])
    return nodes


def field_config(panel: dict[str, Any], name: str) -> tuple[str, str]:
    """(unit, axis placement) of one series, the panel's overrides applied."""
    config = panel.get("fieldConfig", {})
    unit = str(config.get("defaults", {}).get("unit", "short"))
    placement = "left"
    for override in config.get("overrides", []):
        matcher = override["matcher"]
        hit = (
            name == matcher["options"]
            if matcher["id"] == "byName"
            else re.search(matcher["options"], name) is not None  # Grafana's regexp.test
        )
        if hit:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    unit = prop["value"]
                else:
                    placement = prop["value"]
    return unit, placement


def series_of(
    panel: dict[str, Any], scrapes: Scrapes, rate_s: float
) -> dict[str, tuple[list[float], list[float]]]:
    """Legend name -> (times, values) of every target of a panel over every scrape."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    t0 = scrapes.times[0]
    for target in panel["targets"]:
        node = parse(target["expr"], rate_s)
        template = target.get("legendFormat") or target["expr"]
        for index, t in enumerate(scrapes.times):
            for labels, value in evaluate(node, scrapes, index):
                times, values = out.setdefault(legend(template, labels), ([], []))
                times.append(t - t0)
                values.append(value)
    return out


def _format(unit: str) -> Callable[[float, Any], str]:
    def fmt(value: float, _pos: Any = None) -> str:
        if unit == "s":
            return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2g} s"
        if unit == "bytes":
            for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
                if abs(value) >= size:
                    return f"{value / size:.3g} {name}"
            return f"{value:.0f} B"
        if unit == "percent":
            return f"{value:.3g}%"
        if unit == "reqps":
            return f"{value:.2g} req/s"
        return f"{value:.3g}"

    return fmt


#: Grafana's classic palette
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0")
STATE_COLOURS = {
    "empty": "#8e8e8e",
    "loading": "#ff9830",
    "ready": "#73bf69",
    "unloading": "#b877d9",
}


def draw(
    dashboard: dict[str, Any], scrapes: Scrapes, out: Path, rate_s: float, note: str
) -> dict[str, int]:
    """The dashboard as a PNG; returns the number of series drawn per panel title."""
    import matplotlib as mpl  # noqa: PLC0415  (only the renderer needs it)

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    check(dashboard, rate_s)
    grid = panels(dashboard)
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in grid)
    unit_h = 0.42  # inches per grid row; Grafana's is 30 px
    fig = plt.figure(figsize=(20, height * unit_h + 1.0), facecolor="#111217")
    top = 1 - 0.9 / (height * unit_h + 1.0)
    fig.text(
        0.01,
        1 - 0.35 / (height * unit_h + 1.0),
        dashboard["title"],
        color="white",
        fontsize=15,
        weight="bold",
        va="center",
    )
    fig.text(
        0.99,
        1 - 0.35 / (height * unit_h + 1.0),
        note,
        color="#a0a0a0",
        fontsize=9,
        va="center",
        ha="right",
    )
    span = scrapes.times[-1] - scrapes.times[0]
    drawn: dict[str, int] = {}

    def box(gp: dict[str, int]) -> tuple[float, float, float, float]:
        x0 = gp["x"] / 24
        w = gp["w"] / 24
        y1 = top * (1 - gp["y"] / height)
        h = top * gp["h"] / height
        return x0, y1 - h, w, h

    for panel in grid:
        x0, y0, w, h = box(panel["gridPos"])
        if panel["type"] == "row":
            fig.text(
                x0 + 0.005,
                y0 + h / 2,
                panel["title"],
                color="white",
                fontsize=13,
                weight="bold",
                va="center",
            )
            continue
        ax = fig.add_axes((x0 + 0.035, y0 + 0.035, w - 0.07, h - 0.075), facecolor="#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10, loc="left")
        ax.tick_params(colors="#a0a0a0", labelsize=8)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.6)
        ax.set_xlim(0, span)
        data = series_of(panel, scrapes, rate_s)
        finite = {k: v for k, v in data.items() if any(math.isfinite(x) for x in v[1])}
        drawn[panel["title"]] = len(finite)
        if not finite:
            ax.text(
                0.5,
                0.5,
                "No data",
                color="#a0a0a0",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_yticks([])
            continue
        if panel["type"] == "state-timeline":
            names = sorted(finite)
            for row, name in enumerate(names):
                times, values = finite[name]
                for i, (t, v) in enumerate(zip(times, values, strict=True)):
                    end = times[i + 1] if i + 1 < len(times) else t
                    if v >= 1:
                        ax.broken_barh(
                            [(t, max(end - t, 0.5))],
                            (row - 0.4, 0.8),
                            color=STATE_COLOURS.get(name, "#5794f2"),
                        )
            ax.set_yticks(range(len(names)), names)
            ax.set_ylim(-0.6, len(names) - 0.4)
            continue
        axes = {"left": ax}
        peak: dict[str, float] = {}
        for n, (name, (times, values)) in enumerate(sorted(finite.items())):
            unit, placement = field_config(panel, name)
            if placement not in axes:
                axes[placement] = ax.twinx()
                axes[placement].tick_params(colors="#a0a0a0", labelsize=8)
            target = axes[placement]
            # one colour sequence per panel, whichever axis a series is on (as Grafana does)
            target.plot(times, values, linewidth=1.4, label=name, color=PALETTE[n % len(PALETTE)])
            target.yaxis.set_major_formatter(FuncFormatter(_format(unit)))
            finite_values = [v for v in values if math.isfinite(v)]
            peak[placement] = max([peak.get(placement, 0.0), *finite_values])
        handles = [line for a in axes.values() for line in a.get_lines()]
        ax.legend(
            handles=handles,
            fontsize=7,
            loc="upper left",
            facecolor="#181b1f",
            edgecolor="#2c3235",
            labelcolor="#d8d9da",
        )
        for placement, a in axes.items():
            # a flat zero (no pressure, no leak) is drawn on 0..1, not on a range of +-0.04
            lo, hi = a.get_ylim()
            a.set_ylim(min(lo, 0), hi if peak.get(placement, 0.0) > 0 else 1.0)
    fig.text(
        0.5, 0.004, "time since the first scrape (s)", color="#a0a0a0", ha="center", fontsize=9
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)
    return drawn


# --- the run: a server, traffic, scrapes ----------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def wrapper(port: int, log: Path) -> Iterator[str]:
    """`python -m service serve` with nothing loaded, in a process group of its own."""
    env = {
        **os.environ,
        "IW_ADMIN_KEY": ADMIN_KEY,
        "IW_API_KEY": API_KEY,
        "IW_PORT": str(port),
        "IW_LOG_FORMAT": "json",
        # a small admission so that the highest level queues and overflows (429) for real
        "IW_MAX_CONCURRENCY": "4",
        "IW_MAX_QUEUE": "4",
    }
    env.pop("IW_PRELOAD", None)
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit(f"the wrapper exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            else:
                raise SystemExit(f"the wrapper did not answer /health in 120 s; see {log}")
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@dataclass
class Tally:
    """What the client saw, by phase and status, to print next to the picture."""

    counts: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, phase: str, status: int) -> None:
        """One response."""
        per = self.counts.setdefault(phase, {})
        per[status] = per.get(status, 0) + 1


API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"X-API-Key": ADMIN_KEY}
PROMPTS = (
    "Name three colours.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Count from one to five.",
)


async def chat_loop(
    client: httpx.AsyncClient, model: str, until: float, phase: str, tally: Tally, seed: int
) -> None:
    """Streamed chats back to back until `until`; a 429 waits a little, as a client would."""
    n = seed
    while time.monotonic() < until:
        n += 1
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
            "max_tokens": 24,
            "stream": True,
        }
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=API) as r:
                async for _ in r.aiter_raw():
                    pass
            tally.add(phase, r.status_code)
            if r.status_code == 429:
                await asyncio.sleep(0.5)
        except httpx.HTTPError:
            tally.add(phase, 0)


async def bad_requests(client: httpx.AsyncClient, model: str, until: float, tally: Tally) -> None:
    """One wrong request every 1.5 s, in turn.

    No key (401), an unknown model (404), a value out of range (400), a route that does not
    exist (404).
    """
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    wrong: tuple[tuple[str, str, dict[str, Any] | None, dict[str, str]], ...] = (
        ("POST", "/v1/chat/completions", body, {}),
        ("POST", "/v1/chat/completions", {**body, "model": "no-such-model"}, API),
        ("POST", "/v1/chat/completions", {**body, "temperature": 7}, API),
        ("GET", "/v1/no-such-route", None, API),
    )
    n = 0
    while time.monotonic() < until:
        method, path, json_body, headers = wrong[n % len(wrong)]
        n += 1
        r = await client.request(method, path, json=json_body, headers=headers)
        tally.add("errors", r.status_code)
        await asyncio.sleep(1.5)


async def scraper(
    client: httpx.AsyncClient, every: float, sink: list[tuple[float, str]], stop: asyncio.Event
) -> None:
    """GET /metrics every `every` seconds until `stop`."""
    while not stop.is_set():
        started = time.time()
        with contextlib.suppress(httpx.HTTPError):
            r = await client.get("/metrics", headers=ADMIN, timeout=10)
            if r.status_code == 200:
                sink.append((started, r.text))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every - (time.time() - started)))


async def drive(url: str, scrape_s: float, level_s: float, tally: Tally) -> list[tuple[float, str]]:
    """The scenario; returns the scrapes."""
    scrapes: list[tuple[float, str]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        scraping = asyncio.create_task(scraper(client, scrape_s, scrapes, stop))

        async def phase(name: str, model: str, concurrency: int, seconds: float) -> None:
            print(
                f"  {name}: {concurrency} concurrent streams of {model} for {seconds:.0f} s",
                flush=True,
            )
            until = time.monotonic() + seconds
            await asyncio.gather(
                bad_requests(client, model, until, tally),
                *(chat_loop(client, model, until, name, tally, i) for i in range(concurrency)),
            )

        async def admin(path: str, body: dict[str, Any] | None = None) -> None:
            print(f"  POST {path} {json.dumps(body) if body else ''}", flush=True)
            r = await client.post(path, json=body, headers=ADMIN)
            if r.status_code != 200:
                raise SystemExit(f"{path} answered {r.status_code}: {r.text[:500]}")

        await asyncio.sleep(3 * scrape_s)  # the empty state first
        await admin("/v1/model/load", {"preset": "smollm2-135m"})
        for concurrency in (1, 4, 12):
            await phase(f"transformers c={concurrency}", "smollm2-135m", concurrency, level_s)
        await admin("/v1/model/unload", {"drain_timeout_s": 10})
        await asyncio.sleep(3 * scrape_s)
        await admin("/v1/model/load", {"preset": "echo", "engine_params": {"token_delay_ms": 20}})
        await phase("echo c=8", "echo", 8, level_s * 0.6)
        await admin("/v1/model/unload", {"drain_timeout_s": 10})
        await asyncio.sleep(3 * scrape_s)
        stop.set()
        await scraping
    return scrapes


def save(path: Path, scrapes: list[tuple[float, str]]) -> None:
    """The scrapes, gzipped JSON lines of {"t", "text"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as out:
        for t, text in scrapes:
            out.write(json.dumps({"t": t, "text": text}) + "\n")


def load_scrapes(path: Path) -> Scrapes:
    """Scrapes saved by `save`."""
    scrapes = Scrapes()
    with gzip.open(path, "rt") as source:
        for line in source:
            item = json.loads(line)
            scrapes.add(float(item["t"]), item["text"])
    return scrapes


def main() -> None:
    """Run (or re-render), then draw the PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--render-only", type=Path, metavar="SCRAPES", help="draw saved scrapes; no server"
    )
    parser.add_argument("--scrape-s", type=float, default=2.5, help="seconds between scrapes")
    parser.add_argument("--rate-s", type=float, default=15.0, help="$__rate_interval in seconds")
    parser.add_argument("--level-s", type=float, default=25.0, help="seconds per concurrency level")
    parser.add_argument("--out", type=Path, default=PNG)
    args = parser.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())
    check(dashboard, args.rate_s)  # before spending minutes on a run
    source = args.render_only
    if source is None:
        tally = Tally()
        port = free_port()
        log = SCRAPES.with_name("dashboard-server.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrapper on 127.0.0.1:{port} (log {log})", flush=True)
        with wrapper(port, log) as url:
            raw = asyncio.run(drive(url, args.scrape_s, args.level_s, tally))
        save(SCRAPES, raw)
        source = SCRAPES
        for phase, per in tally.counts.items():
            print(
                f"  client saw, {phase}: " + ", ".join(f"{k}: {v}" for k, v in sorted(per.items()))
            )
    scrapes = load_scrapes(source)
    span = scrapes.times[-1] - scrapes.times[0]
    note = (
        f"rendered by bench/dashboard.py from {len(scrapes.times)} scrapes of a real run "
        f"({span:.0f} s, every {args.scrape_s:g} s, rate window {args.rate_s:g} s); "
        "not a Grafana screenshot"
    )
    drawn = draw(dashboard, scrapes, args.out, args.rate_s, note)
    print(f"{args.out}: {len(scrapes.times)} scrapes over {span:.0f} s")
    for title, count in drawn.items():
        print(f"  {title}: {count} series" + ("" if count else " (no data)"))


if __name__ == "__main__":
    main()
