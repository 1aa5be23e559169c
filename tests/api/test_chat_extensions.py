"""vLLM's chat extensions the service implements itself, on echo: continuous usage in streams."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helpers import API, chat_body, load, sse_events


@pytest.fixture
def echo(client: Any) -> Any:
    """The test client with the echo preset loaded."""
    load(client, preset="echo")
    return client


def chunks(client: Any, **extra: Any) -> list[dict[str, Any]]:
    """The JSON chunks of one streamed answer to "a b c"."""
    r = client.post(
        "/v1/chat/completions", json=chat_body("a b c", stream=True, **extra), headers=API
    )
    assert r.status_code == 200, r.text
    return [json.loads(e) for e in sse_events(r.text)[:-1]]


def test_continuous_usage_counts_up_on_every_chunk(echo: Any) -> None:
    """Every chunk carries the usage so far, as vLLM sends it; the last one the totals."""
    got = chunks(echo, stream_options={"include_usage": True, "continuous_usage_stats": True})
    with_choices = [c for c in got if c["choices"]]
    assert all(c["usage"] is not None for c in got)
    counts = [c["usage"]["completion_tokens"] for c in with_choices]
    assert counts == sorted(counts)
    assert counts[0] == 1
    assert counts[-1] == 3
    prompt = got[-1]["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in with_choices)
    assert all(
        c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
        for c in got
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    assert text == "a b c"


def test_continuous_usage_needs_include_usage(echo: Any) -> None:
    """Without include_usage no chunk has a usage key (vLLM's rule)."""
    got = chunks(echo, stream_options={"continuous_usage_stats": True})
    assert all("usage" not in c for c in got)
