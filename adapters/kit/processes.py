"""The engine child-process reaper: find the processes an engine started, kill what outlives it.

Engines such as vLLM run their core in child processes and stop them in `shutdown()`; when that
fails or hangs, the children keep their memory (GBs of weights and KV cache) after the unload
reported success. The rule, written once:

- before a load, `ChildProcesses.snapshot()` records our descendants;
- after it, `started()` is what the engine added (reported as `LoadInfo.engine_pids`);
- after the engine's own shutdown, `reap(pids, timeout)` waits up to `timeout` seconds for them to
  exit and kills (SIGKILL) what is left.

multiprocessing's resource tracker is never counted: it is shared by everything in the process
and outlives any one engine.

Must never: kill a process that was not a descendant of ours started after the snapshot (or named
by the engine); block longer than `timeout` plus the kill's short wait; raise for a process that
is already gone.
"""

from __future__ import annotations

import contextlib

import psutil

__all__ = ["KILL_WAIT_S", "ChildProcesses", "child_pids", "reap"]

#: seconds to wait for a killed process to be gone
KILL_WAIT_S = 5.0


def child_pids() -> set[int]:
    """Our descendant processes, minus multiprocessing's resource tracker (it outlives engines)."""
    pids: set[int] = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "multiprocessing.resource_tracker" in " ".join(child.cmdline()):
                continue
            pids.add(child.pid)
    return pids


def reap(pids: set[int] | frozenset[int], timeout: float) -> list[int]:
    """Wait up to `timeout` s for `pids` to exit, then kill what is left; return the killed pids.

    Blocking: call it in a worker thread from async code.
    """
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    if not procs:
        return []
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=KILL_WAIT_S)
    return [p.pid for p in alive]


class ChildProcesses:
    """The processes one load started: snapshot before, difference after, reap on unload."""

    def __init__(self) -> None:
        self._before: set[int] | None = None

    def snapshot(self) -> None:
        """Record our descendants now (call right before the engine starts)."""
        self._before = child_pids()

    def started(self) -> set[int]:
        """Descendants added since the snapshot (empty without one)."""
        if self._before is None:
            return set()
        return child_pids() - self._before

    def reap(
        self, known: set[int] | frozenset[int] = frozenset(), timeout: float = 10.0
    ) -> list[int]:
        """Reap `known` plus whatever appeared since the snapshot; forget the snapshot."""
        leftovers = set(known) | self.started()
        self._before = None
        return reap(leftovers, timeout)
