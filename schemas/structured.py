"""Structured output: `response_format` and vLLM's `structured_outputs`, checked and bounded.

The service turns a chat request's constraint into one engine-neutral `StructuredOutput` that the
adapter hands to its engine's grammar machinery (vLLM's structured-output backend, xgrammar on
transformers). Everything a client sends here is compiled into an automaton by the engine, so
sizes are bounded before it gets there; a JSON schema must be a valid JSON Schema (checked with
`jsonschema`'s meta-schema) and a regex must compile. Field rules follow vLLM's chat server
(`ChatCompletionRequest.check_structured_outputs_count`, `structured_outputs_from_response_format`
and `SamplingParams._validate_structured_outputs`).

Must never: import the service or an engine; let a refusal out without the field it concerns.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import msgspec

from schemas.errors import InvalidRequestError, UnsupportedParameterError
from schemas.generation import StructuredKind, StructuredOutput

#: a JSON Schema document, serialised, in bytes
MAX_SCHEMA_BYTES = 64 * 1024
#: objects and arrays nested in a schema document (vLLM's own limit is 64)
MAX_SCHEMA_DEPTH = 32
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_CHARS = 64 * 1024
#: a counted repetition (`{m}`, `{m,n}`) in a regex or grammar: the automaton grows with it
#: (xgrammar compiles `[a-z]{200}` in about 1.5 s on this CPU), and compiling is not preemptible
MAX_REPEAT = 256
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
#: the name of a `json_schema` response format, as OpenAI documents it
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_KINDS: tuple[StructuredKind, ...] = ("json", "regex", "choice", "grammar")
_JSON_SCHEMA_KEYS = frozenset({"name", "description", "schema", "strict"})


def _depth(value: Any, limit: int) -> bool:
    """Whether `value` nests objects/arrays deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


@functools.cache
def _schema_checker() -> Callable[[dict[str, Any]], None]:
    # imported on first use: jsonschema costs tens of milliseconds at start-up
    import jsonschema  # type: ignore[import-untyped]  # noqa: PLC0415  (no stubs installed)
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]  # noqa: PLC0415

    def check(schema: dict[str, Any]) -> None:
        try:
            validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise ValueError(f"{exc.message[:200]}{f' at {where}' if where else ''}") from None

    return check


def check_schema(schema: Any, param: str) -> str:
    """A JSON Schema value (object, or JSON text of one), bounded and valid; its JSON text."""
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(
                f"{param}: the schema must be at most {MAX_SCHEMA_BYTES} bytes", param=param
            )
        try:
            schema = msgspec.json.decode(schema)
        except msgspec.DecodeError:
            raise InvalidRequestError(
                f"{param}: the schema is not valid JSON", param=param
            ) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param}: the schema must be a JSON object", param=param)
    if _depth(schema, MAX_SCHEMA_DEPTH):
        raise InvalidRequestError(
            f"{param}: the schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep",
            param=param,
        )
    text = msgspec.json.encode(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"{param}: the schema must be at most {MAX_SCHEMA_BYTES} bytes", param=param
        )
    problem = _schema_problem(text.decode())
    if problem is not None:
        raise InvalidRequestError(f"{param}: not a valid JSON Schema: {problem}", param=param)
    return text.decode()


@functools.lru_cache(maxsize=256)
def _schema_problem(text: str) -> str | None:
    """Why the schema (JSON text) fails the meta-schema, or None.

    Cached by text: the meta-schema check costs milliseconds and clients resend the same schema.
    """
    try:
        _schema_checker()(msgspec.json.decode(text))
    except ValueError as exc:
        return str(exc)
    return None


