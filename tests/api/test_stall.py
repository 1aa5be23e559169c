"""Clients that stop reading are cut after IW_STREAM_STALL_S; their slots serve others again."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import ADMIN, API, API_KEY, LiveServer, chat_body

STALL_S = 1.0
SLOTS = 2
#: one 16 KiB "token" repeated: every frame is large, so unread bytes pile up fast
BIG = "x" * 16_384


def wait_for(predicate: Any, timeout: float) -> float:
    """Poll until `predicate()` holds; the seconds it took (fails the test on timeout)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - started


@contextlib.contextmanager
def silent_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` raw connections that each ask for a long stream and never read a byte."""
    body = json.dumps(chat_body(BIG, stream=True, ignore_eos=True, max_tokens=30_000)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            # a small receive window: the server's buffers fill after little data
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(head + body)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def test_stalled_streams_are_cut_and_slots_return(
    app_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Never-reading clients holding every slot are cut; then chats succeed, in_flight is 0."""
    caplog.set_level(logging.INFO)
    app = app_factory(max_concurrency=SLOTS, max_queue=2, stream_stall_s=STALL_S)
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/v1/model/load", json={"preset": "echo"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        state = server.app.state
        with silent_clients(server.port, SLOTS):
            wait_for(lambda: state.admission.running == SLOTS, timeout=10)
            # the buffers fill within moments; the cut follows IW_STREAM_STALL_S after that
            took = wait_for(lambda: state.manager.in_flight == 0, timeout=STALL_S + 10)
            assert state.admission.running == 0
            assert state.stall.cuts == SLOTS
            status = httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json()
            assert status["in_flight"] == 0
            # the slots serve other clients again, while the silent sockets are still open
            for _ in range(SLOTS + 1):
                ok = httpx.post(
                    f"{server.url}/v1/chat/completions", json=chat_body(), headers=API, timeout=5
                )
                assert ok.status_code == 200, ok.text
        records = [rec.status for rec in state.telemetry.recent(10)]
        assert records.count("cancelled") == SLOTS
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors  # a cut is a disconnect, not an ASGI exception
        print(f"stall cut {took:.2f} s after the slots filled (IW_STREAM_STALL_S={STALL_S})")  # noqa: T201


def test_a_slow_but_reading_client_is_not_cut(app_factory: Any) -> None:
    """A client that reads slowly but steadily keeps its stream (progress resets the clock)."""
    app = app_factory(max_concurrency=SLOTS, max_queue=2, stream_stall_s=STALL_S)
    with LiveServer(app) as server:
        r = httpx.post(
            f"{server.url}/v1/model/load",
            json={"preset": "echo", "engine_params": {"token_delay_ms": 20}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        text = " ".join(f"w{i}" for i in range(150))  # about 3 s of tokens
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=chat_body(text, stream=True),
            headers=API, timeout=10,
        ) as resp:  # fmt: skip
            lines = [line for line in resp.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert server.app.state.stall.cuts == 0


def test_unload_does_not_wait_on_a_client_that_stopped_reading(app_factory: Any) -> None:
    """Unload with silent clients: their blocked sends are cut at once, not after the stall time."""
    app = app_factory(max_concurrency=SLOTS, max_queue=2, stream_stall_s=60.0)
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/v1/model/load", json={"preset": "echo"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        state = server.app.state
        with silent_clients(server.port, SLOTS):
            wait_for(lambda: state.admission.running == SLOTS, timeout=10)
            # wait until their sends block (the buffers are full)
            exchanges = server.app.exchanges  # type: ignore[attr-defined]
            wait_for(lambda: len(exchanges.blocked(0.2)) == SLOTS, timeout=10)
            started = time.monotonic()
            r = httpx.post(
                f"{server.url}/v1/model/unload", json={"drain_timeout_s": 0}, headers=ADMIN,
                timeout=30,
            )  # fmt: skip
            took = time.monotonic() - started
            assert r.status_code == 200, r.text
            assert r.json()["aborted"] == SLOTS
            assert state.manager.in_flight == 0
            assert state.admission.running == 0
            status = httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json()
            assert status["in_flight"] == 0
        assert took < 5, f"unload waited {took:.1f} s on clients that were gone"
