"""Data-plane bounds: JSON content type, seed range, stop bounds, JSON depth, masked names."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from adapters.text import StopMatcher
from helpers import ADMIN, ADMIN_KEY, API, chat_body, load
from service.errors import MAX_JSON_DEPTH, json_depth

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def echo(client: TestClient[Any]) -> TestClient[Any]:
    """A client with the echo preset loaded."""
    load(client, preset="echo")
    return client


def _chat(client: TestClient[Any], body: Any, **headers: str) -> Any:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return client.post("/v1/chat/completions", content=raw, headers={**API, **JSON, **headers})


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
def test_post_without_json_content_type_is_415(echo: TestClient[Any], content_type: str) -> None:
    """A JSON body sent as text/plain, a form or untyped is refused with 415 on every POST."""
    body = msgspec.json.encode(chat_body())
    headers = {"Content-Type": content_type} if content_type else {}
    r = echo.post("/v1/chat/completions", content=body, headers={**API, **headers})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    for route in ("/v1/model/validate", "/v1/model/load", "/v1/model/unload"):
        r = echo.post(route, content=b'{"preset": "echo"}', headers={**ADMIN, **headers})
        assert r.status_code == 415, route
    assert echo.get("/ready").status_code == 200  # the refused unload did nothing


def test_json_content_type_with_charset_is_served(echo: TestClient[Any]) -> None:
    """`application/json; charset=utf-8` is JSON; an empty unload body needs no type."""
    r = _chat(echo, chat_body(), **{"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert echo.post("/v1/model/unload", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1, 10**30])
def test_seed_out_of_int64_range_is_400(echo: TestClient[Any], seed: int) -> None:
    """A seed outside signed 64-bit is a 400 naming `seed` (vLLM gave a 500)."""
    r = _chat(echo, chat_body(seed=seed))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_seed_in_range_is_served(echo: TestClient[Any], seed: int) -> None:
    """The int64 extremes are accepted."""
    assert _chat(echo, chat_body(seed=seed)).status_code == 200


def test_stop_bounds(echo: TestClient[Any]) -> None:
    """More than 16 stop strings, or one over 1024 characters, is a 400 naming `stop`."""
    r = _chat(echo, chat_body(stop=[f"s{i}" for i in range(17)]))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "stop"
    r = _chat(echo, chat_body(stop="x" * 1025))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "stop"
    assert _chat(echo, chat_body(stop=["x" * 1024] * 16)).status_code == 200


def test_million_char_stop_is_refused_fast(echo: TestClient[Any]) -> None:
    """A 1M-character stop string is refused with 400 in well under a second."""
    body = chat_body("a" * 10_000, stop=["a" * 1_000_000])
    started = time.monotonic()
    r = _chat(echo, body)
    assert r.status_code == 400
    assert time.monotonic() - started < 1.0


def test_stop_matching_is_linear() -> None:
    """16 adversarial 1024-char stops over 20k streamed chars match in well under a second."""
    stops = ["a" * 1023 + chr(ord("b") + i) for i in range(16)]
    matcher = StopMatcher(stops)
    started = time.monotonic()
    out = [matcher.feed("aaaa") for _ in range(5000)]
    out.append(matcher.flush())
    assert "".join(out) == "a" * 20_000
    assert time.monotonic() - started < 1.0


def _nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5000, 200_000])
def test_deep_json_is_400_on_every_route(echo: TestClient[Any], depth: int) -> None:
    """A body nested past the depth limit is a 400 in the envelope on every POST route."""
    body = _nested(depth)
    for route, headers in (
        ("/v1/chat/completions", API),
        ("/v1/model/load", ADMIN),
        ("/v1/model/validate", ADMIN),
        ("/v1/model/unload", ADMIN),
    ):
        r = echo.post(route, content=body, headers={**headers, **JSON})
        assert r.status_code == 400, (route, r.status_code)
        assert "nested too deeply" in r.json()["error"]["message"]
    deep_engine_params = b'{"preset": "echo", "engine_params": {"x": ' + _nested(100) + b"}}"
    r = echo.post("/v1/model/validate", content=deep_engine_params, headers={**ADMIN, **JSON})
    assert r.status_code == 400


def test_json_depth_ignores_brackets_in_strings() -> None:
    """Brackets inside JSON strings (escaped quotes included) do not count as nesting."""
    text = b'{"s": "' + b"[{" * 200 + b'\\"[[[", "t": [[1]]}'
    assert json_depth(text) == 3
    assert json_depth(b"[" * 70 + b"]" * 70) == 70


def test_served_model_name_equal_to_a_secret_is_masked(client: TestClient[Any]) -> None:
    """A served name equal to a secret is masked on /ready, /v1/models and status."""
    load(client, preset="echo", served_model_name=ADMIN_KEY)
    for path, headers in (("/ready", {}), ("/v1/models", API), ("/v1/model/status", ADMIN)):
        r = client.get(path, headers=headers)
        assert r.status_code == 200
        assert ADMIN_KEY not in r.text, path
        assert "***" in r.text, path