def _from_response_format(rf: dict[str, Any]) -> StructuredOutput | None:
    kind = rf.get("type")
    extra = sorted(set(rf) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in rf):
        name = extra[0] if extra else "json_schema"
        raise InvalidRequestError(
            f"response_format.{name[:64]} is not a field of a {kind} response format",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    spec = rf.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "When response_format type is 'json_schema', the 'json_schema' field must be "
            "provided (an object with 'name' and 'schema')",
            param="response_format",
        )
    unknown = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise InvalidRequestError(
            f"{param}.{unknown[0][:64]} is not a field of json_schema", param=param
        )
    fn_name: Any = spec.get("name")
    if not isinstance(fn_name, str) or not _NAME.fullmatch(fn_name):
        raise InvalidRequestError(
            f"{param}.name must be 1 to 64 letters, digits, '_' or '-'", param=f"{param}.name"
        )
    if not isinstance(spec.get("strict", False), bool | None):
        raise InvalidRequestError(f"{param}.strict must be a boolean", param=f"{param}.strict")
    if not isinstance(spec.get("description", ""), str | None):
        raise InvalidRequestError(
            f"{param}.description must be a string", param=f"{param}.description"
        )
    if "schema" not in spec:
        raise InvalidRequestError(f"{param}.schema is required", param=f"{param}.schema")
    # strict or not, the engine enforces the schema (vLLM does the same)
    param = f"{param}.schema"
    return StructuredOutput("json", check_schema(spec["schema"], param), param)


def _from_extension(so: dict[str, Any]) -> StructuredOutput:  # noqa: C901  (a flat checklist)
    unknown = sorted(k for k in so if k not in _KINDS)
    if unknown:
        name = f"structured_outputs.{unknown[0][:64]}"
        raise UnsupportedParameterError(f"{name} is not supported", param=name)
    kinds: list[StructuredKind] = [k for k in _KINDS if so.get(k) is not None]
    if len(kinds) != 1:
        raise InvalidRequestError(
            "structured_outputs takes exactly one of 'json', 'regex', 'choice' or 'grammar'",
            param="structured_outputs",
        )
    kind: StructuredKind = kinds[0]
    value = so[kind]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return StructuredOutput("json", check_schema(value, param), param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise InvalidRequestError(f"{param} must be a non-empty array of strings", param=param)
        if len(value) > MAX_CHOICES or any(len(c) > MAX_CHOICE_CHARS for c in value):
            raise InvalidRequestError(
                f"{param}: at most {MAX_CHOICES} choices of at most {MAX_CHOICE_CHARS} characters",
                param=param,
            )
        return StructuredOutput("choice", tuple(value), param)
    limit = MAX_REGEX_CHARS if kind == "regex" else MAX_GRAMMAR_CHARS
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise InvalidRequestError(
            f"{param} must be a string of at most {limit} characters, without NUL", param=param
        )
    if kind == "grammar" and not value.strip():
        raise InvalidRequestError(f"{param} cannot be empty", param=param)
    if any(int(n) > MAX_REPEAT for m in _REPEAT.finditer(value) for n in m.groups() if n):
        raise InvalidRequestError(
            f"{param}: counted repetitions ({{m,n}}) may be at most {MAX_REPEAT}", param=param
        )
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise InvalidRequestError(f"{param}: invalid regex ({exc})", param=param) from None
    return StructuredOutput(kind, value, param)


def from_request(response_format: Any, structured_outputs: Any) -> StructuredOutput | None:
    """The one constraint a chat request asks for, or None; 400 naming the field if it is bad."""
    rf = response_format if isinstance(response_format, dict) else None
    constrained = rf is not None and rf.get("type") != "text"
    if structured_outputs is not None:
        if constrained:
            raise InvalidRequestError(
                "use either response_format or structured_outputs, not both",
                param="structured_outputs",
            )
        if not isinstance(structured_outputs, dict):
            raise InvalidRequestError(
                "structured_outputs must be an object", param="structured_outputs"
            )
        return _from_extension(structured_outputs)
    return _from_response_format(rf) if rf is not None else None


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar matching exactly one of `choices` (vLLM's `choice_as_grammar`)."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"\\u{ord(ch):04x}"
        return ch

    return "root ::= " + " | ".join('"' + "".join(map(escape, c)) + '"' for c in choices)
