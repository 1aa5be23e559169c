"""The echo backend on its own: tokens, limits, stops, n, failures, unload and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from adapters.base import AdapterContext
from adapters.echo import EchoAdapter, EchoParams
from schemas.errors import EngineError
from schemas.generation import GenerationRequest, Message, SamplingOptions, TokenDelta


async def loaded(**params: Any) -> EchoAdapter:
    """An echo adapter loaded with `params`."""
    adapter = EchoAdapter(AdapterContext(name="echo"))
    await adapter.load("echo", EchoParams(**params))
    return adapter


def request(
    text: str = "one two three", rid: str = "r1", *, system: str | None = None, **sampling: Any
) -> GenerationRequest:
    """A generation request whose last user message is `text`."""
    sampling.setdefault("max_tokens", 64)
    messages = [Message("user", "an earlier turn"), Message("assistant", "ok")]
    if system is not None:
        messages.insert(0, Message("system", system))
    messages.append(Message("user", text))
    return GenerationRequest(rid, tuple(messages), SamplingOptions(**sampling), "echo")


def stream_of(adapter: EchoAdapter, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
    """The adapter's delta stream, typed as the async generator it is."""
    return adapter.generate(req)


async def collect(adapter: EchoAdapter, req: GenerationRequest) -> list[TokenDelta]:
    """Every delta of one generation."""
    return [d async for d in stream_of(adapter, req)]


def text_of(deltas: list[TokenDelta], index: int = 0) -> str:
    """The concatenated text of choice `index`."""
    return "".join(d.text for d in deltas if d.index == index)


async def test_echoes_the_last_user_message_token_by_token() -> None:
    """Each token is a word with its leading whitespace; the last delta says `stop`."""
    adapter = await loaded()
    deltas = await collect(adapter, request("one  two\tthree"))
    assert [d.text for d in deltas] == ["one", "  two", "\tthree", ""]
    assert [d.token_count for d in deltas] == [1, 1, 1, 0]
    assert [d.finish_reason for d in deltas] == [None, None, None, "stop"]
    turns = ("an earlier turn", "ok", "one two three")
    assert deltas[0].prompt_tokens == sum(len(t.split()) + 1 for t in turns)
    assert adapter.finished == [("r1", "complete")]
    assert adapter.active == set()


async def test_max_tokens_ends_with_length() -> None:
    """Generation stops at max_tokens with finish `length`."""
    deltas = await collect(await loaded(), request("a b c d e", max_tokens=2))
    assert text_of(deltas) == "a b"
    assert sum(d.token_count for d in deltas) == 2
    assert deltas[-1].finish_reason == "length"


async def test_stop_string_trims_and_ends_with_stop() -> None:
    """A stop string cuts the output before it, even across tokens, with finish `stop`."""
    deltas = await collect(await loaded(), request("alpha beta gamma", stop=("a gam",)))
    assert text_of(deltas) == "alpha bet"
    assert deltas[-1].finish_reason == "stop"


async def test_partial_stop_at_the_end_is_flushed() -> None:
    """Text held back for a stop that never completes comes out before the finish."""
    deltas = await collect(await loaded(), request("alpha bet", stop=("beta",)))
    assert text_of(deltas) == "alpha bet"
    assert deltas[-1].finish_reason == "stop"


async def test_ignore_eos_repeats_until_max_tokens() -> None:
    """With ignore_eos the message repeats until max_tokens, then finish `length`."""
    deltas = await collect(await loaded(), request("a b", max_tokens=5, ignore_eos=True))
    assert text_of(deltas) == "a ba ba"
    assert deltas[-1].finish_reason == "length"


async def test_min_tokens_on_an_empty_message() -> None:
    """An empty message with min_tokens repeats a dot; without it, stops at once."""
    deltas = await collect(await loaded(), request("", min_tokens=3))
    assert text_of(deltas) == "..."
    assert deltas[-1].finish_reason == "stop"
    deltas = await collect(await loaded(), request("   "))
    assert [(d.text, d.finish_reason) for d in deltas] == [("", "stop")]


