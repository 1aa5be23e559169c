"""Structured-output requests and their checks, shared by the real-engine tests of each backend.

Every case is asked whole and streamed with the same assertions: the answer ended by itself
(`finish_reason: stop`, so the constraint was met, not cut) and the text satisfies the constraint
(`jsonschema` for schemas, a full regex match, membership of the choices, the grammar's language).
The bundled SmolLM2-135M is tiny: the cases are built so that any answer in the constraint is
short, and only structure is asserted, never quality.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev dependencies

from helpers import API

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "capital"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [a-z]{1,8}"
CHOICES = ["Paris", "London", "Berlin"]
GRAMMAR = 'root ::= "The answer is " ("Paris" | "Rome") "."'
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]


def _json_schema(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def _json_object(text: str) -> None:
    assert isinstance(json.loads(text), dict)


def _regex(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


def _choice(text: str) -> None:
    assert text in CHOICES


def _grammar(text: str) -> None:
    assert text in ("The answer is Paris.", "The answer is Rome.")


#: id -> (request fields, check of the answer's text)
CASES: dict[str, tuple[dict[str, Any], Callable[[str], None]]] = {
    "json_schema": (
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}},
        _json_schema,
    ),
    "json_object": ({"response_format": {"type": "json_object"}}, _json_object),
    "regex": ({"structured_outputs": {"regex": REGEX}}, _regex),
    "choice": ({"structured_outputs": {"choice": CHOICES}}, _choice),
    "grammar": ({"structured_outputs": {"grammar": GRAMMAR}}, _grammar),
    "json": ({"structured_outputs": {"json": SCHEMA}}, _json_schema),
}  # fmt: skip


def ask(url: str, model: str, fields: dict[str, Any], *, stream: bool) -> tuple[str, str]:
    """POST one chat request; (content, finish_reason), the stream's deltas joined."""
    body = {"model": model, "messages": QUESTION, "max_tokens": 48, "temperature": 0, **fields}
    body["stream"] = stream
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    parts: list[str] = []
    finish = ""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=API, timeout=300
    ) as r:
        assert r.status_code == 200, r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            for choice in event["choices"]:
                parts.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(parts), finish


def check_case(url: str, model: str, case: str, *, stream: bool) -> None:
    """One case, asked and checked."""
    fields, check = CASES[case]
    text, finish = ask(url, model, fields, stream=stream)
    assert finish == "stop", (finish, text)
    check(text)


#: (request fields, param the 400 must name) the engine's grammar compiler refuses
UNCOMPILABLE = [
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
]


# --- tools ----------------------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
#: id -> (request fields, finish_reason vLLM gives, the one function a named choice forces)
TOOL_CASES: dict[str, tuple[dict[str, Any], str, str | None]] = {
    "required": ({"tool_choice": "required", "parallel_tool_calls": False}, "tool_calls", None),
    "named": ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
              "stop", "get_time"),
}  # fmt: skip


