"""bench/parity_vllm.py's judge: what counts as the same answer from vLLM's server and ours.

The bench itself needs both servers (two engine loads); these tests pin its comparison rules on
answers shaped like vLLM 0.32's (its extra null keys, class-style error types, a role-only first
chunk), so a rule that drifts shows here in milliseconds.
"""

from __future__ import annotations

import copy
from typing import Any

from bench.parity_vllm import (
    CASES,
    Case,
    Row,
    compare,
    fold_stream,
    missing,
    request_of,
    self_consistency,
    summary,
    table,
)

CHAT = Case("chat.plain", "/v1/chat/completions", {"model": "m", "messages": []})


def whole(content: str, **extra: Any) -> dict[str, Any]:
    """A stored 200 chat answer as vLLM's server sends it (null extras included)."""
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "smollm2-135m-vllm",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None,
                            "tool_calls": [], "reasoning": None},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "system_fingerprint": None,
        **extra,
    }  # fmt: skip
    return {"status": 200, "json": body, "text": None, "chunks": None}


def error(status: int, kind: str, param: str | None, message: str) -> dict[str, Any]:
    """A stored error answer."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return {"status": status, "json": body, "text": None, "chunks": None}


def stream(*pieces: str, role_chunk: bool) -> dict[str, Any]:
    """A stored stream: vLLM sends the role alone first, the wrapper with the first text."""
    chunks: list[dict[str, Any]] = []
    if role_chunk:
        chunks.append({"id": "a", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for i, piece in enumerate(pieces):
        delta = {"content": piece} if role_chunk or i else {"role": "assistant", "content": piece}
        chunks.append({"id": "b", "created": i, "choices": [{"index": 0, "delta": delta}]})
    chunks.append(
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )  # fmt: skip
    return {"status": 200, "json": None, "text": None, "chunks": chunks, "done": True}


def test_same_answer_matches_ignoring_ids_times_and_null_extras() -> None:
    """Ids, `created` and keys that are null/empty on one side only are not differences."""
    ours = whole("Red, blue")
    body = ours["json"]
    body["id"], body["created"] = "chatcmpl-other", 99
    for key in ("refusal", "tool_calls", "reasoning"):
        del body["choices"][0]["message"][key]
    del body["system_fingerprint"]
    row = compare(CHAT, "whole", whole("Red, blue"), ours, 1e-3)
    assert row.match, row.diffs


def test_text_difference_is_reported_first() -> None:
    """Different text at temperature 0 is the first difference, before one-sided keys."""
    ours = whole("Red, green", extra_key=1)
    ours["json"]["usage"]["completion_tokens"] = 4
    row = compare(CHAT, "whole", whole("Red, blue"), ours, 1e-3)
    assert not row.match
    assert row.diffs[0].startswith("choices[0].message.content: vllm 'Red, blue'")
    assert any(d.startswith("usage.completion_tokens") for d in row.diffs)
    assert row.diffs[-1] == "only on wrapper: extra_key"


def test_a_key_with_a_value_on_one_side_only_is_listed() -> None:
    """A `stop_reason` set by vLLM, missing from ours: a shape difference, collapsed path."""
    vllm = whole("Red")
    vllm["json"]["choices"][0]["stop_reason"] = ","
    row = compare(CHAT, "whole", vllm, whole("Red"), 1e-3)
    assert row.diffs == ["only on vllm: choices[].stop_reason"]


def test_status_and_error_rules() -> None:
    """Status first; vLLM's class-style types read as OpenAI's; param compared, message not."""
    vllm = error(400, "BadRequestError", "temperature", "vLLM's words")
    ours = error(400, "invalid_request_error", "temperature", "our words")
    assert compare(CHAT, "whole", vllm, ours, 1e-3).match
    other = error(400, "invalid_request_error", "top_p", "our words")
    assert compare(CHAT, "whole", vllm, other, 1e-3).diffs[0].startswith("error vllm")
    refused = error(422, "invalid_request_error", "temperature", "our words")
    row = compare(CHAT, "whole", vllm, refused, 1e-3)
    assert row.diffs[0] == "status 400 / 422"
    assert "temperature" in row.diffs[1]
    not_found = error(404, "NotFoundError", "model", "x")
    assert compare(CHAT, "whole", not_found, error(404, "not_found_error", "model", "y"), 0).match


def test_streams_compare_joined_text_not_chunk_boundaries() -> None:
    """Other chunking and a role sent alone or with the first text: the same stream."""
    vllm = stream("Red", ", blue", role_chunk=True)
    ours = stream("Red, ", "blue", role_chunk=False)
    assert compare(CHAT, "stream", vllm, ours, 1e-3).match
    row = compare(CHAT, "stream", vllm, stream("Red", role_chunk=False), 1e-3)
    assert row.diffs[0].startswith("choices[0].text: vllm 'Red, blue' / wrapper 'Red'")
    cut = copy.deepcopy(ours)
    cut["done"] = False
    assert compare(CHAT, "stream", vllm, cut, 1e-3).diffs == ["done: vllm true / wrapper false"]


def test_stream_fold_joins_tool_calls_logprobs_and_usage() -> None:
    """Streamed tool-call arguments and logprobs are joined; usage in every chunk is seen."""
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    chunks = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "t", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"ci'}}]},
            "logprobs": {"content": [{"token": "a", "logprob": -0.5}]}}], "usage": usage},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]},
            "finish_reason": "tool_calls"}], "usage": usage},
    ]  # fmt: skip
    folded = fold_stream(chunks, done=True, ignored=frozenset({"id"}))
    choice = folded["choices"][0]
    assert choice["tool_calls"] == [
        {"type": "function", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert choice["logprobs"] == [{"token": "a", "logprob": -0.5}]
    assert choice["finish_reason"] == "tool_calls"
    assert folded["usage_in_every_chunk"] is True
    assert "choices[].delta.tool_calls[].function.arguments" in folded["chunk_keys"]


def test_floats_within_tolerance_and_status_only_cases() -> None:
    """Logprobs equal within the tolerance; a status-only case ignores the bodies."""
    a, b = whole("x"), whole("x")
    a["json"]["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -0.10000}]}
    b["json"]["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -0.10004}]}
    assert compare(CHAT, "whole", a, b, 1e-3).match
    assert not compare(CHAT, "whole", a, b, 1e-6).match
    version = next(c for c in CASES if c.name == "version")
    other = {"status": 200, "json": {"version": "other"}, "text": None, "chunks": None}
    assert compare(version, "whole", {**other, "json": {"version": "0.32"}}, other, 0).match


def test_cases_are_unique_and_the_table_says_yes_or_no() -> None:
    """Every case name once; the report's table has one row per pair and a summary count."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    rows = [Row("a", "whole", "200", "200"), Row("b", "stream", "200", "400", ["status 200 / 400"])]
    text = table(rows)
    assert "| a | whole | 200 / 200 | yes |  |" in text
    assert "| b | stream | 200 / 400 | no | status 200 / 400 |" in text
    assert summary(rows).startswith("1 of 2 case/mode pairs match; 1 differ (1 by status code")


