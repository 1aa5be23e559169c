"""Streams on a real uvicorn: client disconnect, unload mid-stream, drain, non-stream cancel."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from helpers import ADMIN, API, LiveServer, chat_body


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until `predicate()` holds (fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def echo_adapter(server: LiveServer) -> Any:
    """The live app's echo adapter instance."""
    return server.app.state.manager.current.adapter


def load_slow(server: LiveServer, delay_ms: int = 50) -> None:
    """Load echo with a per-token delay so streams stay open for a while."""
    r = httpx.post(
        f"{server.url}/v1/model/load",
        json={"preset": "echo", "engine_params": {"token_delay_ms": delay_ms}},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text


LONG = " ".join(f"w{i}" for i in range(200))


def test_disconnect_stops_generation_and_frees_slot(app_factory: Any) -> None:
    """Closing the connection mid-stream runs the adapter's finally and frees the slot."""
    with LiveServer(app_factory(max_concurrency=1, max_queue=0)) as server:
        load_slow(server)
        adapter = echo_adapter(server)
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=chat_body(LONG, stream=True),
            headers={**API, "x-request-id": "gone-1"}, timeout=30,
        ) as r:  # fmt: skip
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
        wait_for(lambda: ("gone-1", "cancelled") in adapter.finished)
        assert not adapter.active
        admission = server.app.state.admission
        wait_for(lambda: admission.running == 0)
        # the only slot is free again: the next request is admitted, not 429
        r = httpx.post(
            f"{server.url}/v1/chat/completions", json=chat_body("quick"), headers=API, timeout=30
        )
        assert r.status_code == 200
        records = httpx.get(f"{server.url}/v1/telemetry", headers=ADMIN).json()["records"]
        gone = next(rec for rec in records if rec["request_id"] == "gone-1")
        assert gone["status"] == "cancelled"
        assert gone["completion_tokens"] < 200


def test_non_streaming_disconnect_cancels_generation(app_factory: Any) -> None:
    """A non-streaming client that hangs up stops the generation too."""
    with LiveServer(app_factory()) as server:
        load_slow(server)
        adapter = echo_adapter(server)
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/v1/chat/completions",
                json=chat_body(LONG),
                headers={**API, "x-request-id": "gone-2"},
                timeout=0.5,
            )
        wait_for(lambda: ("gone-2", "cancelled") in adapter.finished)
        assert not adapter.active


def test_unload_while_streaming_ends_stream_with_error_event(app_factory: Any) -> None:
    """Unload past its drain timeout ends open streams with an error event, then [DONE]."""
    with LiveServer(app_factory()) as server:
        load_slow(server)
        events: list[str] = []

        def consume() -> None:
            with httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=chat_body(LONG, stream=True),
                headers=API, timeout=30,
            ) as r:  # fmt: skip
                events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

        t = threading.Thread(target=consume)
        t.start()
        wait_for(lambda: len(events) >= 2)
        r = httpx.post(
            f"{server.url}/v1/model/unload",
            json={"drain_timeout_s": 0.2},
            headers=ADMIN,
            timeout=30,
        )
        t.join(timeout=30)
        body = r.json()
        assert body["status"] == "unloaded"
        assert body["aborted"] == 1
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "model_unloaded"
        assert err["type"] == "service_unavailable"


def test_unload_drains_requests_that_finish_in_time(app_factory: Any) -> None:
    """In-flight requests that finish within the drain timeout complete normally."""
    with LiveServer(app_factory()) as server:
        load_slow(server, delay_ms=20)
        results: list[int] = []

        def ask() -> None:
            r = httpx.post(
                f"{server.url}/v1/chat/completions", json=chat_body(" ".join("abcdefghij" * 3)),
                headers=API, timeout=30,
            )  # fmt: skip
            results.append(r.status_code)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
        manager = server.app.state.manager
        wait_for(lambda: manager.in_flight == 3)
        r = httpx.post(
            f"{server.url}/v1/model/unload", json={"drain_timeout_s": 10}, headers=ADMIN, timeout=30
        )
        for t in threads:
            t.join()
        assert results == [200, 200, 200]
        assert r.json()["drained"] == 3
        assert r.json()["aborted"] == 0
        # while unloading/empty, new requests are refused with 503
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), headers=API)
        assert r.status_code == 503
