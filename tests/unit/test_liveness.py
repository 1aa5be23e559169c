"""The liveness listener (IW_HEALTH_PORT): /health only, 503 when the event loop stalls, bounded."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from service.server import _ProbeServer
from service.settings import Settings, SettingsError


@pytest.fixture
def probe() -> Iterator[tuple[str, list[bool]]]:
    """A listener on a free port whose loop-alive answer the test controls."""
    alive = [True]
    server = _ProbeServer(("127.0.0.1", 0), lambda: alive[0])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", alive
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_health_is_200_while_the_loop_ticks_and_503_when_it_stalls(
    probe: tuple[str, list[bool]],
) -> None:
    """GET /health: 200 `ok` while the loop ticks; 503 once it has stopped ticking."""
    url, alive = probe
    r = httpx.get(f"{url}/health")
    assert (r.status_code, r.json(), r.headers["cache-control"]) == (
        200,
        {"status": "ok"},
        "no-store",
    )
    alive[0] = False
    assert httpx.get(f"{url}/health?x=1").status_code == 503


def test_other_paths_methods_and_head(probe: tuple[str, list[bool]]) -> None:
    """Only GET/HEAD /health: other paths 404, other methods 400, HEAD has no body."""
    url, _ = probe
    assert httpx.get(f"{url}/ready").status_code == 404
    assert httpx.post(f"{url}/health").status_code == 400
    head = httpx.head(f"{url}/health")
    assert (head.status_code, head.content) == (200, b"")


def test_a_silent_connection_does_not_block_the_listener_for_long(
    probe: tuple[str, list[bool]],
) -> None:
    """A client that connects and sends nothing is dropped after the 2 s read timeout."""
    url, _ = probe
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as silent:
        r = httpx.get(f"{url}/health", timeout=5)  # waits behind the silent one, bounded
        assert r.status_code == 200
        silent.settimeout(1)
        assert silent.recv(10) == b""  # closed by the listener


def test_lifecycle_settings_are_read_and_checked() -> None:
    """IW_STREAM_STALL_S and IW_HEALTH_PORT are read; the drain default fits Kubernetes' 30 s."""
    s = Settings.from_env({"IW_STREAM_STALL_S": "2.5", "IW_HEALTH_PORT": "8001"})
    assert (s.stream_stall_s, s.health_port, s.drain_timeout_s) == (2.5, 8001, 20.0)
    assert Settings.from_env({}).health_port is None
    with pytest.raises(SettingsError, match="IW_HEALTH_PORT"):
        Settings.from_env({"IW_HEALTH_PORT": "8000"})
    with pytest.raises(SettingsError, match="IW_STREAM_STALL_S"):
        Settings.from_env({"IW_STREAM_STALL_S": "0"})
