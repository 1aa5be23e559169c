"""Structured output on the transformers backend (xgrammar) through the whole service.

One real uvicorn and one load of the bundled SmolLM2 for the module. Each constraint is asked
whole and streamed (tests/structured_cases.py holds the cases and their checks); the official
`openai` client's typed calls (`response_format` with a schema, `chat.completions.parse` with a
pydantic model) go through the same server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import cast

import httpx
import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev dependencies
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionToolParam
from structured_cases import (
    CASES,
    HERMES_CALL,
    HISTORY,
    QUESTION,
    SCHEMA,
    SCHEMAS,
    STREAMED_TOOL_CASES,
    TOOL_CASES,
    TOOLS,
    UNCOMPILABLE,
    WEATHER_Q,
    ask_tools,
    check_arguments_stream,
    check_case,
    check_tool_case,
)

from helpers import ADMIN, API, API_KEY, ROOT, LiveServer, make_settings
from registry.registry import AdapterRegistry
from service.app import create_app

pytestmark = [pytest.mark.engine, pytest.mark.transformers]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The app over the repository's adapters.yaml with the smollm2 preset loaded."""
    registry = AdapterRegistry.from_file(ROOT / "adapters.yaml", use_entry_points=False)
    with LiveServer(create_app(make_settings(), registry=registry)) as live:
        r = httpx.post(
            f"{live.url}/v1/model/load", json={"preset": MODEL}, headers=ADMIN, timeout=300
        )
        assert r.status_code == 200, r.text
        yield live.url


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_constraint_is_met(url: str, case: str, stream: bool) -> None:
    """The answer ends by itself and satisfies the constraint, whole and streamed."""
    check_case(url, MODEL, case, stream=stream)


@pytest.mark.parametrize(("fields", "param"), UNCOMPILABLE)
def test_uncompilable_constraint_is_a_400(url: str, fields: dict[str, object], param: str) -> None:
    """What xgrammar cannot compile is a 400 naming the field, not an engine error."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **fields}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


class City(pydantic.BaseModel):
    """The pydantic model `parse` turns into a strict json_schema."""

    city: str = pydantic.Field(max_length=12)
    capital: bool


def test_openai_client_typed_calls(url: str) -> None:
    """`create` with a json_schema response_format, and `parse` with a pydantic model."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as client:
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION[0]["content"]}],
            max_tokens=48,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
            },
        )
        assert out.choices[0].finish_reason == "stop"
        City.model_validate_json(out.choices[0].message.content or "")
        parsed = client.chat.completions.parse(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=48,
            temperature=0,
            response_format=City,
        )
        message = parsed.choices[0].message
        assert isinstance(message.parsed, City)
        assert message.parsed.city == City.model_validate_json(message.content or "").city


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_forced_tool_calls(url: str, case: str, stream: bool) -> None:
    """`required` and a named function give calls that validate, whole and streamed."""
    check_tool_case(url, MODEL, case, stream=stream)


def test_tool_history_is_templated(url: str) -> None:
    """A history with a call and its result is templated (`tool_choice: none`: no calls)."""
    body = {"model": MODEL, "messages": HISTORY, "tools": TOOLS, "tool_choice": "none",
            "max_tokens": 4}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=60)
    assert r.status_code == 200, r.text
    assert "tool_calls" not in r.json()["choices"][0]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_choice_parses_hermes(url: str, stream: bool) -> None:
    """`auto` with the preset's hermes parser: forced Hermes text comes back as a valid call.

    A regex makes the real model write `<tool_call>{...}</tool_call>` (SmolLM2's template does
    not render tools, so unforced it rarely calls); the parser must turn that text into a call
    whose arguments validate against the function's schema, with reason `tool_calls`.
    """
    fields = {"tool_choice": "auto", "max_tokens": 64, "structured_outputs": {"regex": HERMES_CALL}}
    calls, finish, content = ask_tools(url, MODEL, fields, stream=stream)
    assert finish == "tool_calls", (finish, calls, content)
    assert not content
    (call,) = calls
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_weather"])


@pytest.mark.parametrize("case", sorted(STREAMED_TOOL_CASES))
def test_streamed_arguments_join_to_the_whole(url: str, case: str) -> None:
    """Arguments stream in pieces (required, named, auto) that join to the whole answer's."""
    check_arguments_stream(url, MODEL, API_KEY, case)


def test_openai_client_tools(url: str) -> None:
    """The official client's typed call with tools and tool_choice='required'."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as client:
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": WEATHER_Q[0]["content"]}],
            max_tokens=48,
            temperature=0,
            tools=cast("list[ChatCompletionToolParam]", TOOLS),
            tool_choice="required",
            parallel_tool_calls=False,
        )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
