"""Structured output at the service: refused by name where undeclared, bounded where declared.

Echo declares no structured-output feature, so each field is refused naming itself. A fake echo
that declares them (tests/fakes/adapters.py) shows the service's own checks: sizes, depth and
counts bounded, a schema checked against the JSON Schema meta-schema, one constraint at a time;
each refusal a 400 naming the field. What engines do with a valid constraint is tested on the
real engines (tests/engines/test_structured_*.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fakes.adapters import ConstrainedEchoAdapter
from helpers import API, TEST_REGISTRY, chat_body, load, sse_events
from schemas.generation import StructuredOutput, ToolCall
from schemas.structured import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_GRAMMAR_CHARS,
    MAX_REGEX_CHARS,
    MAX_REPEAT,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
)
from schemas.tools import MAX_TOOLS

REGISTRY = TEST_REGISTRY.replace(
    "models:",
    "  constrained:\n    module: fakes.adapters:ConstrainedEchoAdapter\n"
    "models:\n  constrained: {backend: constrained, model: echo}",
)
OBJ = {"type": "object", "properties": {"a": {"type": "string"}}}


def rf_schema(schema: Any, **extra: Any) -> dict[str, Any]:
    """A json_schema response_format."""
    spec = {"name": "x", "schema": schema, **extra}
    return {"response_format": {"type": "json_schema", "json_schema": spec}}


def nested(depth: int) -> dict[str, Any]:
    """A schema whose document nests `depth` objects."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.fixture
def constrained(app_factory: Any) -> Any:
    """A test client with the constrained echo loaded."""
    from litestar.testing import TestClient  # noqa: PLC0415

    with TestClient(app_factory(registry_text=REGISTRY)) as client:
        load(client, preset="constrained")
        yield client


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (rf_schema(OBJ), "response_format"),
        ({"structured_outputs": {"json": OBJ}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "structured_outputs.grammar"),
    ],
)
def test_echo_refuses_each_by_name(client: Any, fields: dict[str, Any], param: str) -> None:
    """Echo honours no constraint: a 400 naming the field, never a silently free answer."""
    load(client, preset="echo")
    r = client.post("/v1/chat/completions", json=chat_body(**fields), headers=API)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, "unsupported_parameter")
    assert "echo" in err["message"]


def test_text_response_format_is_plain_chat(client: Any) -> None:
    """`{"type": "text"}` asks for nothing: echo serves it."""
    load(client, preset="echo")
    body = chat_body(response_format={"type": "text"})
    assert client.post("/v1/chat/completions", json=body, headers=API).status_code == 200


BIG = {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (rf_schema(BIG), "response_format.json_schema.schema"),
        (rf_schema(nested(MAX_SCHEMA_DEPTH + 1)), "response_format.json_schema.schema"),
        (rf_schema({"type": "nonsense"}), "response_format.json_schema.schema"),
        (rf_schema({"minLength": -1}), "response_format.json_schema.schema"),
        (rf_schema([1]), "response_format.json_schema.schema"),
        (rf_schema(OBJ, strict="yes"), "response_format.json_schema.strict"),
        (rf_schema(OBJ, extra=1), "response_format.json_schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a b", "schema": OBJ}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_object", "schema": OBJ}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": " " * (MAX_SCHEMA_BYTES + 1)}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": [1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a"] * (MAX_CHOICES + 1)}},
         "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a" * (MAX_CHOICE_CHARS + 1)]}},
         "structured_outputs.choice"),
        ({"structured_outputs": {"regex": "a" * (MAX_REGEX_CHARS + 1)}},
         "structured_outputs.regex"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": f"[a-z]{{{MAX_REPEAT + 1}}}"}},
         "structured_outputs.regex"),
        ({"structured_outputs": {"regex": f"a{{1, {MAX_REPEAT + 1}}}"}},
         "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": f'root ::= "a"{{0,{MAX_REPEAT + 1}}}'}},
         "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a\x00"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "x" * (MAX_GRAMMAR_CHARS + 1)}},
         "structured_outputs.grammar"),
        ({"structured_outputs": {"grammar": "  "}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"whitespace_pattern": " "}},
         "structured_outputs.whitespace_pattern"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "structured_outputs"),
    ],
)  # fmt: skip
def test_bounds_and_validity(constrained: Any, fields: dict[str, Any], param: str) -> None:
    """Every bad or oversized constraint is a 400 naming the field, before any engine work."""
    r = constrained.post("/v1/chat/completions", json=chat_body(**fields), headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "built"),
    [
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
        (rf_schema(OBJ, strict=True),
         StructuredOutput("json", '{"type":"object","properties":{"a":{"type":"string"}}}',
                          "response_format.json_schema.schema")),
        ({"structured_outputs": {"json": '{"type": "integer"}'}},
         StructuredOutput("json", '{"type":"integer"}', "structured_outputs.json")),
        ({"structured_outputs": {"regex": "a+"}},
         StructuredOutput("regex", "a+", "structured_outputs.regex")),
        ({"structured_outputs": {"choice": ["a", "b"]}},
         StructuredOutput("choice", ("a", "b"), "structured_outputs.choice")),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}},
         StructuredOutput("grammar", 'root ::= "a"', "structured_outputs.grammar")),
        ({"response_format": {"type": "text"}}, None),
    ],
)  # fmt: skip
def test_what_the_adapter_gets(
    constrained: Any, fields: dict[str, Any], built: StructuredOutput | None
) -> None:
    """A valid constraint reaches the adapter as one engine-neutral `StructuredOutput`."""
    r = constrained.post("/v1/chat/completions", json=chat_body(**fields), headers=API)
    assert r.status_code == 200, r.text
    assert ConstrainedEchoAdapter.last[-1].structured == built