def _stream_calls(r: httpx.Response) -> tuple[list[dict[str, Any]], str, str]:
    """Tool calls rebuilt from `tool_calls` deltas as a client does; finish reason; content."""
    calls: dict[int, dict[str, Any]] = {}
    finish, content = "", ""
    for line in r.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        assert "error" not in event, event
        for choice in event["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or ():
                call = calls.get(tc["index"])
                if call is None:  # the first delta of a call names it
                    assert tc["id"].startswith("chatcmpl-tool-"), tc
                    assert tc["type"] == "function"
                    call = calls[tc["index"]] = {"id": tc["id"], "type": "function",
                                                 "function": {"name": tc["function"]["name"],
                                                              "arguments": ""}}  # fmt: skip
                else:
                    assert "id" not in tc, tc
                    assert "name" not in tc["function"], tc
                call["function"]["arguments"] += tc["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return [calls[i] for i in sorted(calls)], finish, content


def ask_tools(
    url: str, model: str, fields: dict[str, Any], *, stream: bool
) -> tuple[list[dict[str, Any]], str, str]:
    """POST one tool request; (tool_calls, finish_reason, content)."""
    body = {"model": model, "messages": WEATHER_Q, "max_tokens": 48, "temperature": 0,
            "tools": TOOLS, "stream": stream, **fields}  # fmt: skip
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return (
            choice["message"]["tool_calls"],
            choice["finish_reason"],
            choice["message"]["content"],
        )
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=API, timeout=300
    ) as r:
        assert r.status_code == 200, r.read().decode()
        return _stream_calls(r)


def check_tool_case(url: str, model: str, case: str, *, stream: bool) -> None:
    """The answer is tool calls whose arguments validate against the called function's schema."""
    fields, reason, forced = TOOL_CASES[case]
    calls, finish, content = ask_tools(url, model, fields, stream=stream)
    assert finish == reason, (finish, calls, content)
    assert len(calls) == 1, calls  # named, or required without parallel calls
    assert not content
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("chatcmpl-tool-")
        name = call["function"]["name"]
        assert name == forced or (forced is None and name in SCHEMAS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


#: the Hermes format, forced on the real model (a regex) so that `auto` meets a call to parse
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": '
    r'\{"city": "[A-Z][a-z]{2,8}", "unit": "(celsius|fahrenheit)"\}\}\n</tool_call>'
)
#: the three ways a call is made: its request fields (auto's call forced by `HERMES_CALL`)
STREAMED_TOOL_CASES: dict[str, dict[str, Any]] = {
    "required": {"tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "auto": {"tool_choice": "auto", "max_tokens": 64, "structured_outputs": {"regex": HERMES_CALL}},
}


def check_arguments_stream(url: str, model: str, api_key: str, case: str) -> None:
    """Streamed arguments come in pieces that join to exactly the whole answer's arguments.

    The first delta of the call carries its id, type and name; later ones only argument
    pieces, at least two of them (not the whole arguments at the end). The joined arguments
    equal the non-streamed answer's (greedy: the same text), validate against the function's
    schema, and the official client's stream accumulation rebuilds the same call.
    """
    import openai  # noqa: PLC0415  (only the engine tests use the client here)

    fields = STREAMED_TOOL_CASES[case]
    whole, whole_finish, _ = ask_tools(url, model, fields, stream=False)
    body = {"model": model, "messages": WEATHER_Q, "max_tokens": 48, "temperature": 0,
            "tools": TOOLS, "stream": True, **fields}  # fmt: skip
    pieces: list[str] = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=API, timeout=300
    ) as r:
        assert r.status_code == 200, r.read().decode()
        first: dict[str, Any] | None = None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: ") :])["choices"]:
                for tc in choice["delta"].get("tool_calls") or ():
                    assert tc["index"] == 0, tc
                    if first is None:
                        first = tc
                    pieces.append(tc["function"].get("arguments") or "")
    assert first is not None
    assert first["id"].startswith("chatcmpl-tool-")
    assert first["function"]["name"] == whole[0]["function"]["name"]
    assert len([p for p in pieces if p]) >= 2, pieces  # in pieces, not one
    (call,) = whole
    assert "".join(pieces) == call["function"]["arguments"]
    jsonschema.validate(json.loads("".join(pieces)), SCHEMAS[call["function"]["name"]])
    typed: Any = {"messages": WEATHER_Q, "tools": TOOLS}  # the client's TypedDicts, as JSON
    with (
        openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0) as client,
        client.chat.completions.stream(
            model=model,
            max_tokens=body["max_tokens"],
            temperature=0,
            tool_choice=fields["tool_choice"],
            **typed,
            extra_body={k: v for k, v in fields.items() if k not in ("max_tokens", "tool_choice")},
        ) as events,
    ):
        final = events.get_final_completion()
    (accumulated,) = final.choices[0].message.tool_calls or []
    assert accumulated.function.name == call["function"]["name"]
    assert accumulated.function.arguments == call["function"]["arguments"]
    assert final.choices[0].finish_reason == whole_finish


#: a conversation that went through one tool call: the history a client sends back
HISTORY: list[dict[str, Any]] = [
    *WEATHER_Q,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]  # fmt: skip
