"""Structured output on vLLM's CPU build (its own structured-output backend) through the service.

The same cases and assertions as tests/engines/test_structured_transformers.py (shared in
tests/structured_cases.py), whole and streamed, over one engine start for the module: each
constraint, and tool calls forced with `tool_choice` `required` and a named function.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from structured_cases import (
    CASES,
    HISTORY,
    QUESTION,
    STREAMED_TOOL_CASES,
    TOOL_CASES,
    TOOLS,
    UNCOMPILABLE,
    check_arguments_stream,
    check_case,
    check_tool_case,
)

from helpers import ADMIN, API, API_KEY, ROOT, LiveServer, make_settings
from registry.registry import AdapterRegistry
from schemas.tools import from_request as tools_from_request
from service.app import create_app

pytestmark = [
    pytest.mark.engine,
    pytest.mark.vllm,
    # importing vLLM 0.32 on torch 2.13 warns about torch.jit; the service thread imports it here
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

PRESET = "smollm2-135m-vllm"


@pytest.fixture(scope="module")
def url(vllm_env: None) -> Iterator[str]:
    """The app over adapters.yaml with the vLLM preset loaded (tests/engines/conftest.py env)."""
    registry = AdapterRegistry.from_file(ROOT / "adapters.yaml", use_entry_points=False)
    with LiveServer(create_app(make_settings(), registry=registry)) as live:
        r = httpx.post(
            f"{live.url}/v1/model/load", json={"preset": PRESET}, headers=ADMIN, timeout=600
        )
        assert r.status_code == 200, r.text
        try:
            yield live.url
        finally:
            httpx.post(f"{live.url}/v1/model/unload", json={}, headers=ADMIN, timeout=600)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_constraint_is_met(url: str, case: str, stream: bool) -> None:
    """The answer ends by itself and satisfies the constraint, whole and streamed."""
    check_case(url, PRESET, case, stream=stream)


@pytest.mark.parametrize(("fields", "param"), UNCOMPILABLE)
def test_uncompilable_constraint_is_a_400(url: str, fields: dict[str, object], param: str) -> None:
    """What vLLM's backend cannot compile is a 400, not an engine error."""
    body = {"model": PRESET, "messages": QUESTION, "max_tokens": 4, **fields}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_forced_tool_calls(url: str, case: str, stream: bool) -> None:
    """`required` and a named function give calls that validate, whole and streamed."""
    check_tool_case(url, PRESET, case, stream=stream)


@pytest.mark.parametrize("case", sorted(STREAMED_TOOL_CASES))
def test_streamed_arguments_join_to_the_whole(url: str, case: str) -> None:
    """Arguments stream in pieces (required, named, auto) that join to the whole answer's."""
    check_arguments_stream(url, PRESET, API_KEY, case)


def test_tool_history(url: str) -> None:
    """A history with a call and its result goes through vLLM's renderer (tools given)."""
    body = {"model": PRESET, "messages": HISTORY, "tools": TOOLS, "tool_choice": "none",
            "max_tokens": 4}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("parallel", [None, False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "b"}}])
def test_tool_schema_is_vllms(choice: Any, parallel: bool | None) -> None:
    """The constraint of a forced tool call is the one vLLM's own server builds."""
    from vllm.entrypoints.openai.chat_completion.protocol import (  # noqa: PLC0415
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools  # noqa: PLC0415

    with_defs = {"type": "object", "properties": {"d": {"$ref": "#/$defs/D"}},
                 "$defs": {"D": {"type": "integer"}}}  # fmt: skip
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": with_defs}},
        {"type": "function", "function": {"name": "b"}},
        *TOOLS,
    ]
    ours = tools_from_request(copy.deepcopy(tools), choice, parallel)
    assert ours is not None
    assert ours.structured is not None
    theirs = get_json_schema_from_tools(
        choice
        if isinstance(choice, str)
        else ChatCompletionNamedToolChoiceParam.model_validate(choice),
        [ChatCompletionToolsParam.model_validate(t) for t in copy.deepcopy(tools)],
        parallel,
    )
    assert json.loads(ours.structured.spec) == theirs  # type: ignore[arg-type]
