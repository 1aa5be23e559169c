"""An engine process that dies while no request runs is noticed by the watchdog within 2 s."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import psutil

from helpers import ADMIN, API, LiveServer, chat_body


def test_idle_engine_death_turns_ready_off_and_unloads(app_factory: Any) -> None:
    """Killing the engine's process: /ready 503 within 2 s, last_error says so, model unloaded."""
    with LiveServer(app_factory()) as server:
        r = httpx.post(
            f"{server.url}/v1/model/load",
            json={"preset": "echo", "engine_params": {"spawn_child": True}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        assert httpx.get(f"{server.url}/ready").status_code == 200
        (pid,) = server.app.state.manager.current.info.engine_pids
        assert psutil.Process(pid).is_running()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while httpx.get(f"{server.url}/ready").status_code == 200:
            assert time.monotonic() - killed < 2.0, "/ready still 200 two seconds after the death"
            time.sleep(0.02)
        noticed = time.monotonic() - killed
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json())[
            "state"
        ] != "empty":
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert "engine died" in status["last_error"]
        assert str(pid) in status["last_error"]
        assert not psutil.pid_exists(pid)  # reaped by the unload, not left a zombie
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), headers=API)
        assert refused.status_code == 503
        # the next load starts clean
        r = httpx.post(f"{server.url}/v1/model/load", json={"preset": "echo"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        print(f"idle engine death noticed after {noticed:.2f} s")  # noqa: T201


def test_a_live_engine_child_keeps_the_model_ready(app_factory: Any) -> None:
    """A healthy engine with a live child stays ready (the check does not cry wolf)."""
    with LiveServer(app_factory()) as server:
        r = httpx.post(
            f"{server.url}/v1/model/load",
            json={"preset": "echo", "engine_params": {"spawn_child": True}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        (pid,) = server.app.state.manager.current.info.engine_pids
        time.sleep(2.5)  # more than two watchdog samples
        assert httpx.get(f"{server.url}/ready").status_code == 200
        r = httpx.post(f"{server.url}/v1/model/unload", json={}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert not psutil.pid_exists(pid)  # unload stops and reaps the child
        assert server.app.state.manager.last_error is None