# --- tools ----------------------------------------------------------------------------------------

FN = {"type": "function", "function": {"name": "f", "parameters": OBJ}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [FN]}, "tools"),
        ({"tools": [FN], "tool_choice": "required"}, "tools"),
        ({"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "tool_calls": [CALL]}]}, "messages[1].tool_calls"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "call_1"}]},
         "messages[0].tool_call_id"),
    ],
)  # fmt: skip
def test_echo_refuses_tools_by_name(client: Any, fields: dict[str, Any], param: str) -> None:
    """Echo honours no tools: the field, or the history turn carrying calls, is named."""
    load(client, preset="echo")
    r = client.post("/v1/chat/completions", json=chat_body(**fields), headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def fn(name: str = "f", **extra: Any) -> dict[str, Any]:
    """A function tool."""
    return {"type": "function", "function": {"name": name, **extra}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tools": [fn()] * (MAX_TOOLS + 1), "tool_choice": "required"}, "tools"),
        ({"tools": [fn("bad name")], "tool_choice": "required"}, "tools[0].function.name"),
        ({"tools": [fn("x" * 65)], "tool_choice": "required"}, "tools[0].function.name"),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}], "tool_choice": "required"},
         "tools[0].type"),
        ({"tools": [fn(parameters={"type": "nonsense"})], "tool_choice": "required"},
         "tools[0].function.parameters"),
        ({"tools": [fn(parameters=BIG)], "tool_choice": "required"},
         "tools[0].function.parameters"),
        ({"tools": [fn(colour=1)], "tool_choice": "required"}, "tools[0].function.colour"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [fn()], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [fn()], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({"tools": [fn()], "tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tools": [fn()]}, "tool_choice"),  # auto, and no parser configured
        ({"tools": [fn()], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}]},
         "messages[0].tool_calls[0]"),
    ],
)  # fmt: skip
def test_tool_bounds(constrained: Any, fields: dict[str, Any], param: str) -> None:
    """Bad, oversized or unhonourable tool fields are a 400 naming the field."""
    r = constrained.post("/v1/chat/completions", json=chat_body(**fields), headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_forced_tool_constraint_and_history(constrained: Any) -> None:
    """`required` and named become the JSON Schema vLLM builds; history calls reach the adapter."""
    defs = {"D": {"type": "integer"}}
    with_defs = {"type": "object", "properties": {"d": {"$ref": "#/$defs/D"}}, "$defs": defs}
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"}]  # fmt: skip
    body = chat_body(tools=[fn("a", parameters=with_defs), fn("b")], tool_choice="required",
                     parallel_tool_calls=False, messages=messages)  # fmt: skip
    r = constrained.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # echo's text is not the JSON the constraint would force: sent as content, with no calls
    assert (choice["message"]["tool_calls"], choice["finish_reason"]) == ([], "stop")
    gen = ConstrainedEchoAdapter.last[-1]
    assert gen.structured is not None
    assert gen.structured.param == "tool_choice"
    assert json.loads(gen.structured.spec) == {  # type: ignore[arg-type]
        "type": "array", "minItems": 1, "maxItems": 1, "$defs": defs,
        "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": ["a"]},
                            "parameters": {"type": "object",
                                           "properties": {"d": {"$ref": "#/$defs/D"}}}},
             "required": ["name", "parameters"]},
            {"properties": {"name": {"type": "string", "enum": ["b"]},
                            "parameters": {"type": "object", "properties": {}}},
             "required": ["name", "parameters"]},
        ]},
    }  # fmt: skip
    assert [t.name for t in gen.tools] == ["a", "b"]
    assert gen.messages[1].tool_calls == (ToolCall("call_1", "f", "{}"),)
    assert gen.messages[2].tool_call_id == "call_1"
    body = chat_body(tools=[fn("a", parameters=OBJ), fn("b")],
                     tool_choice={"type": "function", "function": {"name": "a"}})  # fmt: skip
    assert constrained.post("/v1/chat/completions", json=body, headers=API).status_code == 200
    named = ConstrainedEchoAdapter.last[-1].structured
    assert named is not None
    assert json.loads(named.spec) == OBJ  # type: ignore[arg-type]


