"""The official `openai` client against a real uvicorn, unchanged: what users actually run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from helpers import ADMIN, API_KEY, LiveServer

MSGS: list[Any] = [{"role": "user", "content": "alpha beta gamma delta"}]


@pytest.fixture
def oai(live: LiveServer) -> Iterator[openai.OpenAI]:
    """A client with the data-plane key, no retries."""
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_non_streaming(oai: openai.OpenAI) -> None:
    """chat.completions.create returns a parsed ChatCompletion with usage."""
    r = oai.chat.completions.create(model="echo", messages=MSGS, max_tokens=16)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "alpha beta gamma delta"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_with_usage(oai: openai.OpenAI) -> None:
    """Streaming with include_usage: same id, role first, usage only on the last chunk."""
    chunks = list(
        oai.chat.completions.create(
            model="echo", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    first = next(c for c in chunks if c.choices and c.choices[0].delta.content)
    assert first.choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha beta gamma delta"


def test_streaming_without_usage(oai: openai.OpenAI) -> None:
    """Streaming without stream_options: every chunk has choices, none has usage."""
    chunks = list(oai.chat.completions.create(model="echo", messages=MSGS, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_list(oai: openai.OpenAI) -> None:
    """models.list() shows the served model."""
    data = oai.models.list().data
    assert [m.id for m in data] == ["echo"]
    assert data[0].object == "model"
    assert data[0].owned_by


def test_bad_key_is_authentication_error(live: LiveServer) -> None:
    """A wrong key raises openai.AuthenticationError."""
    with (
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong-key-0000", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        bad.chat.completions.create(model="echo", messages=MSGS)
    assert info.value.status_code == 401


def test_bad_param_is_bad_request_with_param(oai: openai.OpenAI) -> None:
    """An out-of-range parameter raises BadRequestError naming it."""
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="echo", messages=MSGS, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="echo", messages=MSGS, extra_body={"frobnicate": 1})
    assert info.value.param == "frobnicate"


def test_no_model_is_503(live: LiveServer, oai: openai.OpenAI) -> None:
    """After unload the client sees a 503 (InternalServerError in the SDK's mapping)."""
    httpx.post(f"{live.url}/v1/model/unload", headers=ADMIN).raise_for_status()
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="echo", messages=MSGS)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"]


def test_async_client_streams(live: LiveServer) -> None:
    """The async client streams too (what benchmark tools use)."""
    import asyncio  # noqa: PLC0415

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
        stream = await client.chat.completions.create(model="echo", messages=MSGS, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return "".join(parts)

    assert asyncio.run(run()) == "alpha beta gamma delta"
