"""SIGTERM on a real `python -m service serve`: refuse new work, drain, end streams, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from helpers import API, TEST_REGISTRY, ServiceProcess, chat_body, free_port, sse_events

DRAIN_S = 2.0
STREAMS = 8
#: long enough that a stream at 20 ms per token outlives the drain
LONG = " ".join(f"w{i}" for i in range(2000))
SHORT = " ".join(f"s{i}" for i in range(40))  # about 0.8 s: finishes inside the drain


class StreamClient(threading.Thread):
    """One streaming chat in a thread; keeps every SSE payload it received."""

    def __init__(self, url: str, text: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.text = text
        self.started = threading.Event()
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        """Stream until the server ends the response."""
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions",
                json=chat_body(self.text, model="slow-echo", stream=True), headers=API, timeout=30,
            ) as r:  # fmt: skip
                assert r.status_code == 200, r.read()
                buffer = ""
                for chunk in r.iter_text():
                    buffer += chunk
                    *blocks, buffer = buffer.split("\n\n")
                    self.events.extend(sse_events("\n\n".join(blocks) + "\n\n"))
                    if self.events:
                        self.started.set()
        except BaseException as exc:  # the test reports it
            self.error = exc
        finally:
            self.started.set()


def start_service(tmp_path: Path, drain_s: float, health_port: int) -> ServiceProcess:
    """The service with the slow echo preset preloaded, a short drain, a liveness port."""
    registry = tmp_path / "adapters.yaml"
    registry.write_text(TEST_REGISTRY)
    env = {
        "IW_PRELOAD": "slow-echo",
        "IW_DRAIN_TIMEOUT_S": str(drain_s),
        "IW_HEALTH_PORT": str(health_port),
    }
    return ServiceProcess(tmp_path, env, registry=registry)


def wait_ready(url: str) -> None:
    """Poll /ready until the preload finished."""
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "preload never became ready"
        time.sleep(0.1)


def open_streams(url: str, texts: list[str]) -> list[StreamClient]:
    """Start one streaming client per text and wait until each has its first event."""
    clients = [StreamClient(url, text) for text in texts]
    for c in clients:
        c.start()
    for c in clients:
        assert c.started.wait(20), "a stream never started"
        assert c.error is None, c.error
    return clients


def check_ending(client: StreamClient) -> str:
    """A stream ended well: `[DONE]` last, after a finish chunk or a `shutting_down` error."""
    client.join(timeout=15)
    assert not client.is_alive(), "a client never saw its stream end"
    assert client.error is None, f"stream broke: {client.error!r}"
    assert client.events[-1] == "[DONE]", client.events[-3:]
    last: dict[str, Any] = json.loads(client.events[-2])
    if "error" in last:
        assert last["error"]["code"] == "shutting_down", last
        return "cut"
    assert last["choices"][-1]["finish_reason"] == "stop", last
    return "finished"


def test_sigterm_drains_then_ends_streams_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM: /ready 503 at once, /health 200, new chats 503, streams end well, exit 0."""
    health_port = free_port()
    with start_service(tmp_path, DRAIN_S, health_port) as svc:
        wait_ready(svc.url)
        clients = open_streams(svc.url, [SHORT] * 2 + [LONG] * (STREAMS - 2))
        plain: list[httpx.Response] = []
        waiting = threading.Thread(
            target=lambda: plain.append(
                httpx.post(
                    f"{svc.url}/v1/chat/completions", json=chat_body(LONG, model="slow-echo"),
                    headers=API, timeout=30,
                )
            ),
            daemon=True,
        )  # fmt: skip
        waiting.start()
        time.sleep(0.3)  # admitted before the signal
        assert svc.proc is not None
        sent = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{svc.url}/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{svc.url}/health", timeout=5).status_code == 200
        # the liveness listener on its own port answers throughout the drain too
        live = httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=5)
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        refused = httpx.post(
            f"{svc.url}/v1/chat/completions", json=chat_body(model="slow-echo"), headers=API
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        rc = svc.proc.wait(timeout=DRAIN_S + 10)
        took = time.monotonic() - sent
        outcomes = sorted(check_ending(c) for c in clients)
        waiting.join(timeout=10)
        log = svc.log()
    assert rc == 0, log[-3000:]
    # the non-streaming request that outlived the drain got a 503 envelope, not a broken socket
    assert [p.status_code for p in plain] == [503]
    assert plain[0].json()["error"]["code"] == "shutting_down"
    assert DRAIN_S <= took <= DRAIN_S + 10
    assert outcomes == ["cut"] * (STREAMS - 2) + ["finished"] * 2
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log
    assert "model state -> empty" in log  # the engine was unloaded before the exit
    print(f"SIGTERM to exit with {STREAMS} streams: {took:.2f} s (drain {DRAIN_S} s)")  # noqa: T201


def test_second_sigterm_skips_the_drain(tmp_path: Path) -> None:
    """A second SIGTERM ends the drain at once: streams get `shutting_down`, exit 0 quickly."""
    with start_service(tmp_path, 60.0, free_port()) as svc:
        wait_ready(svc.url)
        clients = open_streams(svc.url, [LONG] * 2)
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert svc.proc.poll() is None  # still draining: the drain is 60 s
        sent = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        rc = svc.proc.wait(timeout=10)
        took = time.monotonic() - sent
        outcomes = [check_ending(c) for c in clients]
        log = svc.log()
    assert rc == 0, log[-3000:]
    assert took < 5
    assert outcomes == ["cut", "cut"]
    assert "Exception in ASGI application" not in log