def test_forced_tool_answer_becomes_tool_calls(constrained: Any) -> None:
    """The constraint's JSON (here echoed back) is sent as `tool_calls`, whole and streamed.

    Echo answers with the user's text, so the text is exactly the JSON an engine would produce
    under the constraint: this pins the conversion and the stream's delta shapes.
    """
    tools = [fn("a", parameters=OBJ), fn("b")]
    required = '[{"name": "a", "parameters": {"a": "x y"}}, {"name": "b", "parameters": {}}]'
    body = chat_body(required, tools=tools, tool_choice="required")
    r = constrained.post("/v1/chat/completions", json=body, headers=API)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == ""
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"]) for c in calls] == [
        ("function", "a"),
        ("function", "b"),
    ]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": "x y"}, {}]
    assert all(c["id"].startswith("chatcmpl-tool-") for c in calls)
    events = [json.loads(e) for e in sse_events(
        constrained.post("/v1/chat/completions", json={**body, "stream": True}, headers=API).text
    ) if e != "[DONE]"]  # fmt: skip
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant"}
    streamed = [tc for d in deltas for tc in d.get("tool_calls", ())]
    named_deltas = [tc for tc in streamed if "name" in tc["function"]]
    assert [(tc["index"], tc["function"]["name"]) for tc in named_deltas] == [(0, "a"), (1, "b")]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # named: the id, type and name first, then the arguments in the engine's pieces
    named = chat_body('{"a": "x y z"}', tools=tools,
                      tool_choice={"type": "function", "function": {"name": "a"}})  # fmt: skip
    r = constrained.post("/v1/chat/completions", json=named, headers=API)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "a", "arguments": '{"a": "x y z"}'
    }  # fmt: skip
    r = constrained.post("/v1/chat/completions", json={**named, "stream": True}, headers=API)
    events = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    pieces = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", ())]
    first, *rest = pieces
    assert first["id"].startswith("chatcmpl-tool-")
    assert (first["index"], first["type"], first["function"]["name"]) == (0, "function", "a")
    assert rest
    assert all(
        set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest
    )
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"a": "x y z"}'
    # a cut answer (not complete JSON) is content, with no calls
    r = constrained.post("/v1/chat/completions", json={**body, "max_tokens": 2}, headers=API)
    choice = r.json()["choices"][0]
    assert (choice["finish_reason"], choice["message"]["tool_calls"]) == ("length", [])
    assert choice["message"]["content"]


def _stream_events(client: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=API)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_required_stream_sends_arguments_in_pieces(constrained: Any) -> None:
    """`required`: each call named once, its arguments in pieces joining to the whole answer's.

    Echo's "model output" is the JSON array the constraint would force (echo forces nothing),
    spaced oddly: the pieces are the arguments as `json.dumps` renders them, as the whole.
    """
    answer = ('[{"name": "a", "parameters": {"q": "x y z", "n": [1, 2.0]}},'
              ' {"parameters": {"q": "w"}, "name": "b"}]')  # fmt: skip
    body = chat_body(answer, tools=[fn("a", parameters=OBJ), fn("b")], tool_choice="required")
    whole = constrained.post("/v1/chat/completions", json=body, headers=API).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    chunks = _stream_events(constrained, body)
    deltas = [
        tc
        for c in chunks
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    firsts = {}
    joined: dict[int, str] = {}
    for tc in deltas:
        if tc["index"] not in firsts:
            firsts[tc["index"]] = tc
            assert tc["id"].startswith("chatcmpl-tool-")
            assert tc["type"] == "function"
            joined[tc["index"]] = ""
        else:
            assert set(tc) == {"index", "function"}
        joined[tc["index"]] += tc["function"]["arguments"]
    assert len([tc for tc in deltas if tc["index"] == 0]) > 2  # in pieces, not whole at the end
    assert [firsts[k]["function"]["name"] for k in sorted(firsts)] == ["a", "b"]
    assert [joined[k] for k in sorted(joined)] == [
        c["function"]["arguments"] for c in whole["message"]["tool_calls"]
    ]
    assert joined[0] == '{"q": "x y z", "n": [1, 2.0]}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_required_stream_not_json_stays_content(constrained: Any) -> None:
    """Text that never became a call (no constraint on echo) streams as content, as whole."""
    body = chat_body("no calls here", tools=[fn("a")], tool_choice="required")
    chunks = _stream_events(constrained, body)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "no calls here"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