def test_whole_vs_stream_on_one_server_is_checked_for_seeded_cases() -> None:
    """A seeded case says same/differ per server; an unseeded one only when it differs."""
    seeded = Case("chat.seed", "/v1/chat/completions", {"seed": 1})
    answers = {
        "vllm": {
            "chat.seed/whole": whole("Red, blue"),
            "chat.seed/stream": stream("Red", ", blue", role_chunk=True),
            "chat.plain/whole": whole("Red"),
            "chat.plain/stream": stream("Red", role_chunk=True),
        },
        "wrapper": {
            "chat.seed/whole": whole("Red, blue"),
            "chat.seed/stream": stream("Green", role_chunk=False),
            "chat.plain/whole": whole("Red"),
            "chat.plain/stream": stream("Blue", role_chunk=False),
        },
    }
    lines = self_consistency([seeded, CHAT], answers)
    assert lines == [
        "- vllm `chat.seed`: whole and stream text same",
        "- wrapper `chat.seed`: whole and stream text differ: ['Red, blue'] / ['Green']",
        "- wrapper `chat.plain`: whole and stream text differ: ['Red'] / ['Blue']",
    ]


def test_a_stored_answer_is_reused_only_for_the_same_request() -> None:
    """Reuse of an earlier run: a changed body or a new mode is sent again, the rest is not."""
    case = Case("chat.x", "/v1/chat/completions", {"model": "m", "max_tokens": 8})
    answers = {"chat.x/whole": {"request": request_of(case, "whole", "vllm")}}
    assert missing([case], answers, "vllm") == [(case, "stream")]
    changed = Case("chat.x", "/v1/chat/completions", {"model": "m", "max_tokens": 9})
    assert missing([changed], answers, "vllm") == [(changed, "whole"), (changed, "stream")]
    retrieve = next(c for c in CASES if c.name == "models.retrieve")
    assert request_of(retrieve, "whole", "vllm")["path"] == "/v1/models"
    assert request_of(retrieve, "whole", "wrapper")["path"] == "/v1/models/smollm2-135m-vllm"


def test_an_error_event_after_a_200_stream_is_named() -> None:
    """Where vLLM refuses before streaming, a server that sends 200 then an error event differs."""
    vllm = error(400, "BadRequestError", "max_tokens", "too long")
    ours = {
        "status": 200, "json": None, "text": None, "done": True,
        "chunks": [{"error": {"message": "m", "type": "invalid_request_error",
                              "param": "max_tokens", "code": None}}],
    }  # fmt: skip
    row = compare(CHAT, "stream", vllm, ours, 1e-3)
    assert row.diffs[0] == "status 400 / 200"
    assert row.diffs[1] == (
        "wrapper streamed 200 then the error event "
        "{'type': 'invalid_request_error', 'param': 'max_tokens'}"
    )
    missing_field = error(400, "Bad Request", "body.messages", "1 validation error")
    expected = (
        "error vllm {'type': 'invalid_request_error', 'param': 'messages'} / "
        "wrapper {'type': 'x', 'param': 'messages'}"
    )
    assert compare(CHAT, "whole", missing_field, error(400, "x", "messages", "y"), 0).diffs == [
        expected
    ]
