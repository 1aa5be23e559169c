"""`tool_choice: "auto"` at the service: the model's Hermes text parsed by vLLM's parser.

The fake (tests/fakes/adapters.py `ToolAutoEchoAdapter`) echoes the user's text and carries
vLLM's Hermes parser, so each test chooses the "model output": calls become `tool_calls` with
`finish_reason: "tool_calls"`, the text before them stays content, plain text stays plain, and a
stream sends content until `<tool_call>` starts, then each call's name and its arguments in
pieces that join to the whole answer's (and rebuild through the official client's stream
accumulation). Echo without a parser still refuses `auto` by name. The real model:
tests/engines/test_structured_transformers.py and test_structured_vllm.py.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from fakes.adapters import ToolAutoEchoAdapter
from helpers import API, TEST_REGISTRY, chat_body, load, sse_events

REGISTRY = TEST_REGISTRY.replace(
    "models:",
    "  toolauto:\n    module: fakes.adapters:ToolAutoEchoAdapter\n"
    "models:\n  toolauto: {backend: toolauto, model: echo}",
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def toolauto(app_factory: Any) -> Any:
    """A test client with the Hermes-parsing echo loaded."""
    from litestar.testing import TestClient  # noqa: PLC0415

    with TestClient(app_factory(registry_text=REGISTRY)) as client:
        load(client, preset="toolauto")
        yield client


def _stream(client: Any, text: str, **extra: Any) -> list[dict[str, Any]]:
    body = chat_body(text, tools=TOOLS, stream=True, **extra)
    r = client.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_auto_call_parsed(toolauto: Any) -> None:
    """Text before the call is content; the call's arguments are the JSON the model wrote."""
    body = chat_body(f"Let me check. {CALL}", tools=TOOLS)
    r = toolauto.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check. "
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_auto_two_calls_and_explicit_auto(toolauto: Any) -> None:
    """Two calls in one answer, `tool_choice: "auto"` spelled out, no content (None)."""
    second = CALL.replace("Paris", "Rome")
    body = chat_body(f"{CALL} {second}", tools=TOOLS, tool_choice="auto")
    r = toolauto.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] is None
    cities = [json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]]
    assert cities == ["Paris", "Rome"]


def test_auto_plain_text_stays_content(toolauto: Any) -> None:
    """No call: the answer as it is, the engine's finish reason, no tool_calls."""
    body = chat_body("the weather is fine", tools=TOOLS)
    r = toolauto.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "the weather is fine"
    assert not choice["message"].get("tool_calls")
    assert choice["finish_reason"] == "stop"


def test_auto_unreadable_call_stays_content(toolauto: Any) -> None:
    """A call the parser cannot read (bad JSON) is sent as text, never a 500."""
    text = "<tool_call> {not json} </tool_call>"
    r = toolauto.post("/v1/chat/completions", json=chat_body(text, tools=TOOLS), headers=API)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == text
    assert choice["finish_reason"] == "stop"


def test_an_unreadable_call_logs_one_line_not_a_traceback(
    toolauto: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """VLLM's parser logs its JSON error with a traceback; a client must not flood the log."""
    text = "<tool_call> {not json} </tool_call>"
    with caplog.at_level(logging.DEBUG):
        r = toolauto.post("/v1/chat/completions", json=chat_body(text, tools=TOOLS), headers=API)
    assert r.status_code == 200, r.text
    parser_records = [rec for rec in caplog.records if "tool_parsers" in rec.name]
    assert parser_records  # vLLM's parser did log: the filter keeps the line
    assert all(rec.exc_info is None and rec.exc_text is None for rec in parser_records)
    assert "Traceback" not in caplog.text


def test_auto_stream_call(toolauto: Any) -> None:
    """Content streams until the call starts; then its name, then its arguments in pieces."""
    chunks = _stream(toolauto, f"Let me check. {CALL}")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me check. "
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert len(calls) > 2  # the name, then the arguments as the echo's tokens arrive
    assert all(c["index"] == 0 for c in calls)
    first, rest = calls[0], calls[1:]
    assert first["id"].startswith("chatcmpl-tool-")
    assert (first["type"], first["function"]["name"]) == ("function", "get_weather")
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
               for c in rest)  # fmt: skip
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert arguments == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "<tool_call>" not in content


#: two calls, the second with its arguments before its name, oddly spaced and escaped
ODD = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\\u00eds", "days": [1 , 2.50]}}'
    '\n</tool_call>\n<tool_call>\n{ "arguments" : {"city":"Rome"} , "name" : "get_weather" }'
    "\n</tool_call>"
)


@pytest.mark.parametrize("text", [CALL, ODD, f"Sure. {CALL} {CALL}"], ids=["one", "odd", "two"])
def test_auto_streamed_arguments_equal_the_whole(toolauto: Any, text: str) -> None:
    """Joined pieces equal the whole answer's arguments; the client's accumulation agrees."""
    from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: PLC0415
    from openai.types.chat import ChatCompletionChunk  # noqa: PLC0415

    r = toolauto.post("/v1/chat/completions", json=chat_body(text, tools=TOOLS), headers=API)
    assert r.status_code == 200, r.text
    whole = r.json()["choices"][0]
    state: Any = ChatCompletionStreamState()
    for chunk in _stream(toolauto, text):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == whole["finish_reason"] == "tool_calls"
    assert (streamed.message.content or None) == whole["message"]["content"]
    calls = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    assert calls == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    for _, arguments in calls:
        assert isinstance(json.loads(arguments)["city"], str)


def test_auto_stream_cut_inside_a_call(toolauto: Any) -> None:
    """Cut by max_tokens inside the arguments: the call went out named, the reason is length."""
    chunks = _stream(toolauto, CALL, max_tokens=4)
    calls = [
        tc
        for c in chunks
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_auto_stream_plain_text(toolauto: Any) -> None:
    """No call: every token streams as content (a trailing `<tool` is held, then sent)."""
    chunks = _stream(toolauto, "fine and sunny <tool")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "fine and sunny <tool"
    assert not any(d.get("tool_calls") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_auto_stream_refuses_logprobs(toolauto: Any) -> None:
    """A streamed auto answer is parsed whole: per-token logprobs are refused by name."""
    body = chat_body(CALL, tools=TOOLS, stream=True, logprobs=True)
    r = toolauto.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize(("choice", "kept"), [("auto", True), ("required", True), ("none", False)])
def test_hermes_keeps_special_tokens(toolauto: Any, choice: str, kept: bool) -> None:
    """Hermes keeps special tokens while tools are in play (vLLM's `adjust_request`).

    `<tool_call>` may be a special token; `tool_choice: none` keeps the default.
    """
    body = chat_body("hi", tools=TOOLS, tool_choice=choice, max_tokens=4)
    r = toolauto.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    assert ToolAutoEchoAdapter.last[0].options.skip_special_tokens is not kept


def test_echo_without_parser_refuses_auto(client: Any) -> None:
    """A backend with no tool parser still answers 400 naming tool_choice."""
    load(client, preset="echo")
    r = client.post("/v1/chat/completions", json=chat_body(CALL, tools=TOOLS), headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("tool_choice", "tools")
