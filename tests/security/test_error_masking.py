"""Mask first, truncate after: no part of a secret survives an error message cut short.

The attack of issue 9: upstream error text was cut to 300 characters before masking, so a secret
straddling the cut was no longer recognisable whole, and a data-plane client received the first
15 characters of the operator's upstream key. Here a real HTTP upstream on 127.0.0.1 puts the key
across that cut, and every outward error must hold no fragment of it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from adapters.kit import ERROR_TEXT_LIMIT, clean_error_text
from adapters.sglang import finish_reason
from adapters.vllm import sanitise
from helpers import ADMIN, API, make_registry, make_settings
from registry.manager import sanitize_exception
from registry.secrets import SecretStore
from schemas.errors import EngineError, InvalidRequestError
from service.app import create_app

KEY = "sk-OPERATOR-7c41d2e9b0a85f36"
REGISTRY = """
adapters:
  upstream:
    module: adapters.openai_upstream:OpenAIUpstreamAdapter
    allowed_hosts: ["127.0.0.1"]
    env_allow: [UPSTREAM_KEY]
"""


def _fragments(secret: str, size: int = 6) -> list[str]:
    """Every `size`-character piece of `secret` (a leak of any of them is a leak)."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


def _straddling(prefix: int) -> str:
    """Error text with the key starting `prefix` characters in, across the 300-character cut."""
    return "x" * prefix + KEY + " was refused"


class _Upstream(BaseHTTPRequestHandler):
    """Answers every request with an OpenAI error whose message carries the key across the cut."""

    status = 400

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path.endswith("/models") and self.server.models_ok:  # type: ignore[attr-defined]
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"error": {"message": _straddling(285)}}).encode()
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer  # noqa: N815  (http.server's naming)
    do_POST = _answer  # noqa: N815

    def log_message(self, *_: Any) -> None:
        """Quiet: the test reads responses, not the upstream's access log."""


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on 127.0.0.1 (status and /models behaviour set per test)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.status = 400  # type: ignore[attr-defined]
    server.models_ok = True  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Litestar]]:
    """An app with the upstream backend allowed to reach 127.0.0.1."""
    app = create_app(make_settings(), registry=make_registry(tmp_path, REGISTRY))
    with TestClient(app) as c:
        yield c


def _load(client: TestClient[Litestar], server: ThreadingHTTPServer) -> Any:
    port = server.server_address[1]
    body = {
        "backend": "upstream",
        "model": "m",
        "engine_params": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "UPSTREAM_KEY"},
        "env": {"UPSTREAM_KEY": KEY},
    }
    return client.post("/v1/model/load", json=body, headers=ADMIN)


def _assert_no_fragment(text: str) -> None:
    leaked = [f for f in _fragments(KEY) if f in text]
    assert not leaked, f"key fragments leaked: {leaked}"


def test_upstream_error_text_cut_after_masking(
    client: TestClient[Litestar], upstream: ThreadingHTTPServer
) -> None:
    """A data-plane client gets the upstream's error with the key masked, no fragment of it."""
    assert _load(client, upstream).status_code == 200
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("upstream rejected the request: xxx")
    _assert_no_fragment(r.text)
    stream = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=API)
    _assert_no_fragment(stream.text)


def test_upstream_load_failure_cut_after_masking(
    client: TestClient[Litestar], upstream: ThreadingHTTPServer
) -> None:
    """A load the upstream fails (500 on /models) reports its text without a key fragment."""
    upstream.status = 500  # type: ignore[attr-defined]
    upstream.models_ok = False  # type: ignore[attr-defined]
    r = _load(client, upstream)
    assert r.status_code == 502
    assert "upstream answered 500" in r.json()["error"]["message"]
    _assert_no_fragment(r.text)
    status = client.get("/v1/model/status", headers=ADMIN)
    _assert_no_fragment(status.text)


@pytest.mark.parametrize("prefix", [0, 250, 285, 290, 299, 310, 2000])
def test_one_cleaner_masks_before_it_cuts(prefix: int) -> None:
    """The kit's cleaner, vLLM's sanitise, SGLang's aborts and the manager: mask, then cut."""
    store = SecretStore()
    store.add(KEY)
    text = _straddling(prefix)
    outs = [
        clean_error_text(text, store.mask),
        sanitise(text, mask=store.mask),
        sanitize_exception(RuntimeError(text), store),
        sanitize_exception(EngineError(text), store),
    ]
    for status, error in ((400, InvalidRequestError), (500, EngineError)):
        with pytest.raises(error) as caught:
            finish_reason({"type": "abort", "status_code": status, "message": text}, store.mask)
        outs.append(caught.value.message)
    for out in outs:
        assert len(out) <= ERROR_TEXT_LIMIT + 40  # the cleaner's limit plus a fixed prefix
        _assert_no_fragment(out)


def test_cleaner_keeps_one_short_line_without_paths() -> None:
    """First non-empty line only, local paths replaced, an ellipsis where it was cut."""
    out = clean_error_text("\n  failed to open /srv/models/x/config.json\ntrace", limit=30)
    assert out == "failed to open <path>"
    assert clean_error_text("y" * 400).endswith("…")
    assert len(clean_error_text("y" * 400)) == ERROR_TEXT_LIMIT
