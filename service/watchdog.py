"""ResourceWatchdog: background samples of CPU, RAM and GPUs; guard rails built on them.

Every `interval_s` a worker thread reads psutil (our process tree's CPU% and RSS, system RAM) and
NVML (per-GPU utilisation, memory, temperature, power, and the device memory of our tree's
processes). Samples go into a ring buffer (`GET /v1/telemetry/resources`), Prometheus gauges, and
per-request summaries (the samples that fall inside a request's window). The watchdog measures its
own CPU time so its cost can be stated, not guessed.

Guard rails: `check_load()` refuses a load whose estimated need does not fit free memory (503 with
the numbers); sustained host-memory pressure (available RAM under a floor for several samples in a
row) makes `/ready` answer 503 until it clears. GPU memory is not a pressure signal: vLLM and SGLang
fill the device on purpose (KV cache).

Engine health without traffic: every `ENGINE_CHECK_S` a second loop checks the loaded engine's
own processes (`LoadInfo.engine_pids`: vLLM's and SGLang's engine cores). One that is gone or a
zombie is reported through `on_engine_death`, which the app wires to
`ModelManager.engine_failed`, the same path a death under traffic takes (state, `/ready` 503,
automatic unload, `last_error`).

Must never: initialise CUDA; let a failed reading stop the loop; sample on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence

import psutil
from attrs import field, frozen
from prometheus_client import CollectorRegistry, Gauge

from adapters.base import MemoryEstimate
from registry.memory import process_tree, rss_mib
from schemas.errors import InsufficientMemoryError
from schemas.telemetry import MemorySnapshot
from service.gpu import MIB, GpuReading, Nvml, torch_allocator

logger = logging.getLogger(__name__)


@frozen
class ResourceSample:
    """One watchdog reading."""

    ts: float
    """Unix time."""
    mono: float
    """perf_counter() time, comparable with request timestamps."""
    process_cpu_percent: float
    """CPU% of our process tree (100 = one core)."""
    system_cpu_percent: float
    process_rss_mib: float
    ram_used_mib: float
    ram_available_mib: float
    ram_total_mib: float
    gpus: tuple[GpuReading, ...] = ()
    process_device_mib: float | None = None
    """Device memory NVML attributes to our process tree."""


@frozen
class WindowSummary:
    """Samples inside a request window, summarised."""

    samples: int
    gpu_util_mean: float | None = None
    device_memory_max_mib: float | None = None
    cpu_percent_mean: float | None = None
    rss_max_mib: float | None = None


@frozen
class PressureConfig:
    """When host memory counts as under pressure."""

    min_available_mib: float = 512.0
    """Available RAM below this is pressure."""
    consecutive: int = 3
    """Samples in a row needed to raise (and to clear) the flag."""
    load_headroom: float = field(default=1.1)
    """A load must fit `estimate * load_headroom` into free memory."""


class ResourceWatchdog:
    """See the module docstring."""

    #: how often the engine's processes are checked (a /proc read each; bounded by interval_s)
    ENGINE_CHECK_S = 0.5

    def __init__(
        self,
        nvml: Nvml,
        registry: CollectorRegistry,
        *,
        interval_s: float = 1.0,
        max_samples: int = 600,
        pressure: PressureConfig | None = None,
        engine_pids: Callable[[], Sequence[int]] = tuple,
        on_engine_death: Callable[[str], None] | None = None,
    ) -> None:
        self.nvml = nvml
        self._on_engine_death = on_engine_death
        self.interval_s = interval_s
        self.pressure_config = pressure or PressureConfig()
        self._engine_pids = engine_pids
        self._samples: deque[ResourceSample] = deque(maxlen=max_samples)
        self._procs: dict[int, psutil.Process] = {}
        self._task: asyncio.Task[None] | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._started_wall = 0.0
        self.cost_cpu_s = 0.0
        self._low_streak = 0
        self._ok_streak = 0
        self.under_pressure = False

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.g_cpu = gauge("iw_process_cpu_percent", "CPU% of the process tree.")
        self.g_rss = gauge("iw_process_resident_memory_bytes", "RSS of the process tree.")
        self.g_ram_used = gauge("iw_system_memory_used_bytes", "System RAM in use.")
        self.g_ram_avail = gauge("iw_system_memory_available_bytes", "System RAM available.")
        self.g_pressure = gauge("iw_memory_pressure", "1 while host memory is under pressure.")
        self.g_cost = gauge("iw_watchdog_cpu_fraction", "Watchdog CPU time / wall time.")
        gpu = ("gpu",)
        self.g_gpu_util = gauge("iw_gpu_utilization_percent", "GPU utilisation (NVML).", gpu)
        self.g_gpu_mem = gauge("iw_gpu_memory_used_bytes", "GPU memory used (NVML).", gpu)
        self.g_gpu_total = gauge("iw_gpu_memory_total_bytes", "GPU memory total (NVML).", gpu)
        self.g_gpu_temp = gauge("iw_gpu_temperature_celsius", "GPU temperature (NVML).", gpu)
        self.g_gpu_power = gauge("iw_gpu_power_watts", "GPU power draw (NVML).", gpu)

    # --- sampling ------------------------------------------------------------------------------

    def _tree(self) -> list[psutil.Process]:
        """Our process tree plus the engine's processes.

        Process objects are reused so that `cpu_percent()` measures since the previous sample.
        """
        pids = {os.getpid()}
        roots = [os.getpid(), *self._engine_pids()]
        for root in roots:
            try:
                known = self._procs.get(root)
                proc = known if known is not None else psutil.Process(root)
                pids.add(root)
                pids.update(c.pid for c in proc.children(recursive=True))
            except psutil.Error:
                continue
        procs = []
        for pid in pids:
            cached = self._procs.get(pid)
            if cached is not None:
                procs.append(cached)
                continue
            try:
                fresh = psutil.Process(pid)
                fresh.cpu_percent(None)  # prime: the first call always says 0
            except psutil.Error:
                continue
            procs.append(fresh)
        self._procs = {p.pid: p for p in procs}
        return procs

    def sample(self) -> ResourceSample:
        """Take one reading now (blocking; runs in a worker thread)."""
        started = time.thread_time()
        cpu = rss = 0.0
        procs = self._tree()
        for proc in procs:
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
        vm = psutil.virtual_memory()
        gpus = tuple(self.nvml.read())
        device = self.nvml.process_used_mib(p.pid for p in procs) if gpus else None
        sample = ResourceSample(
            ts=time.time(),
            mono=time.perf_counter(),
            process_cpu_percent=round(cpu, 1),
            system_cpu_percent=psutil.cpu_percent(None),
            process_rss_mib=round(rss / MIB, 1),
            ram_used_mib=round((vm.total - vm.available) / MIB, 1),
            ram_available_mib=round(vm.available / MIB, 1),
            ram_total_mib=round(vm.total / MIB, 1),
            gpus=gpus,
            process_device_mib=device,
        )
        self.cost_cpu_s += time.thread_time() - started
        return sample

    def _record(self, sample: ResourceSample) -> None:
        self._samples.append(sample)
        self.g_cpu.set(sample.process_cpu_percent)
        self.g_rss.set(sample.process_rss_mib * MIB)
        self.g_ram_used.set(sample.ram_used_mib * MIB)
        self.g_ram_avail.set(sample.ram_available_mib * MIB)
        for gpu in sample.gpus:
            label = str(gpu.index)
            if gpu.utilization_percent is not None:
                self.g_gpu_util.labels(label).set(gpu.utilization_percent)
            self.g_gpu_mem.labels(label).set(gpu.memory_used_mib * MIB)
            self.g_gpu_total.labels(label).set(gpu.memory_total_mib * MIB)
            if gpu.temperature_c is not None:
                self.g_gpu_temp.labels(label).set(gpu.temperature_c)
            if gpu.power_w is not None:
                self.g_gpu_power.labels(label).set(gpu.power_w)
        self._update_pressure(sample)
        self.g_cost.set(self.cost_fraction)

    def _update_pressure(self, sample: ResourceSample) -> None:
        cfg = self.pressure_config
        if sample.ram_available_mib < cfg.min_available_mib:
            self._low_streak += 1
            self._ok_streak = 0
        else:
            self._ok_streak += 1
            self._low_streak = 0
        if not self.under_pressure and self._low_streak >= cfg.consecutive:
            self.under_pressure = True
            logger.warning(
                "host memory pressure: %.0f MiB available (floor %.0f MiB); /ready is 503",
                sample.ram_available_mib,
                cfg.min_available_mib,
            )
        elif self.under_pressure and self._ok_streak >= cfg.consecutive:
            self.under_pressure = False
            logger.info("host memory pressure cleared")
        self.g_pressure.set(1 if self.under_pressure else 0)

    def _dead_engines(self) -> tuple[tuple[int, ...], list[int]]:
        """The engine pids now and those of them that are gone or zombies (blocking)."""
        pids = tuple(self._engine_pids())
        dead = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    dead.append(pid)
            except psutil.NoSuchProcess:
                dead.append(pid)
            except psutil.Error:  # no permission to look: not evidence of death
                continue
        return pids, dead

    def _report_dead(self, pids: tuple[int, ...], dead: list[int]) -> None:
        # the model may have been swapped while the thread looked: only report the current one
        if not dead or self._on_engine_death is None or tuple(self._engine_pids()) != pids:
            return
        reason = f"engine process {', '.join(map(str, dead))} exited"
        self._on_engine_death(reason)

    async def _run(self) -> None:
        while True:
            try:
                sample = await asyncio.to_thread(self.sample)
                self._record(sample)
            except Exception:
                logger.exception("watchdog sample failed")
            await asyncio.sleep(self.interval_s)

    async def _watch_engines(self) -> None:
        """Check the engine's processes every `ENGINE_CHECK_S`, apart from the (slower) sample."""
        while True:
            await asyncio.sleep(min(self.ENGINE_CHECK_S, self.interval_s))
            if not self._engine_pids():
                continue  # nothing loaded, or an in-process engine: no thread hop at all
            try:
                pids, dead = await asyncio.to_thread(self._dead_engines)
                self._report_dead(pids, dead)
            except Exception:
                logger.exception("engine process check failed")

    async def start(self) -> None:
        """Start the background loops (idempotent)."""
        if self._task is None:
            self._started_wall = time.perf_counter()
            self.cost_cpu_s = 0.0
            self._task = asyncio.create_task(self._run(), name="resource-watchdog")
            self._engine_task = asyncio.create_task(self._watch_engines(), name="engine-watch")

    async def stop(self) -> None:
        """Stop the loops and wait for them."""
        for task in (self._task, self._engine_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._engine_task = None

    # --- readings ------------------------------------------------------------------------------

    @property
    def cost_fraction(self) -> float:
        """CPU seconds the watchdog spent per wall second since start (1.0 = one core)."""
        wall = time.perf_counter() - self._started_wall if self._started_wall else 0.0
        return self.cost_cpu_s / wall if wall > 0 else 0.0

    def samples(self, limit: int = 60) -> list[ResourceSample]:
        """The last `limit` samples, oldest first."""
        items = list(self._samples)
        return items[-limit:] if limit else []

    def tree_procs(self) -> list[psutil.Process]:
        """Process objects of our tree as of the last sample.

        Safe from any thread: the sampler replaces the dict whole, never mutates it.
        """
        return list(self._procs.values())

    def latest(self) -> ResourceSample | None:
        """The newest sample."""
        return self._samples[-1] if self._samples else None

    def window(self, start: float, end: float) -> WindowSummary:
        """Summary of samples with `start <= mono <= end` (perf_counter seconds)."""
        # newest first, stopping at the window's start: every request asks, and the whole
        # history (up to max_samples, 600 after ten minutes) scanned each time cost more than
        # the request's other telemetry (bench/overhead.py). Samples are appended in time
        # order on the event loop, which is where this runs too.
        inside = []
        for s in reversed(self._samples):
            if s.mono < start:
                break
            if s.mono <= end:
                inside.append(s)
        inside.reverse()
        if not inside:
            return WindowSummary(samples=0)
        utils = [
            g.utilization_percent
            for s in inside
            for g in s.gpus
            if g.utilization_percent is not None
        ]
        device = [sum(g.memory_used_mib for g in s.gpus) for s in inside if s.gpus]
        return WindowSummary(
            samples=len(inside),
            gpu_util_mean=round(statistics.fmean(utils), 1) if utils else None,
            device_memory_max_mib=round(max(device), 1) if device else None,
            cpu_percent_mean=round(statistics.fmean(s.process_cpu_percent for s in inside), 1),
            rss_max_mib=max(s.process_rss_mib for s in inside),
        )

    # --- guard rails ---------------------------------------------------------------------------

    def check_load(self, estimate: MemoryEstimate | None) -> None:
        """Refuse (503) a load whose estimate does not fit free host or device memory."""
        if estimate is None:
            return
        headroom = self.pressure_config.load_headroom
        checks = (
            ("host", estimate.host_mib, psutil.virtual_memory().available / MIB, "available"),
            ("device", estimate.device_mib, self.nvml.device_free_mib(), "free"),
        )
        for kind, need, have, word in checks:
            if need is not None and have is not None and need * headroom > have:
                raise InsufficientMemoryError(
                    f"load needs about {need:.0f} MiB of {kind} memory, {have:.0f} MiB is {word}",
                    details={f"need_{kind}_mib": round(need), f"{word}_{kind}_mib": round(have)},
                    headers={"Retry-After": "30"},
                )


class ServiceMemoryProbe:
    """The manager's and telemetry's memory probe: tree RSS, NVML device memory, torch allocator."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml

    def snapshot(
        self, pids: Sequence[int] = (), procs: Sequence[psutil.Process] | None = None
    ) -> MemorySnapshot:
        """Measure now; `procs` (the watchdog's cached tree) spares the scan of `/proc`."""
        if procs is None:
            procs = process_tree(pids)
        rss = rss_mib(procs)
        torch_mem = torch_allocator()
        device = self.nvml.device_used_mib()
        methods = ["psutil process-tree RSS"]
        if device is not None:
            methods.append("NVML device memory (all processes)")
        if torch_mem is not None:
            methods.append("torch CUDA allocator")
        return MemorySnapshot(
            rss_mib=rss,
            device_used_mib=None if device is None else round(device, 1),
            device_process_mib=self.nvml.process_used_mib(p.pid for p in procs)
            if device is not None
            else None,
            torch_allocated_mib=None if torch_mem is None else round(torch_mem[0], 1),
            method=" + ".join(methods),
        )
