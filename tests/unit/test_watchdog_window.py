"""`ResourceWatchdog.window`: the samples of one request's time span, found from the newest back.

Every chat request asks for its window (service.telemetry.RequestMemoryMeter); the scan stops at
the window's start instead of walking the whole history (up to `max_samples`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.gpu import Nvml
from service.watchdog import ResourceSample, ResourceWatchdog


def _sample(mono: float, cpu: float) -> ResourceSample:
    return ResourceSample(
        ts=mono, mono=mono, process_cpu_percent=cpu, system_cpu_percent=0.0,
        process_rss_mib=mono, ram_used_mib=1.0, ram_available_mib=1.0, ram_total_mib=2.0,
        gpus=(), process_device_mib=None,
    )  # fmt: skip


def _watchdog(monos: list[float]) -> ResourceWatchdog:
    wd = ResourceWatchdog(Nvml(), CollectorRegistry(), max_samples=600)
    for mono in monos:
        wd._samples.append(_sample(mono, cpu=mono * 10))
    return wd


def test_window_takes_exactly_the_samples_inside_its_bounds() -> None:
    """Bounds are inclusive; samples before and after are left out."""
    wd = _watchdog([float(i) for i in range(1, 11)])
    win = wd.window(3.5, 7.0)
    assert win.samples == 4  # 4, 5, 6, 7
    assert win.cpu_percent_mean == 55.0
    assert win.rss_max_mib == 7.0
    assert wd.window(3.0, 3.0).samples == 1


def test_window_outside_the_history_is_empty() -> None:
    """Before the first sample, after the last, and with no samples at all: zero samples."""
    wd = _watchdog([float(i) for i in range(1, 11)])
    assert wd.window(11.0, 20.0).samples == 0
    assert wd.window(0.0, 0.5).samples == 0
    assert _watchdog([]).window(0.0, 100.0).samples == 0


def test_window_over_the_whole_history_sees_every_sample() -> None:
    """A window wider than the history: all of it, oldest to newest."""
    monos = [float(i) for i in range(600)]
    win = _watchdog(monos).window(-1.0, 1000.0)
    assert win.samples == 600
    assert win.rss_max_mib == 599.0
