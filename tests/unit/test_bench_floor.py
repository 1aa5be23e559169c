"""The benchmark's floor sends the wrapper's `metrics` object field for field.

bench/overhead.py checks the floor's bytes against the wrapper's at the start of every run; this
catches a new metric field (as `hooks_ms` was) before anyone runs the benchmark.
"""

from __future__ import annotations

from bench.overhead import _FLOOR_METRICS
from service.telemetry import _METRIC_FIELDS


def test_floor_metrics_have_the_wrappers_fields_in_order() -> None:
    """Same keys, same order: the floor's final chunk is byte for byte the wrapper's shape."""
    assert tuple(_FLOOR_METRICS) == _METRIC_FIELDS
