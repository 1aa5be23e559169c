"""Unload memory reports: both figures every time, one boolean that always means the same."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from helpers import make_registry
from registry.manager import ModelManager
from registry.memory import MemoryLedger
from registry.secrets import SecretStore
from schemas.control import LoadRequest, UnloadResponse
from schemas.telemetry import MemorySnapshot


class ScriptedProbe:
    """RSS from a level the test sets (steady, so the unload's settle poll ends at once)."""

    def __init__(self) -> None:
        self.level = 1000.0

    def snapshot(self, pids: Sequence[int] = ()) -> MemorySnapshot:
        """The current level."""
        return MemorySnapshot(rss_mib=self.level)


async def _cycle(manager: ModelManager, probe: ScriptedProbe, after: float) -> UnloadResponse:
    probe.level = 1000.0
    await manager.load(LoadRequest(preset="echo"))
    probe.level = after
    return await manager.unload()


async def test_every_unload_compares_with_the_first_baseline_and_the_previous(
    tmp_path: Path,
) -> None:
    """Creep that each unload alone hides is caught: `memory_returned` tracks the first baseline."""
    probe = ScriptedProbe()
    manager = ModelManager(
        make_registry(tmp_path),
        SecretStore(),
        memory=MemoryLedger(probe, settle_timeout_s=1.0),
    )
    first = await _cycle(manager, probe, 1000.0)
    assert first.memory_compared == "rss"
    assert (first.memory_vs_first_baseline_mib, first.memory_vs_previous_unload_mib) == (0.0, None)
    assert first.memory_returned is True
    # +40 MiB per cycle: within the 64 MiB tolerance of the previous unload every time
    reports = [await _cycle(manager, probe, 1000.0 + 40 * n) for n in (1, 2)]
    assert [r.memory_vs_previous_unload_mib for r in reports] == [40.0, 40.0]
    assert [r.memory_vs_first_baseline_mib for r in reports] == [40.0, 80.0]
    assert [r.memory_returned for r in reports] == [True, False]
    back = await _cycle(manager, probe, 1010.0)
    assert (back.memory_returned, back.memory_vs_first_baseline_mib) == (True, 10.0)
    assert back.memory_vs_previous_unload_mib == -70.0
    assert back.memory_tolerance_mib == 64.0
    assert manager.status().last_unload == back


async def test_a_first_unload_is_judged_like_every_other(tmp_path: Path) -> None:
    """No null verdict on the first unload: it sets the baseline and says so with `true`."""
    probe = ScriptedProbe()
    manager = ModelManager(
        make_registry(tmp_path),
        SecretStore(),
        memory=MemoryLedger(probe, settle_timeout_s=1.0),
    )
    report = await _cycle(manager, probe, 1300.0)
    assert report.memory_returned is True
    assert report.memory_vs_pre_load_mib == 300.0
    assert report.memory_vs_first_baseline_mib == 0.0
