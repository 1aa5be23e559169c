"""Function tools on chat completions: `tools`, `tool_choice`, history turns, output tool calls.

The request side follows vLLM's chat server (`ChatCompletionRequest.check_tool_usage`): `tools`
must not be empty, `tool_choice` needs `tools`, tools present and no `tool_choice` means `auto`.
`required` and a named function are enforced with structured output: a JSON Schema of the
call(s) built from the tools' parameter schemas exactly as vLLM's `get_json_schema_from_tools`
builds it, so they hold for any model on any backend that honours a JSON Schema. The output of
such a request is that JSON, turned here into OpenAI `tool_calls`.

Must never: import the service or an engine; accept a tool name outside `^[a-zA-Z0-9_-]{1,64}$`
or an unbounded schema.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

import msgspec
from attrs import frozen

from schemas.errors import InvalidRequestError, UnsupportedParameterError
from schemas.generation import Message, StructuredOutput, Tool, ToolCall
from schemas.structured import MAX_SCHEMA_BYTES, check_schema

MAX_TOOLS = 128
MAX_DESCRIPTION_CHARS = 4096
#: all tools' parameter schemas together, serialised (each one is also held to MAX_SCHEMA_BYTES)
MAX_TOOLS_BYTES = 256 * 1024
#: tool calls one assistant turn of the history may carry
MAX_HISTORY_CALLS = 128
MAX_ARGUMENTS_CHARS = 64 * 1024
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})

ToolMode = Literal["none", "auto", "required", "named"]


@frozen
class ToolPlan:
    """What a request's tool fields ask for."""

    tools: tuple[Tool, ...]
    mode: ToolMode
    name: str | None = None
    """The function a named `tool_choice` forces."""
    structured: StructuredOutput | None = None
    """The constraint that enforces `required` / named."""


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _tool(i: int, raw: Any) -> tuple[Tool, dict[str, Any] | None]:
    param = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function":
        raise UnsupportedParameterError(
            f"{param}: only function tools are supported ({{'type': 'function', ...}})",
            param=f"{param}.type",
        )
    extra = sorted(set(raw) - _TOOL_KEYS)
    if extra:
        raise _bad(f"{param}.{extra[0][:64]}: unknown field of a tool", f"{param}.{extra[0][:64]}")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise _bad(f"{param}.function must be an object", f"{param}.function")
    extra = sorted(set(fn) - _FUNCTION_KEYS)
    if extra:
        where = f"{param}.function.{extra[0][:64]}"
        raise _bad(f"{where}: unknown field of a function", where)
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _bad(
            f"{param}.function.name must be 1 to 64 letters, digits, '_' or '-'",
            f"{param}.function.name",
        )
    description = fn.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
    ):
        raise _bad(
            f"{param}.function.description must be a string of at most "
            f"{MAX_DESCRIPTION_CHARS} characters",
            f"{param}.function.description",
        )
    if not isinstance(fn.get("strict", False), bool | None):
        raise _bad(f"{param}.function.strict must be a boolean", f"{param}.function.strict")
    parameters = fn.get("parameters")
    if parameters is None:
        return Tool(name, description), None
    text = check_schema(parameters, f"{param}.function.parameters")
    return Tool(name, description, text), msgspec.json.decode(text)


def _params_or_empty_object(params: dict[str, Any] | None) -> dict[str, Any]:
    # vLLM's: missing parameters still constrain the arguments to a JSON object
    return params or {"type": "object", "properties": {}}


def _required_schema(
    tools: tuple[Tool, ...], params: list[dict[str, Any] | None], parallel: bool | None
) -> dict[str, Any]:
    """As vLLM's `_get_json_schema_from_tools`: an array of {name, parameters}, $defs hoisted."""
    defs: dict[str, Any] = {}
    variants = []
    for i, (tool, schema) in enumerate(zip(tools, params, strict=True)):
        if schema is not None and "$defs" in schema:
            schema = dict(schema)  # noqa: PLW2901  (the caller's copy stays whole)
            own = schema.pop("$defs")
            if not isinstance(own, dict):
                raise _bad(
                    f"`$defs` in the parameters of tool '{tool.name}' must be an object",
                    f"tools[{i}].function.parameters",
                )
            for key, value in own.items():
                if key in defs and defs[key] != value:
                    raise _bad(
                        f"Tool definition '{key}' has multiple schemas, which is not supported.",
                        "tools",
                    )
                defs[key] = value
        variants.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.name]},
                    "parameters": _params_or_empty_object(schema),
                },
                "required": ["name", "parameters"],
            }
        )
    out: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": variants},
    }
    # only an explicit false opts out of parallel calls (vLLM's rule)
    if parallel is False:
        out["maxItems"] = 1
    if defs:
        out["$defs"] = defs
    return out


