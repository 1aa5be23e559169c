"""ChunkEncoder framing: JSON after `data: `, LF only, role and usage exactly when they belong."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import ErrorDetail
from service.sse import DONE, ChunkEncoder, error_event

PREFIX = b"data: "


def parse(frame: bytes) -> dict[str, Any]:
    """Check the framing of one event and return its JSON payload."""
    assert frame.startswith(PREFIX)
    assert frame.endswith(b"\n\n")
    body = frame[len(PREFIX) : -2]
    assert b"\n" not in body  # one event, one line: a raw newline would split it
    assert b"\r" not in frame
    payload = json.loads(body)
    assert isinstance(payload, dict)
    return payload


def encoder(include_usage: bool = False, model: str = "m") -> ChunkEncoder:
    """An encoder for a fixed stream."""
    return ChunkEncoder("chatcmpl-1", 1700000000, model, include_usage)


def test_delta_chunk_shape() -> None:
    """A token chunk carries id, object, created, model and one choice with its delta."""
    chunk = parse(encoder().delta(0, "Hi", role=True))
    assert chunk == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hi"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }


def test_role_only_when_asked() -> None:
    """Later chunks have content only; the role is not repeated."""
    assert parse(encoder().delta(2, " there"))["choices"][0] == {
        "index": 2,
        "delta": {"content": " there"},
        "logprobs": None,
        "finish_reason": None,
    }


def test_usage_null_only_with_include_usage() -> None:
    """`usage: null` is on every chunk with include_usage and absent without it."""
    enc_with, enc_without = encoder(include_usage=True), encoder()
    for enc, has in ((enc_with, True), (enc_without, False)):
        for frame in (enc.delta(0, "x", role=True), enc.finish(0, "stop")):
            chunk = parse(frame)
            assert ("usage" in chunk) is has
            if has:
                assert chunk["usage"] is None


def test_finish_chunk_and_metrics() -> None:
    """The finish chunk has an empty delta and the reason; metrics ride on it when given."""
    chunk = parse(encoder().finish(0, "length", metrics={"e2e_ms": 1.5}))
    assert chunk["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    ]
    assert chunk["metrics"] == {"e2e_ms": 1.5}
    assert "metrics" not in parse(encoder().finish(0, "stop"))
    # vLLM's stop_reason: the stop string, or the stop token id, as given
    assert parse(encoder().finish(0, "stop", stop_reason=","))["choices"][0]["stop_reason"] == ","
    assert parse(encoder().finish(0, "stop", stop_reason=2))["choices"][0]["stop_reason"] == 2


def test_finish_without_any_token_carries_the_role() -> None:
    """A choice that produced no token still gets its role, with empty content."""
    delta = parse(encoder().finish(1, "stop", role=True))["choices"][0]["delta"]
    assert delta == {"role": "assistant", "content": ""}


def test_usage_chunk_has_no_choices() -> None:
    """The usage chunk has `choices: []`, the usage numbers and the metrics."""
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunk = parse(encoder(include_usage=True).usage(usage, {"tpot_ms": 2.0}))
    assert chunk["choices"] == []
    assert chunk["usage"] == usage
    assert chunk["metrics"] == {"tpot_ms": 2.0}
    assert chunk["id"] == "chatcmpl-1"


def test_reasoning_and_logprobs() -> None:
    """Reasoning text travels as reasoning_content; logprobs as given; content may be absent."""
    lp = {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]}
    choice = parse(encoder().delta(0, None, reasoning="think", logprobs=lp))["choices"][0]
    assert choice["delta"] == {"reasoning_content": "think"}
    assert choice["logprobs"] == lp


def test_error_event_and_done() -> None:
    """A mid-stream error is one OpenAI error envelope event; the stream ends with [DONE]."""
    event = parse(error_event(ErrorDetail("engine error: boom", "server_error", None, "x")))
    assert event == {
        "error": {
            "message": "engine error: boom",
            "type": "server_error",
            "param": None,
            "code": "x",
        }
    }
    assert DONE == b"data: [DONE]\n\n"


_TRICKY = st.sampled_from(['"', "\\", "\n", "\r", "\r\n", "\t", "\x00", "\u2028", "é", "😀", "</"])
_CONTENT = st.one_of(st.text(max_size=40), st.lists(_TRICKY, max_size=8).map("".join))


@settings(max_examples=300, deadline=None)
@given(content=_CONTENT, model=_CONTENT, include_usage=st.booleans())
def test_any_text_is_escaped_and_round_trips(content: str, model: str, include_usage: bool) -> None:
    """Quotes, newlines, NULs and any unicode in content or model name survive as JSON."""
    enc = ChunkEncoder("chatcmpl-x", 1, model, include_usage)
    chunk = parse(enc.delta(0, content, role=True, reasoning=content or None))
    assert chunk["model"] == model
    assert chunk["choices"][0]["delta"]["content"] == content
    assert parse(enc.finish(0, "stop"))["model"] == model


@settings(max_examples=200, deadline=None)
@given(
    content=_CONTENT.filter(bool),
    model=_CONTENT,
    include_usage=st.booleans(),
    index=st.integers(0, 15),
)
def test_text_frame_is_the_delta_frame(
    content: str, model: str, include_usage: bool, index: int
) -> None:
    """The fast text-only frame is byte for byte the frame `delta()` builds for the same text."""
    enc = ChunkEncoder("chatcmpl-x", 1, model, include_usage)
    assert enc.text(index, content) == enc.delta(index, content)
    assert enc.text(index, content) == enc.delta(index, content)  # cached head, same bytes
