"""Memory for the lifecycle manager: the `MemoryLedger`, a process-tree RSS probe, heap trimming.

The ledger keeps the memory books of loads and unloads: it measures, asks the load guard
whether a load fits (alone or beside the serving model), waits for memory to settle after an
unload and judges what the unload gave back against the backend's first baseline. The manager
decides when; the ledger says how much.

The service injects a richer probe (NVML device memory, torch allocator) through the same
`MemoryProbe` protocol; this default keeps the manager usable and measurable on its own.

Must never: initialise CUDA or import torch (a probe may run while no engine is loaded); judge
an unload by anything but the same test every time (`memory_returned`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

import psutil
from attrs import frozen

from adapters.base import MemoryEstimate
from schemas.control import MemoryChange
from schemas.errors import WrapperError
from schemas.telemetry import MemorySnapshot

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


class MemoryProbe(Protocol):
    """Takes a memory snapshot of our process tree (plus `pids`, the engine's processes)."""

    def snapshot(self, pids: Sequence[int] = ()) -> MemorySnapshot:
        """Measure now."""
        ...


class LoadGuard(Protocol):
    """Refuses a load that will not fit (the watchdog implements it)."""

    def check_load(self, estimate: MemoryEstimate | None) -> None:
        """Raise `InsufficientMemoryError` when the load should not start."""
        ...


class Estimable(Protocol):
    """A planned load that can say what it will need (`registry.planning.LoadPlan`)."""

    def estimate_memory(self) -> MemoryEstimate | None:
        """MiB the load will need; None when unknown."""
        ...


Compared = Literal["device", "rss"]


@frozen
class UnloadVerdict:
    """What an unload gave back, by the same test every time (`UnloadResponse`'s fields)."""

    compared: Compared
    """Device memory (GPU) when both readings have it, else the process tree's RSS."""
    vs_pre_load_mib: float
    tolerance_mib: float
    vs_first_baseline_mib: float | None = None
    vs_previous_unload_mib: float | None = None
    returned: bool | None = None
    """`vs_first_baseline_mib` within the tolerance; None when no verdict is honest (another
    model was still loaded)."""


class MemoryLedger:
    """The memory books of loads and unloads: measuring, admission, settling and the verdict.

    Per backend it keeps the memory after its first unload (the one-time costs of the engine's
    libraries and a CUDA context are paid by then, so later growth is creep) and after its last.
    """

    def __init__(
        self,
        probe: MemoryProbe | None = None,
        *,
        guard: LoadGuard | None = None,
        settle_timeout_s: float = 10.0,
        settle_tolerance_mib: float = 64.0,
    ) -> None:
        self.probe: MemoryProbe = ProcessTreeProbe() if probe is None else probe
        self.guard = guard
        self.settle_timeout_s = settle_timeout_s
        self.settle_tolerance_mib = settle_tolerance_mib
        self._first_baseline: dict[str, MemorySnapshot] = {}
        self._previous_unload: dict[str, MemorySnapshot] = {}

    async def snapshot(self, pids: Sequence[int] = ()) -> MemorySnapshot:
        """Measure now, off the event loop (a probe may block on NVML or /proc)."""
        return await asyncio.to_thread(self.probe.snapshot, pids)

    def admit(self, plan: Estimable) -> None:
        """Raise `InsufficientMemoryError` when the guard says `plan` will not fit now."""
        if self.guard is not None:
            self.guard.check_load(plan.estimate_memory())

    def fits_alongside(self, plan: Estimable) -> bool:
        """Whether the guard's estimate says `plan` fits beside the serving engine."""
        try:
            estimate = plan.estimate_memory()
        except Exception:
            logger.exception("memory estimate failed; swapping by unloading first")
            return False
        if estimate is None:
            return False  # unknown: two engines at once could take the machine down
        if self.guard is not None:
            try:
                self.guard.check_load(estimate)  # free memory now: the old engine is counted
            except WrapperError as exc:
                logger.info("swap unloads first: %s", exc.message)
                return False
        return True

    async def settle(self) -> tuple[MemorySnapshot, bool]:
        """Poll memory until two readings agree within 2 MiB, or the settle timeout passes."""
        deadline = time.perf_counter() + self.settle_timeout_s
        previous = await self.snapshot()
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.2)
            current = await self.snapshot()
            if abs(current.rss_mib - previous.rss_mib) < 2.0:
                return current, True
            previous = current
        return previous, False

    def judge(
        self, backend: str, pre_load: MemorySnapshot, after: MemorySnapshot, *, comparable: bool
    ) -> UnloadVerdict:
        """An unload's memory against the backend's first baseline and its last unload.

        `comparable` is False when another model is still loaded (the old one of a swap done
        alongside): its memory is in `after`, so no verdict is given and the books are left be.
        """
        compared: Compared = (
            "device"
            if after.device_used_mib is not None and pre_load.device_used_mib is not None
            else "rss"
        )
        vs_pre_load = memory_above(pre_load, after, compared)
        if not comparable:
            return UnloadVerdict(compared, vs_pre_load, self.settle_tolerance_mib)
        first = self._first_baseline.setdefault(backend, after)
        previous = self._previous_unload.get(backend)
        self._previous_unload[backend] = after
        vs_first = memory_above(first, after, compared)
        returned = vs_first <= self.settle_tolerance_mib
        if not returned:
            logger.warning(
                "unload left %.0f MiB above the backend's first baseline (tolerance %.0f MiB)",
                vs_first,
                self.settle_tolerance_mib,
            )
        return UnloadVerdict(
            compared,
            vs_pre_load,
            self.settle_tolerance_mib,
            vs_first_baseline_mib=vs_first,
            vs_previous_unload_mib=(
                None if previous is None else memory_above(previous, after, compared)
            ),
            returned=returned,
        )