def _choice(tool_choice: Any, names: set[str]) -> tuple[ToolMode, str | None]:
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    correct = 'correct usage: {"type": "function", "function": {"name": "my_function"}}'
    if not isinstance(tool_choice, dict):
        raise _bad(
            "tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice"
        )
    if tool_choice.get("type") != "function" or set(tool_choice) - {"type", "function"}:
        raise _bad(f"tool_choice: {correct}", "tool_choice")
    fn = tool_choice.get("function")
    if not isinstance(fn, dict) or set(fn) - {"name"}:
        raise _bad(f"tool_choice.function: {correct}", "tool_choice.function")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"tool_choice.function.name: {correct}", "tool_choice.function.name")
    if name not in names:
        raise _bad(
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            "tool_choice",
        )
    return "named", name


def from_request(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The request's tool fields, checked and bounded; None when it has no tools."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise _bad("When using `tool_choice`, `tools` must be set.", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise _bad(
            "`tools` must not be an empty array; provide at least one tool or omit the field",
            "tools",
        )
    if len(tools) > MAX_TOOLS:
        raise _bad(f"tools: at most {MAX_TOOLS} tools", "tools")
    built = [_tool(i, raw) for i, raw in enumerate(tools)]
    plan_tools = tuple(t for t, _ in built)
    if sum(len(t.parameters or "") for t in plan_tools) > MAX_TOOLS_BYTES:
        raise _bad(
            f"tools: the parameter schemas must total at most {MAX_TOOLS_BYTES} bytes", "tools"
        )
    mode, name = _choice(
        "auto" if tool_choice is None else tool_choice, {t.name for t in plan_tools}
    )
    schema: dict[str, Any] | None = None
    if mode == "required":
        schema = _required_schema(plan_tools, [p for _, p in built], parallel_tool_calls)
    elif mode == "named":
        schema = _params_or_empty_object(next(p for t, p in built if t.name == name))
    structured = None
    if schema is not None:
        text = msgspec.json.encode(schema).decode()
        if len(text) > MAX_SCHEMA_BYTES + MAX_TOOLS_BYTES:
            raise _bad("tools: the tool-call schema is too large", "tools")
        structured = StructuredOutput("json", text, "tool_choice")
    return ToolPlan(plan_tools, mode, name, structured)


def history_calls(i: int, raw: Any) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls`, checked and bounded."""
    param = f"messages[{i}].tool_calls"
    if not isinstance(raw, list) or len(raw) > MAX_HISTORY_CALLS:
        raise _bad(f"{param} must be an array of at most {MAX_HISTORY_CALLS} calls", param)
    calls = []
    for j, call in enumerate(raw):
        where = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            raise _bad(
                f"{where} must be {{'id': str, 'type': 'function', "
                "'function': {'name': str, 'arguments': str}}",
                where,
            )
        if len(fn["arguments"]) > MAX_ARGUMENTS_CHARS or len(call["id"]) > 256:
            raise _bad(f"{where}: arguments or id too long", where)
        calls.append(ToolCall(call["id"], fn["name"][:64], fn["arguments"]))
    return tuple(calls)


def call_id() -> str:
    """A tool call id, as vLLM makes them (`make_tool_call_id`)."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def parse_output(text: str, mode: ToolMode, name: str | None) -> list[ToolCall] | None:
    """The tool calls a `required` / named answer holds; None when it is not complete JSON."""
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None  # cut by max_tokens: the caller sends the text as it is
    if mode == "named":
        assert name is not None  # noqa: S101  (a named plan always has its name)
        return [ToolCall(call_id(), name, text)]  # vLLM sends the arguments as generated
    if not isinstance(value, list):
        return None
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        # as vLLM renders them (json.dumps), so both backends send the same text
        arguments = json.dumps(item.get("parameters", {}), ensure_ascii=False)
        calls.append(ToolCall(call_id(), item["name"], arguments))
    return calls


def wire_calls(calls: list[ToolCall], *, indexed: bool = False) -> list[dict[str, Any]]:
    """OpenAI's `message.tool_calls`; `indexed` for stream deltas (each call's `index`)."""
    return [
        {
            **({"index": k} if indexed else {}),
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for k, c in enumerate(calls)
    ]


def template_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]] | None:
    """`tools=` for a chat template (OpenAI's shape, parameters as objects), None when none."""
    if not tools:
        return None
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description is not None:
            fn["description"] = t.description
        if t.parameters is not None:
            fn["parameters"] = msgspec.json.decode(t.parameters)
        out.append({"type": "function", "function": fn})
    return out


def template_message(m: Message, *, arguments_as_objects: bool) -> dict[str, Any]:
    """One turn for a chat template, with its tool calls or the call it answers.

    Templates that render tool calls (Hermes, Llama 3, Qwen) read `arguments` as an object;
    vLLM's renderer decodes the JSON text itself, so it gets OpenAI's string.
    """
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            arguments: Any = c.arguments
            if arguments_as_objects:
                try:
                    arguments = msgspec.json.decode(c.arguments)
                except msgspec.DecodeError:
                    arguments = c.arguments
            calls.append(
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": arguments},
                }
            )
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
