"""The memory ledger on its own: admission, fitting alongside, settling, judging an unload.

`test_unload_memory.py` proves the manager reports the ledger's verdicts; these pin the
verdicts themselves with scripted snapshots, no engine and no manager.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from adapters.base import MemoryEstimate
from registry.memory import MemoryLedger, UnloadVerdict, memory_change
from schemas.errors import InsufficientMemoryError
from schemas.telemetry import MemorySnapshot


def _snap(rss: float, device: float | None = None) -> MemorySnapshot:
    return MemorySnapshot(rss_mib=rss, device_used_mib=device)


class Plan:
    """A planned load whose estimate the test sets; `raises` makes estimating fail."""

    def __init__(self, estimate: MemoryEstimate | None, *, raises: bool = False) -> None:
        self.estimate = estimate
        self.raises = raises
        self.asked = 0

    def estimate_memory(self) -> MemoryEstimate | None:
        """The scripted estimate."""
        self.asked += 1
        if self.raises:
            msg = "config.json unreadable"
            raise OSError(msg)
        return self.estimate


class Guard:
    """Refuses estimates above `free_mib` host MiB, the way the watchdog does."""

    def __init__(self, free_mib: float) -> None:
        self.free_mib = free_mib
        self.seen: list[MemoryEstimate | None] = []

    def check_load(self, estimate: MemoryEstimate | None) -> None:
        """Raise 503 when the estimate does not fit."""
        self.seen.append(estimate)
        if estimate is not None and (estimate.host_mib or 0.0) > self.free_mib:
            msg = "not enough memory"
            raise InsufficientMemoryError(msg)


class Drifting:
    """RSS that grows by `step` MiB at every reading (memory that never settles)."""

    def __init__(self, step: float) -> None:
        self.level = 1000.0
        self.step = step

    def snapshot(self, pids: Sequence[int] = ()) -> MemorySnapshot:
        """The next level."""
        self.level += self.step
        return _snap(self.level)


def test_the_first_unload_sets_the_baseline_and_later_ones_are_judged_by_it() -> None:
    """Returned means within the tolerance of the backend's first unload, every time."""
    ledger = MemoryLedger(settle_tolerance_mib=64.0)
    first = ledger.judge("echo", _snap(900), _snap(1000), comparable=True)
    assert first == UnloadVerdict("rss", 100.0, 64.0, 0.0, None, returned=True)
    crept = ledger.judge("echo", _snap(1000), _snap(1070), comparable=True)
    assert (crept.vs_first_baseline_mib, crept.vs_previous_unload_mib) == (70.0, 70.0)
    assert crept.returned is False
    back = ledger.judge("echo", _snap(1000), _snap(1030), comparable=True)
    assert (back.vs_first_baseline_mib, back.vs_previous_unload_mib) == (30.0, -40.0)
    assert back.returned is True


def test_each_backend_has_its_own_baseline() -> None:
    """One engine's libraries are not another's creep."""
    ledger = MemoryLedger()
    ledger.judge("echo", _snap(900), _snap(1000), comparable=True)
    other = ledger.judge("vllm", _snap(1000), _snap(3000), comparable=True)
    assert (other.vs_first_baseline_mib, other.vs_previous_unload_mib) == (0.0, None)
    assert other.returned is True


def test_device_memory_is_compared_when_both_readings_have_it() -> None:
    """On a GPU the verdict is about device memory; host RSS growth does not decide it."""
    ledger = MemoryLedger(settle_tolerance_mib=64.0)
    ledger.judge("vllm", _snap(1000, 500), _snap(1000, 600), comparable=True)
    verdict = ledger.judge("vllm", _snap(1000, 600), _snap(5000, 700), comparable=True)
    assert verdict.compared == "device"
    assert (verdict.vs_first_baseline_mib, verdict.vs_pre_load_mib) == (100.0, 100.0)
    assert verdict.returned is False
    host_only = ledger.judge("vllm", _snap(1000), _snap(1010, 700), comparable=True)
    assert host_only.compared == "rss"


def test_no_verdict_while_another_model_is_loaded_and_the_books_stay_as_they_were() -> None:
    """The old model of a swap alongside: the new one's memory is in the reading."""
    ledger = MemoryLedger()
    swap = ledger.judge("echo", _snap(1000), _snap(4000), comparable=False)
    assert swap == UnloadVerdict("rss", 3000.0, 64.0)
    assert swap.returned is None
    first = ledger.judge("echo", _snap(1000), _snap(1000), comparable=True)
    assert (first.vs_first_baseline_mib, first.vs_previous_unload_mib) == (0.0, None)


def test_fits_alongside_only_on_a_known_estimate_the_guard_accepts() -> None:
    """Unknown, failing or refused estimates mean unload first; a fitting one loads alongside."""
    guard = Guard(free_mib=1000)
    ledger = MemoryLedger(guard=guard)
    assert ledger.fits_alongside(Plan(None)) is False
    assert ledger.fits_alongside(Plan(None, raises=True)) is False
    assert ledger.fits_alongside(Plan(MemoryEstimate(host_mib=2000))) is False
    assert ledger.fits_alongside(Plan(MemoryEstimate(host_mib=500))) is True
    assert guard.seen == [MemoryEstimate(host_mib=2000), MemoryEstimate(host_mib=500)]
    assert MemoryLedger().fits_alongside(Plan(MemoryEstimate(host_mib=10**6))) is True


def test_admit_asks_the_guard_and_lets_its_refusal_through() -> None:
    """A load the guard refuses is a 503; without a guard nothing is estimated."""
    guard = Guard(free_mib=1000)
    MemoryLedger(guard=guard).admit(Plan(MemoryEstimate(host_mib=10)))
    with pytest.raises(InsufficientMemoryError):
        MemoryLedger(guard=guard).admit(Plan(MemoryEstimate(host_mib=5000)))
    unguarded = Plan(None, raises=True)
    MemoryLedger().admit(unguarded)
    assert unguarded.asked == 0


async def test_settle_stops_at_two_agreeing_readings() -> None:
    """Steady memory settles on the second reading."""
    ledger = MemoryLedger(Drifting(step=1.0), settle_timeout_s=5.0)
    after, settled = await ledger.settle()
    assert settled is True
    assert after.rss_mib == 1002.0


async def test_settle_gives_up_at_the_timeout_with_the_last_reading() -> None:
    """Memory still moving at the timeout is reported as not settled."""
    probe = Drifting(step=50.0)
    after, settled = await MemoryLedger(probe, settle_timeout_s=0.3).settle()
    assert settled is False
    assert after.rss_mib == probe.level


def test_memory_change_rounds_and_leaves_unknown_device_figures_unknown() -> None:
    """Deltas are after minus before; without device readings the device delta is null."""
    change = memory_change(_snap(1000.04, 10), _snap(1200.06, None))
    assert (change.rss_before_mib, change.rss_after_mib, change.rss_delta_mib) == (
        1000.0,
        1200.1,
        200.0,
    )
    assert (change.device_before_mib, change.device_delta_mib) == (10, None)