async def test_n_choices_each_echo_and_finish() -> None:
    """N > 1 yields every choice with its index, each complete with its own finish."""
    deltas = await collect(await loaded(), request("x y", n=3))
    for index in range(3):
        assert text_of(deltas, index) == "x y"
        assert [d.finish_reason for d in deltas if d.index == index][-1] == "stop"


async def test_fail_after_tokens_raises_an_engine_error() -> None:
    """fail_after_tokens=2 yields two tokens and then raises EngineError."""
    adapter = await loaded(fail_after_tokens=2)
    agen = stream_of(adapter, request("a b c d"))
    got = [await anext(agen), await anext(agen)]
    assert text_of(got) == "a b"
    with pytest.raises(EngineError, match="after 2 tokens"):
        await anext(agen)
    assert adapter.active == set()


async def test_fail_on_load_raises_with_the_message() -> None:
    """fail_on_load makes load() raise EngineError carrying the configured text."""
    adapter = EchoAdapter(AdapterContext(name="echo"))
    with pytest.raises(EngineError, match="no GPU here"):
        await adapter.load("echo", EchoParams(fail_on_load="no GPU here"))
    await adapter.unload()  # safe after a failed load


async def test_load_reports_and_capabilities_follow_params() -> None:
    """load() reports the context length; capabilities follow max_n and max_context."""
    adapter = EchoAdapter(AdapterContext(name="echo"))
    info = await adapter.load("some-model", EchoParams(max_n=2, max_context=128))
    assert info.max_context == 128
    assert info.details == {"model": "some-model"}
    assert adapter.capabilities.max_n == 2
    assert adapter.capabilities.max_context == 128
    assert {"stop", "ignore_eos", "temperature"} <= adapter.capabilities.sampling


async def test_unload_aborts_an_active_generation() -> None:
    """Unload during a slow generation ends it at once with finish `abort`."""
    adapter = await loaded(token_delay_ms=60_000)
    agen = stream_of(adapter, request("a b c"))
    pending = asyncio.ensure_future(anext(agen))
    await asyncio.sleep(0)
    assert adapter.active == {"r1"}
    await adapter.unload()
    delta = await asyncio.wait_for(pending, timeout=10)
    assert delta.finish_reason == "abort"
    assert [d async for d in agen] == []
    assert adapter.finished == [("r1", "aborted")]
    assert adapter.active == set()


async def test_unload_aborts_between_tokens_without_delay() -> None:
    """With no token delay, a generation resumed after unload aborts before its next token."""
    adapter = await loaded()
    agen = stream_of(adapter, request("a b c", n=2))
    first = await anext(agen)
    assert first.text == "a"
    await adapter.unload()
    rest = [d async for d in agen]
    assert [d.finish_reason for d in rest] == ["abort", "abort"]
    assert "".join(d.text for d in rest) == ""
    assert adapter.finished == [("r1", "aborted")]


async def test_aclose_marks_the_generation_cancelled() -> None:
    """A consumer that goes away (aclose) ends the generation with outcome `cancelled`."""
    adapter = await loaded()
    agen = stream_of(adapter, request("a b c"))
    await anext(agen)
    assert adapter.active == {"r1"}
    await cast("Any", agen).aclose()
    assert adapter.active == set()
    assert adapter.finished == [("r1", "cancelled")]


async def test_cancelled_task_marks_the_generation_cancelled() -> None:
    """A consuming task cancelled while the adapter sleeps leaves no active generation."""
    adapter = await loaded(token_delay_ms=60_000)

    async def consume() -> None:
        async for _ in stream_of(adapter, request("a b", rid="r2")):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0)
    assert adapter.active == {"r2"}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adapter.active == set()
    assert adapter.finished == [("r2", "cancelled")]


async def test_a_new_load_after_unload_generates_again() -> None:
    """After unload, loading again resets the abort flag: generations complete."""
    adapter = await loaded()
    await adapter.unload()
    await adapter.load("echo", EchoParams())
    deltas = await collect(adapter, request("a"))
    assert deltas[-1].finish_reason == "stop"
