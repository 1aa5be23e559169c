"""Host-memory helpers for the lifecycle manager: a process-tree RSS probe and heap trimming.

The service injects a richer probe (NVML device memory, torch allocator) through the same
`MemoryProbe` protocol; this default keeps the manager usable and measurable on its own.

Must never: initialise CUDA or import torch (a probe may run while no engine is loaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import psutil

from schemas.telemetry import MemorySnapshot

MIB = 1024 * 1024


class MemoryProbe(Protocol):
    """Takes a memory snapshot of our process tree (plus `pids`, the engine's processes)."""

    def snapshot(self, pids: Sequence[int] = ()) -> MemorySnapshot:
        """Measure now."""
        ...


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