def memory_change(before: MemorySnapshot, after: MemorySnapshot) -> MemoryChange:
    """Two snapshots as the before/after/delta a load or unload response reports."""

    def delta(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 1)

    return MemoryChange(
        rss_before_mib=round(before.rss_mib, 1),
        rss_after_mib=round(after.rss_mib, 1),
        rss_delta_mib=round(after.rss_mib - before.rss_mib, 1),
        device_before_mib=before.device_used_mib,
        device_after_mib=after.device_used_mib,
        device_delta_mib=delta(before.device_used_mib, after.device_used_mib),
        method=after.method,
    )


def memory_above(baseline: MemorySnapshot, after: MemorySnapshot, compared: Compared) -> float:
    """`after` minus `baseline` in MiB: device memory when `compared` says so, else host RSS."""
    if compared == "device" and baseline.device_used_mib is not None:
        return round((after.device_used_mib or 0.0) - baseline.device_used_mib, 1)
    return round(after.rss_mib - baseline.rss_mib, 1)


def process_tree(pids: Sequence[int] = ()) -> list[psutil.Process]:
    """This process, its descendants, and `pids` (and theirs), each once."""
    seen: dict[int, psutil.Process] = {}
    roots = [psutil.Process(os.getpid())]
    for pid in pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.Error:
            continue
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            seen.setdefault(proc.pid, proc)
    return list(seen.values())


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm: tuple[int, int] | None = None  # (pid, fd of /proc/<pid>/statm) for our own process


def own_rss_bytes() -> int | None:
    """Our resident set size, read from a `/proc/<pid>/statm` kept open (None off Linux).

    Every chat request reads it twice (RequestMemoryMeter); psutil opens, reads and closes the
    file each time, which cost ~5 % of the server's CPU at 64 streams (bench/overhead.py). A
    `pread` on a kept descriptor is a tenth of that. The pid is checked so that a forked child
    never reads its parent's figures.
    """
    global _statm  # noqa: PLW0603  (one descriptor per process, opened on first use)
    pid = os.getpid()
    try:
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def rss_mib(procs: Iterable[psutil.Process]) -> float:
    """Resident set size of `procs` in MiB (processes that vanished meanwhile are skipped)."""
    total = 0
    me = os.getpid()
    for proc in procs:
        if proc.pid == me and (own := own_rss_bytes()) is not None:
            total += own
            continue
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


class ProcessTreeProbe:
    """RSS-only probe: the default on machines without NVML."""

    def snapshot(self, pids: Sequence[int] = ()) -> MemorySnapshot:
        """RSS of our tree."""
        return MemorySnapshot(rss_mib=rss_mib(process_tree(pids)))


_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name) if _libc_name else None


#: glibc's `mallopt` parameter numbers (malloc.h: M_MMAP_THRESHOLD, M_ARENA_MAX)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: allocations at least this large get pages of their own, unmapped when freed
MMAP_THRESHOLD_BYTES = 1024 * 1024
#: malloc arenas for all threads together (glibc's default: 8 per core)
ARENA_MAX = 2


def tune_allocator(threshold: int = MMAP_THRESHOLD_BYTES, arenas: int = ARENA_MAX) -> bool:
    """Make glibc give an unloaded engine's memory back to the OS (call before the first load).

    By default glibc raises its mmap threshold each time a large mmapped block is freed, up to
    32 MiB: after the first unload, an engine's tensors of a few MiB come from the heap arenas
    instead, where small objects allocated between them pin the pages and `malloc_trim` cannot
    give them back. And every thread that finds an arena busy gets one of its own (up to 8 per
    core), each keeping its share of such pages. Measured on transformers with the bundled
    model, RSS after unload crept 10-25 MiB per load/unload cycle (bench/cycles.py). A fixed
    threshold keeps every block of 1 MiB or more in its own mapping, unmapped when freed, and
    two arenas keep the rest in few places. Returns False where there is no glibc (no-op).
    """
    mallopt = getattr(_libc, "mallopt", None) if _libc is not None else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_ARENA_MAX, arenas))


def release_host_memory() -> None:
    """Ask glibc to return freed heap pages to the OS.

    After an engine is dropped, CPython and torch have freed the tensors, but glibc keeps the
    pages in its arenas, so RSS stays high and an unload looks like a leak. `malloc_trim(0)`
    gives them back; it is a no-op where there is no glibc.
    """
    trim = getattr(_libc, "malloc_trim", None) if _libc is not None else None
    if trim is not None:
        trim(0)


def freeze_heap() -> None:
    """Move everything alive now out of the cyclic GC's reach (after a load).

    An engine imports torch and its own modules and builds the model: millions of long-lived
    objects that every full collection walks again, tens of milliseconds each time, on the event
    loop. vLLM's own server freezes its heap after start-up for the same reason; without it the
    wrapper lost 11 % throughput to `vllm serve` at 16 concurrent streams.
    """
    gc.collect()
    gc.freeze()


def unfreeze_heap() -> None:
    """Give frozen objects back to the collector (before an unload collects the engine)."""
    gc.unfreeze()
