"""No request reads the server's environment: `api_key_env` names a key of the load's own `env`.

The attack of issue 9: a load naming `api_key_env: IW_ADMIN_KEY` (or a cloud credential of the
server process) had that value sent as `Authorization: Bearer …` to a listener on 127.0.0.1. Here
a real socket listener records every connection and byte; a refused load must leave it untouched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from helpers import ADMIN, ADMIN_KEY, make_registry, make_settings
from service.app import create_app

SERVER_SECRET = "srv-CANARY-6f0e2b9a41c7"  # what the server process holds in its environment
LOAD_KEY = "load-KEY-3a8e51d07b2c"  # what the load itself brings

REGISTRY = """
adapters:
  upstream:
    module: adapters.openai_upstream:OpenAIUpstreamAdapter
    allowed_hosts: ["127.0.0.1"]
    env_allow: [UPSTREAM_KEY]
"""


class Listener:
    """A TCP listener on 127.0.0.1 that records what each connection sent, then answers 404."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                self.received.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        """Stop accepting and close the socket (bounded: the accept loop polls every 0.2 s)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A recording listener, closed at the end."""
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Litestar]]:
    """An app whose upstream backend may reach 127.0.0.1 and take UPSTREAM_KEY from a load."""
    app = create_app(make_settings(), registry=make_registry(tmp_path, REGISTRY))
    with TestClient(app) as c:
        yield c


def _body(port: int, api_key_env: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "backend": "upstream",
        "model": "m",
        "engine_params": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": api_key_env},
        "env": env or {},
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IW_ADMIN_KEY", ADMIN_KEY),
        ("AWS_SECRET_ACCESS_KEY", SERVER_SECRET),
        ("UPSTREAM_KEY", SERVER_SECRET),  # allowlisted name, but the load did not set it
    ],
)
def test_server_environment_is_never_read(
    client: TestClient[Litestar],
    listener: Listener,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> None:
    """A name the load's env does not set is 422 param_refused; no byte reaches the listener."""
    monkeypatch.setenv(name, value)
    for op in ("validate", "load"):
        r = client.post(f"/v1/model/{op}", json=_body(listener.port, name), headers=ADMIN)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("$.engine_params.api_key_env", "param_refused")
        assert value not in r.text
    assert listener.received == []
    assert client.get("/v1/model/status", headers=ADMIN).json()["state"] == "empty"


def test_key_comes_from_the_load_env_only(
    client: TestClient[Litestar], listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the key in the load's env, the upstream gets that value, not the server's own."""
    monkeypatch.setenv("UPSTREAM_KEY", SERVER_SECRET)
    body = _body(listener.port, "UPSTREAM_KEY", {"UPSTREAM_KEY": LOAD_KEY})
    r = client.post("/v1/model/load", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert LOAD_KEY not in r.text
    sent = b"".join(listener.received).decode("latin-1")
    auth = [ln for ln in sent.split("\r\n") if ln.lower().startswith("authorization:")]
    assert auth
    assert {ln.split(":", 1)[1].strip() for ln in auth} == {f"Bearer {LOAD_KEY}"}
    assert SERVER_SECRET not in sent
    client.post("/v1/model/unload", json={}, headers=ADMIN)
