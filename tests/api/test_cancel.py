"""A client that hangs up is `cancelled`, recorded once, and never logged as an engine error."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import httpx
import pytest

from helpers import ADMIN, API, LiveServer, chat_body

LONG = " ".join(f"w{i}" for i in range(200))


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll until `predicate()` holds (fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_is_recorded_once_as_cancelled(
    app_factory: Any, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    """Hanging up mid-generation: one `cancelled` record, counter too, and no ERROR log line."""
    with LiveServer(app_factory()) as server:
        r = httpx.post(
            f"{server.url}/v1/model/load",
            json={"preset": "echo", "engine_params": {"token_delay_ms": 50}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        state = server.app.state
        adapter = state.manager.current.adapter
        rid = f"hang-up-{stream}"
        caplog.set_level(logging.INFO)
        # a non-streaming client times out waiting; a streaming one reads a frame and leaves
        with (
            contextlib.suppress(httpx.ReadTimeout),
            httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=chat_body(LONG, stream=stream),
                headers={**API, "x-request-id": rid}, timeout=0.5,
            ) as r,
        ):  # fmt: skip
            next(r.iter_lines())
        wait_for(lambda: (rid, "cancelled") in adapter.finished)
        wait_for(lambda: state.manager.in_flight == 0)
        records = [rec for rec in state.telemetry.recent(100) if rec.request_id == rid]
        assert [rec.status for rec in records] == ["cancelled"]
        counted = state.telemetry.registry.get_sample_value(
            "iw_requests_total",
            {"model": "echo", "backend": "echo", "status": "cancelled", "finish_reason": "none"},
        )
        assert counted == 1
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert not errors, [rec.getMessage() for rec in errors]
        assert state.admission.running == 0
