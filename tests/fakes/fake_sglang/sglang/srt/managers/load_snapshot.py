"""Fake load snapshots: managers/load_snapshot.py:196 `LoadSnapshot` and its reader's `read_all`."""

from __future__ import annotations

from collections.abc import Callable

import msgspec


class LoadSnapshot(msgspec.Struct, omit_defaults=True):
    """load_snapshot.py:196-221, the fields the adapter reads (names and defaults as real)."""

    timestamp: float = 0.0
    dp_rank: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    max_running_requests: int = 0
    token_usage: float = 0.0
    gen_throughput: float = 0.0
    cache_hit_rate: float = 0.0


class ShmLoadSnapshotReader:
    """load_snapshot.py:430; `read_all` (line 509) returns one snapshot per DP rank."""

    def __init__(self, sample: Callable[[], list[LoadSnapshot]]) -> None:
        self._sample = sample

    def read_all(self) -> list[LoadSnapshot]:
        """What the scheduler published last (here: computed from the fake scheduler now)."""
        return self._sample()
