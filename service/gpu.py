"""NVML access for the watchdog and the memory probes: device memory, utilisation, processes.

NVML reads the driver's counters; it never creates a CUDA context, so it is safe to call while no
engine is loaded and from any thread. Where NVML is missing (CPU machines, containers without the
driver library) `Nvml.available` is False after one log notice, and every reading is `None`.

Also `torch_allocator()`: the torch CUDA allocator's figures, read only if an engine already
imported torch and initialised CUDA in this process (checking never initialises it).

Must never: initialise CUDA; raise out of a reading (a broken GPU must not break serving).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from typing import Any

from attrs import frozen

logger = logging.getLogger(__name__)
MIB = 1024 * 1024


@frozen
class GpuReading:
    """One GPU at one instant."""

    index: int
    name: str
    utilization_percent: float | None
    memory_used_mib: float
    memory_total_mib: float
    temperature_c: float | None
    power_w: float | None


class Nvml:
    """Lazily initialised NVML handle set; thread-safe; absent NVML is a normal state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised = False
        self._available = False
        self._pynvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []

    def _init(self) -> None:
        if self._initialised:
            return
        with self._lock:
            if self._is_initialised():  # another thread won the race
                return
            self._initialised = True
            try:
                import pynvml  # noqa: PLC0415  (optional at runtime; import only when asked)

                pynvml.nvmlInit()
                count = pynvml.nvmlDeviceGetCount()
                self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
                self._names = [str(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
                self._pynvml = pynvml
                self._available = True
                logger.info("NVML: %d GPU(s): %s", count, ", ".join(self._names))
            except Exception as exc:
                logger.info("NVML unavailable (%s); GPU readings will be null", type(exc).__name__)

    def _is_initialised(self) -> bool:
        return self._initialised

    @property
    def available(self) -> bool:
        """Whether NVML answered at initialisation."""
        self._init()
        return self._available

    def read(self) -> list[GpuReading]:
        """Every GPU's utilisation, memory, temperature and power; empty without NVML."""
        if not self.available:
            return []
        nv = self._pynvml
        out = []
        for index, handle in enumerate(self._handles):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # noqa: S112  (a GPU that stops answering drops out of the sample)
                continue
            out.append(
                GpuReading(
                    index=index,
                    name=self._names[index],
                    utilization_percent=_try(
                        lambda h=handle: nv.nvmlDeviceGetUtilizationRates(h).gpu
                    ),
                    memory_used_mib=mem.used / MIB,
                    memory_total_mib=mem.total / MIB,
                    temperature_c=_try(
                        lambda h=handle: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                    ),
                    power_w=_try(lambda h=handle: nv.nvmlDeviceGetPowerUsage(h) / 1000),
                )
            )
        return out

    def device_used_mib(self) -> float | None:
        """Device memory in use on all GPUs (all processes), MiB."""
        readings = self.read()
        return sum(r.memory_used_mib for r in readings) if readings else None

    def device_free_mib(self) -> float | None:
        """Free device memory summed over GPUs, MiB."""
        readings = self.read()
        if not readings:
            return None
        return sum(r.memory_total_mib - r.memory_used_mib for r in readings)

    def process_used_mib(self, pids: Iterable[int]) -> float | None:
        """Device memory NVML attributes to `pids`, MiB (None without NVML)."""
        if not self.available:
            return None
        wanted = set(pids)
        nv = self._pynvml
        total = 0
        for handle in self._handles:
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # noqa: S112  (not every GPU/driver reports processes)
                continue
            total += sum(p.usedGpuMemory or 0 for p in procs if p.pid in wanted)
        return total / MIB


def _try(fn: Any) -> float | None:
    try:
        return float(fn())
    except Exception:
        return None


def torch_allocator() -> tuple[float, float] | None:
    """(allocated MiB, peak allocated MiB) of torch's CUDA allocator, if CUDA is already up."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return (
            torch.cuda.memory_allocated() / MIB,
            torch.cuda.max_memory_allocated() / MIB,
        )
    except Exception:
        return None


def torch_reset_peak() -> None:
    """Reset torch's CUDA peak counter (only if CUDA is already up)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        logger.debug("could not reset torch peak memory stats", exc_info=True)
