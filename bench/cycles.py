"""Does memory creep over load/unload cycles? N cycles per backend, RSS after each unload.

Drives the real `ModelManager` in this process (the same code path as `POST /v1/model/load` and
`/unload`), or a live server with `--url`, and prints per cycle the memory after the unload (RSS of
the process tree, and device memory when NVML sees a GPU) with the unload's own verdict, then the
trend: least-squares slope in MiB per cycle and total growth from the first to the last cycle.
Exit status 1 when the growth exceeds `--max-growth-mib` (the issue's bound: 50 MiB over 100
transformers cycles).

    .venv/bin/python bench/cycles.py --backend transformers --cycles 100
    .venv/bin/python bench/cycles.py --backend echo --backend transformers --cycles 20
    .venv/bin/python bench/cycles.py --backend vllm --cycles 5      # minutes per cycle on CPU
    .venv/bin/python bench/cycles.py --url http://127.0.0.1:8000 --admin-key K --backend echo

Must never: leave a model loaded when it stops (every cycle unloads, also after an error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from registry.manager import ModelManager  # noqa: E402
from registry.memory import MemoryLedger  # noqa: E402
from registry.registry import AdapterRegistry  # noqa: E402
from registry.secrets import SecretStore  # noqa: E402
from schemas.control import LoadRequest, UnloadResponse  # noqa: E402
from schemas.converter import unstructure  # noqa: E402

#: what one cycle loads, per backend (the presets of the project's adapters.yaml)
LOADS: dict[str, dict[str, Any]] = {
    "echo": {"preset": "echo"},
    "transformers": {"preset": "smollm2-135m"},
    "vllm": {"preset": "smollm2-135m-vllm"},
}


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of `values` over their index (MiB per cycle); 0 for fewer than 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def _row(cycle: int, report: dict[str, Any], load_s: float) -> dict[str, Any]:
    memory = report.get("memory") or {}
    return {
        "cycle": cycle,
        "rss_mib": memory.get("rss_after_mib"),
        "device_mib": memory.get("device_after_mib"),
        "vs_first_mib": report.get("memory_vs_first_baseline_mib"),
        "vs_previous_mib": report.get("memory_vs_previous_unload_mib"),
        "returned": report.get("memory_returned"),
        "load_s": round(load_s, 2),
    }


async def _local_cycles(backend: str, cycles: int, settle_s: float) -> list[dict[str, Any]]:
    registry = AdapterRegistry.from_file(_ROOT / "adapters.yaml", use_entry_points=False)
    manager = ModelManager(registry, SecretStore(), memory=MemoryLedger(settle_timeout_s=settle_s))
    rows = []
    for cycle in range(1, cycles + 1):
        started = time.perf_counter()
        try:
            await manager.load(LoadRequest(**LOADS[backend]))
            load_s = time.perf_counter() - started
        finally:
            report: UnloadResponse = await manager.unload(drain_timeout_s=5)
        rows.append(_row(cycle, unstructure(report), load_s))
        _print_row(backend, rows[-1])
    return rows


def _remote_cycles(url: str, key: str, backend: str, cycles: int) -> list[dict[str, Any]]:
    import httpx  # noqa: PLC0415  (only this mode needs an HTTP client)

    headers = {"X-API-Key": key}
    rows = []
    with httpx.Client(base_url=url, headers=headers, timeout=900) as client:
        for cycle in range(1, cycles + 1):
            started = time.perf_counter()
            try:
                r = client.post("/v1/model/load", json=LOADS[backend])
                r.raise_for_status()
                load_s = time.perf_counter() - started
            finally:
                report = client.post("/v1/model/unload", json={"drain_timeout_s": 5}).json()
            rows.append(_row(cycle, report, load_s))
            _print_row(backend, rows[-1])
    return rows


def _print_row(backend: str, row: dict[str, Any]) -> None:
    device = f" device {row['device_mib']:.0f} MiB" if row["device_mib"] is not None else ""
    print(
        f"{backend} cycle {row['cycle']:4d}: RSS {row['rss_mib']:8.1f} MiB{device}"
        f"  vs first {row['vs_first_mib']!s:>6}  vs previous {row['vs_previous_mib']!s:>6}"
        f"  returned {row['returned']}  load {row['load_s']} s",
        flush=True,
    )


def summarise(backend: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """First/last RSS, slope (MiB/cycle) and total growth; device figures when present."""
    rss = [float(r["rss_mib"]) for r in rows]
    summary: dict[str, Any] = {
        "backend": backend,
        "cycles": len(rows),
        "rss_first_mib": rss[0],
        "rss_last_mib": rss[-1],
        "rss_growth_mib": round(rss[-1] - rss[0], 1),
        "rss_slope_mib_per_cycle": round(slope(rss), 3),
        "unloads_not_returned": sum(1 for r in rows if r["returned"] is False),
    }
    device = [float(r["device_mib"]) for r in rows if r["device_mib"] is not None]
    if len(device) == len(rows):
        summary["device_growth_mib"] = round(device[-1] - device[0], 1)
        summary["device_slope_mib_per_cycle"] = round(slope(device), 3)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cycles, print rows and one JSON summary per backend; 1 when growth is too big."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", choices=sorted(LOADS), help="repeatable; default echo"
    )
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--settle-s", type=float, default=10.0, help="unload's settle timeout")
    parser.add_argument("--max-growth-mib", type=float, default=50.0)
    parser.add_argument("--url", help="drive a live server instead of an in-process manager")
    parser.add_argument("--admin-key", default="", help="with --url: the admin key")
    args = parser.parse_args(argv)
    failed = False
    for backend in args.backend or ["echo"]:
        if args.url:
            rows = _remote_cycles(args.url, args.admin_key, backend, args.cycles)
        else:
            rows = asyncio.run(_local_cycles(backend, args.cycles, args.settle_s))
        summary = summarise(backend, rows)
        print(json.dumps(summary), flush=True)
        failed = failed or summary["rss_growth_mib"] > args.max_growth_mib
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
