"""`replace` without an outage: swaps keep serving, failed loads roll back, waits are bounded."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
from litestar.testing import TestClient

from helpers import ADMIN, API, TEST_REGISTRY, LiveServer, chat_body

SWAP_REGISTRY = TEST_REGISTRY.replace(
    "models:\n",
    "  transformers:\n    module: adapters.transformers:TransformersAdapter\nmodels:\n",
)


def _quick_settle(app: Any) -> None:
    """The unload's settle poll waits for RSS to stop moving; these tests judge no memory."""
    app.state.manager.memory.settle_timeout_s = 0.0


def _status(client: Any) -> dict[str, Any]:
    return client.get("/v1/model/status", headers=ADMIN).json()  # type: ignore[no-any-return]


def test_failed_replace_rolls_back_and_keeps_serving(client: Any) -> None:
    """A replace whose load fails restores the previous model: `rolled_back`, cause in status."""
    _quick_settle(client.app)
    assert client.post("/v1/model/load", json={"preset": "echo"}, headers=ADMIN).status_code == 200
    r = client.post(
        "/v1/model/load",
        json={
            "preset": "echo",
            "served_model_name": "next",
            "replace": True,
            "engine_params": {"fail_on_load": "weights are corrupt"},
        },
        headers=ADMIN,
    )
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["rolled_back"] is True
    assert body["status"] == "rolled_back"
    assert body["error"]["code"] == "engine_error"
    assert "weights are corrupt" in body["error"]["message"]
    assert body["plan"]["served_model_name"] == "echo"
    status = _status(client)
    assert status["state"] == "ready"
    assert status["plan"]["served_model_name"] == "echo"
    assert "weights are corrupt" in status["last_error"]
    assert client.post("/v1/chat/completions", json=chat_body(), headers=API).status_code == 200


def _hammer(url: str, stop: threading.Event, codes: Counter[int], lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, headers=API, timeout=30) as http:
        while not stop.is_set():
            stream = len(codes) % 2 == 0
            r = http.post("/v1/chat/completions", json=chat_body(stream=stream))
            with lock:
                codes[r.status_code] += 1


def test_sixteen_clients_see_no_failure_during_two_swaps(app_factory: Any) -> None:
    """16 clients looping requests through an unload-first swap and an alongside swap: all 200."""
    with LiveServer(app_factory()) as server:
        _quick_settle(server.app)
        admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
        assert admin.post("/v1/model/load", json={"preset": "echo"}).status_code == 200
        stop, lock, codes = threading.Event(), threading.Lock(), Counter[int]()
        threads = [
            threading.Thread(target=_hammer, args=(server.url, stop, codes, lock))
            for _ in range(16)
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            # no memory estimate: the old model goes first and requests wait for the new one
            first = admin.post(
                "/v1/model/load",
                json={"preset": "echo", "replace": True, "engine_params": {"load_delay_ms": 400}},
            )
            time.sleep(0.3)
            # an estimate that fits: the new model loads beside the old one
            second = admin.post(
                "/v1/model/load",
                json={
                    "preset": "echo",
                    "replace": True,
                    "engine_params": {"load_delay_ms": 400, "claims_memory_mib": 1},
                },
            )
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            admin.close()
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert (first.json()["swap"], second.json()["swap"]) == ("unload_first", "alongside")
    assert set(codes) == {200}, codes
    assert sum(codes.values()) > 16


def test_request_during_swap_waits_and_is_served_by_the_new_model(app_factory: Any) -> None:
    """A request that arrives mid-swap waits, then runs on the model loaded under its name."""
    with TestClient(app_factory()) as client:
        _quick_settle(client.app)
        assert client.post("/v1/model/load", json={"preset": "echo"}, headers=ADMIN).status_code
        result: dict[str, Any] = {}

        def swap() -> None:
            result["load"] = client.post(
                "/v1/model/load",
                json={
                    "preset": "echo",
                    "served_model_name": "echo-2",
                    "replace": True,
                    "engine_params": {"load_delay_ms": 800},
                },
                headers=ADMIN,
            )

        t = threading.Thread(target=swap)
        t.start()
        deadline = time.monotonic() + 5
        while _status(client)["state"] != "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = client.post("/v1/chat/completions", json=chat_body(model="echo-2"), headers=API)
        t.join()
        assert result["load"].status_code == 200
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "echo-2"


def test_the_wait_is_bounded_by_iw_swap_wait_s(app_factory: Any) -> None:
    """A load that outlasts IW_SWAP_WAIT_S answers waiting requests 503 saying a load runs."""
    with TestClient(app_factory(swap_wait_s=0.3)) as client:
        t = threading.Thread(
            target=client.post,
            args=("/v1/model/load",),
            kwargs={
                "json": {"preset": "echo", "engine_params": {"load_delay_ms": 2000}},
                "headers": ADMIN,
            },
        )
        t.start()
        deadline = time.monotonic() + 5
        while _status(client)["state"] != "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        r = client.post("/v1/chat/completions", json=chat_body(), headers=API)
        waited = time.monotonic() - started
        t.join()
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert "a load is still in progress" in r.json()["error"]["message"]
    assert 0.25 < waited < 1.9


def test_empty_answers_503_at_once(client: Any) -> None:
    """With nothing loaded and nothing loading, requests do not wait: 503 saying what to do."""
    started = time.monotonic()
    r = client.post("/v1/chat/completions", json=chat_body(), headers=API)
    assert time.monotonic() - started < 1.0
    assert r.status_code == 503
    assert r.json()["error"]["message"] == "no model is loaded: load one with POST /v1/model/load"


def test_unreachable_hub_model_is_refused_fast_and_the_old_model_stays(app_factory: Any) -> None:
    """A hub id this machine cannot reach is a 422 in seconds; the serving model stays."""
    with TestClient(app_factory(registry_text=SWAP_REGISTRY)) as client:
        assert client.post("/v1/model/load", json={"preset": "echo"}, headers=ADMIN).status_code
        body = {"backend": "transformers", "model": "iw-test-org/no-such-model", "replace": True}
        for path in ("/v1/model/validate", "/v1/model/load"):
            started = time.monotonic()
            r = client.post(path, json=body, headers=ADMIN)
            assert time.monotonic() - started < 10, path
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "model_unreachable"
            assert "iw-test-org/no-such-model" in r.json()["error"]["message"]
        status = _status(client)
        assert status["state"] == "ready"
        assert status["plan"]["served_model_name"] == "echo"
