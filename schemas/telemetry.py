"""Telemetry value classes shared by the lifecycle manager and the service's telemetry.

Must never: carry a label or field that could hold a secret (no env values, no prompt text).
"""

from __future__ import annotations

from attrs import frozen


@frozen
class MemorySnapshot:
    """Memory at one instant, in MiB; `None` where the source is unavailable (no NVML)."""

    rss_mib: float
    """Resident memory of this process and its descendants (engine processes included)."""
    device_used_mib: float | None = None
    """NVML device memory in use on the engine's GPUs, all processes."""
    device_process_mib: float | None = None
    """NVML per-process device memory of our process tree, where NVML reports it."""
    torch_allocated_mib: float | None = None
    """torch CUDA allocator's allocated bytes (in-process engines only)."""
    method: str = "psutil process-tree RSS"
