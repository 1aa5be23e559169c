"""The OpenAI-compatible upstream adapter against a real local server: a second wrapper.

Upstream A is an inference-wrapper serving echo behind an API key; wrapper B loads the `upstream`
backend pointing at A, with A's key as an env secret. Everything a client of B sees must match
what A produced, B's own telemetry must be there, and A's key must never surface at B.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from helpers import ADMIN, API, TEST_REGISTRY, LiveServer, make_registry, make_settings
from registry.secrets import SecretStore
from service.app import create_app
from service.logs import configure_logging

UPSTREAM_KEY = "up-CANARY-9d1c0b7e3f55"
REGISTRY_B = """
adapters:
  upstream:
    module: adapters.openai_upstream:OpenAIUpstreamAdapter
    allowed_hosts: ["127.0.0.1"]
    env_allow: [UPSTREAM_KEY]
"""


@pytest.fixture
def upstream(tmp_path: Any) -> Iterator[LiveServer]:
    """Wrapper A: echo with a per-token delay, its data plane behind UPSTREAM_KEY."""
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    app = create_app(
        make_settings(api_keys=(UPSTREAM_KEY,)), registry=make_registry(a_dir, TEST_REGISTRY)
    )
    with LiveServer(app) as server:
        r = httpx.post(
            f"{server.url}/v1/model/load",
            json={"preset": "echo", "engine_params": {"token_delay_ms": 5}},
            headers=ADMIN,
        )
        assert r.status_code == 200
        yield server


@pytest.fixture
def wrapper_b(tmp_path: Any) -> Iterator[tuple[LiveServer, io.StringIO]]:
    """Wrapper B over the upstream registry, its log captured through the masked handler."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    secrets = SecretStore()
    configure_logging(secrets, level="DEBUG", stream=buffer)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    app = create_app(make_settings(), registry=make_registry(b_dir, REGISTRY_B), secrets=secrets)
    with LiveServer(app) as server:
        yield server, buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def load_b(b: LiveServer, a: LiveServer, **params: Any) -> httpx.Response:
    """Load B's upstream backend pointing at A."""
    body = {
        "backend": "upstream",
        "model": "echo",
        "engine_params": {"base_url": f"{a.url}/v1", "api_key_env": "UPSTREAM_KEY", **params},
        "env": {"UPSTREAM_KEY": UPSTREAM_KEY},
    }
    return httpx.post(f"{b.url}/v1/model/load", json=body, headers=ADMIN, timeout=30)


def test_chat_through_upstream(upstream: LiveServer, wrapper_b: Any) -> None:
    """Non-streaming and streaming answers match A's, with A's usage and B's metrics."""
    b, log = wrapper_b
    r = load_b(b, upstream)
    assert r.status_code == 200, r.text
    assert r.json()["device"] == "remote"
    with openai.OpenAI(
        base_url=f"{b.url}/v1", api_key="api-key-for-tests-0001", max_retries=0
    ) as oai:
        msgs: list[Any] = [{"role": "user", "content": "through the looking glass"}]
        out = oai.chat.completions.create(model="echo", messages=msgs, max_tokens=3)
        assert out.choices[0].message.content == "through the looking"
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None
        assert out.usage.completion_tokens == 3
        chunks = list(
            oai.chat.completions.create(
                model="echo", messages=msgs, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "through the looking glass"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 4
        metrics = chunks[-1].model_extra["metrics"]  # type: ignore[index]
        assert metrics["time_to_first_token_ms"] > 0
    assert UPSTREAM_KEY not in log.getvalue()


def test_completions_through_upstream(upstream: LiveServer, wrapper_b: Any) -> None:
    """B's /v1/completions goes to A's: text and token-id prompts, whole and streamed."""
    b, _ = wrapper_b
    assert load_b(b, upstream).status_code == 200
    with openai.OpenAI(
        base_url=f"{b.url}/v1", api_key="api-key-for-tests-0001", max_retries=0
    ) as oai:
        out = oai.completions.create(model="echo", prompt="down the rabbit hole", max_tokens=3)
        assert out.object == "text_completion"
        assert out.choices[0].text == "down the rabbit"
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None
        assert out.usage.completion_tokens == 3
        stream = oai.completions.create(
            model="echo",
            prompt=[7, 8, 9],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == " 7 8 9"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == 3


def test_upstream_errors_map_to_envelope(upstream: LiveServer, wrapper_b: Any) -> None:
    """A wrong key fails the load as a 502-class engine error without the key in it."""
    b, log = wrapper_b
    body = {
        "backend": "upstream",
        "model": "echo",
        "engine_params": {"base_url": f"{upstream.url}/v1", "api_key_env": "UPSTREAM_KEY"},
        "env": {"UPSTREAM_KEY": UPSTREAM_KEY + "-wrong"},
    }
    r = httpx.post(f"{b.url}/v1/model/load", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 502
    assert "refused the credentials (401)" in r.json()["error"]["message"]
    assert UPSTREAM_KEY not in r.text
    assert UPSTREAM_KEY not in log.getvalue()
    status = httpx.get(f"{b.url}/v1/model/status", headers=ADMIN).json()
    assert status["state"] == "empty"
    assert UPSTREAM_KEY not in json.dumps(status)


def test_host_allowlist_blocks_ssrf(wrapper_b: Any) -> None:
    """A base_url whose host is not allowed is refused before any connection."""
    b, _ = wrapper_b
    for url in ("http://169.254.169.254/v1", "http://localhost:1/v1", "http://u:p@127.0.0.1/v1"):
        r = httpx.post(
            f"{b.url}/v1/model/validate",
            json={"backend": "upstream", "model": "m", "engine_params": {"base_url": url}},
            headers=ADMIN,
        )
        assert r.status_code == 422, url
        assert r.json()["error"]["param"] == "$.engine_params.base_url"


def test_unreachable_upstream_is_clear(wrapper_b: Any, tmp_path: Any) -> None:
    """Nobody listening: the load fails with 'cannot reach upstream', state stays clean."""
    b, _ = wrapper_b
    app = create_app(make_settings(), registry=make_registry(tmp_path, TEST_REGISTRY))
    with LiveServer(app) as gone:
        url = gone.url  # a port that was just served and is now closed
    r = httpx.post(
        f"{b.url}/v1/model/load",
        json={"backend": "upstream", "model": "echo", "engine_params": {"base_url": f"{url}/v1"}},
        headers=ADMIN,
        timeout=30,
    )
    assert r.status_code == 502
    assert "cannot reach upstream" in r.json()["error"]["message"]
    assert httpx.get(f"{b.url}/v1/model/status", headers=ADMIN).json()["state"] == "empty"


def test_upstream_timeout_is_a_504(upstream: LiveServer, wrapper_b: Any) -> None:
    """An upstream slower than timeout_s: B answers 504 upstream_timeout, streamed or not.

    Streamed too: the timeout comes before the first token, so before the 200 is sent.
    """
    b, _ = wrapper_b
    httpx.post(
        f"{upstream.url}/v1/model/load",
        json={"preset": "echo", "replace": True, "engine_params": {"first_token_delay_ms": 3000}},
        headers=ADMIN,
        timeout=30,
    ).raise_for_status()
    assert load_b(b, upstream, timeout_s=0.5).status_code == 200
    body = {"model": "echo", "messages": [{"role": "user", "content": "slow"}]}
    r = httpx.post(f"{b.url}/v1/chat/completions", json=body, headers=API, timeout=30)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    r = httpx.post(
        f"{b.url}/v1/chat/completions", json={**body, "stream": True}, headers=API, timeout=30
    )
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
