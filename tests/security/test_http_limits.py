"""HTTP edge limits on a real uvicorn: header size and count, read timeouts, idle and cap."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from helpers import API_KEY, LiveServer
from service.http_limits import server_options
from service.settings import Settings, SettingsError

MiB = 1024 * 1024


@pytest.fixture
def edge(app_factory: Any) -> Iterator[LiveServer]:
    """A live server with short timeouts so the tests stay quick."""
    app = app_factory(
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        keepalive_s=1.0,
        max_connections=16,
        max_header_bytes=16 * 1024,
        max_headers=50,
    )
    with LiveServer(app) as server:
        yield server


def _connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.settimeout(5)
    return sock


def _read_response(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or `limit_s` passes)."""
    deadline = time.monotonic() + limit_s
    out = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


def _status_and_error(raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), json.loads(body), headers


def _send_all(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating the server closing on us half-way (that is the point)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def test_oversized_header_block_is_431_with_envelope(edge: LiveServer) -> None:
    """A header block over IW_MAX_HEADER_BYTES gets 431 in the envelope with x-request-id."""
    with _connect(edge) as sock:
        _send_all(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024)
        status, body, headers = _status_and_error(_read_response(sock))
    assert status == 431
    assert body["error"]["code"] == "request_header_fields_too_large"
    assert "IW_MAX_HEADER_BYTES" in body["error"]["message"]
    assert headers["x-request-id"]


def test_too_many_headers_is_431(edge: LiveServer) -> None:
    """More header fields than IW_MAX_HEADERS gets 431, not a served request."""
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    with _connect(edge) as sock:
        _send_all(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        status, body, _ = _status_and_error(_read_response(sock))
    assert status == 431
    assert "IW_MAX_HEADERS" in body["error"]["message"]


def test_headers_under_the_limits_are_served(edge: LiveServer) -> None:
    """A normal request with a few dozen headers still gets its 200."""
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    with _connect(edge) as sock:
        _send_all(
            sock, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + many + b"\r\n"
        )
        raw = _read_response(sock)
    assert raw.startswith(b"HTTP/1.1 200")


def test_trickled_headers_time_out_with_408(edge: LiveServer) -> None:
    """A client sending its headers a byte at a time is cut off with 408 after the timeout."""
    started = time.monotonic()
    with _connect(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for byte in b"X-Slow: " + b"z" * 40:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                pass
            sock.settimeout(5)
        sock.settimeout(5)
        status, body, _ = _status_and_error(_read_response(sock))
    assert status == 408
    assert "IW_HEADER_TIMEOUT_S" in body["error"]["message"]
    assert time.monotonic() - started < 3.5


def test_trickled_body_times_out_with_408(edge: LiveServer) -> None:
    """A body that trickles in slower than IW_BODY_TIMEOUT_S allows is cut off with 408."""
    started = time.monotonic()
    with _connect(edge) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        raw = b""
        for _ in range(40):
            _send_all(sock, b" ")
            time.sleep(0.1)
            sock.settimeout(0.01)
            try:
                raw = sock.recv(65536)
            except TimeoutError:
                continue
            finally:
                sock.settimeout(5)
            break
        raw += _read_response(sock)
    status, body, _ = _status_and_error(raw)
    assert status == 408
    assert "IW_BODY_TIMEOUT_S" in body["error"]["message"]
    assert time.monotonic() - started < 3.5


def test_silent_connection_is_closed(edge: LiveServer) -> None:
    """A connection that never sends a byte is closed after the header timeout."""
    with _connect(edge) as sock:
        started = time.monotonic()
        assert _read_response(sock, limit_s=4) == b""
        assert time.monotonic() - started < 3


def test_idle_keepalive_connection_is_closed(edge: LiveServer) -> None:
    """After a response, an idle keep-alive connection is closed after IW_KEEPALIVE_S."""
    with _connect(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert _read_response(sock, limit_s=5) == b""
        assert time.monotonic() - started < 3


def test_connections_beyond_the_cap_get_503(edge: LiveServer) -> None:
    """Past IW_MAX_CONNECTIONS open connections, the next one is answered 503 and closed."""
    held = [_connect(edge) for _ in range(16)]
    try:
        time.sleep(0.2)  # let the server register them
        with _connect(edge) as extra:
            status, body, _ = _status_and_error(_read_response(extra))
        assert status == 503
        assert body["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()


def test_malformed_http_gets_the_envelope(edge: LiveServer) -> None:
    """The 400 for malformed HTTP carries the JSON envelope and an x-request-id."""
    with _connect(edge) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, body, headers = _status_and_error(_read_response(sock))
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]


def _attack(port: int, stop: threading.Event, sent: list[int]) -> None:
    """Send up to 64 MiB of one unterminated header, as fast as the server takes it."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    chunk = b"a" * MiB
    with sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(64):
                if stop.is_set():
                    return
                sock.sendall(chunk)
                sent.append(len(chunk))
        except OSError:
            return


def test_header_flood_keeps_memory_and_health(edge: LiveServer) -> None:
    """8 clients sending 64 MiB headers: RSS stays bounded and /health answers within 1 s."""
    process = psutil.Process()
    before = process.memory_info().rss
    stop = threading.Event()
    sent: list[int] = []
    threads = [
        threading.Thread(target=_attack, args=(edge.port, stop, sent), daemon=True)
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    latencies = []
    try:
        with httpx.Client(base_url=edge.url, timeout=1.0) as client:
            for _ in range(10):
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    growth = (process.memory_info().rss - before) / MiB
    assert max(latencies) < 1.0
    # the server refuses after 16 KiB, so no client got its 64 MiB through
    assert sum(sent) < 8 * 64 * MiB
    assert growth < 64, f"RSS grew by {growth:.0f} MiB"


def test_limits_come_from_iw_settings() -> None:
    """The IW_* edge settings parse and reach the protocol uvicorn is given."""
    settings = Settings.from_env(
        {
            "IW_MAX_HEADER_BYTES": "2048",
            "IW_MAX_HEADERS": "7",
            "IW_HEADER_TIMEOUT_S": "3.5",
            "IW_BODY_TIMEOUT_S": "9",
            "IW_KEEPALIVE_S": "0.5",
            "IW_MAX_CONNECTIONS": "12",
        }
    )
    options = server_options(settings)
    limits = options["http"].limits
    assert (limits.max_header_bytes, limits.max_headers, limits.max_connections) == (2048, 7, 12)
    assert (limits.header_timeout_s, limits.body_timeout_s) == (3.5, 9.0)
    assert options["timeout_keep_alive"] == 1  # uvicorn takes whole seconds; never 0
    with pytest.raises(SettingsError):
        Settings.from_env({"IW_MAX_HEADERS": "0"})
