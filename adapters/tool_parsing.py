"""Auto tool choice: the model's own tool-call text, parsed by vLLM's tool parsers.

With `tool_choice: "auto"` the model decides whether to call a tool and writes the call in its own
format (Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` for SmolLM2, Qwen,
Hermes). vLLM's server parses that text with the parser `--tool-call-parser` names; a preset names
it the same way, as the engine param `tool_call_parser`, and the adapter builds it here at load
with its tokenizer. The chat serving runs an answer's full text through `extract`.

Must never: accept a parser name outside `TOOL_CALL_PARSERS` (vLLM's registry also imports plugin
paths); raise on model output (text a parser cannot read stays content).
"""

from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace
from typing import Any

from attrs import frozen

from schemas.errors import InvalidRequestError
from schemas.generation import ToolCall
from schemas.validators import FieldValueError

#: vLLM parser names (`vllm.tool_parsers.ToolParserManager`) this service accepts: the ones whose
#: whole-text extraction is checked here (tests/api/test_tool_auto.py and the engine tests)
TOOL_CALL_PARSERS = frozenset({"hermes"})
#: parsers whose `adjust_request` sets `skip_special_tokens = False` when tools are in play
_KEEP_SPECIAL_TOKENS = frozenset({"hermes"})
#: bounds on what one answer may turn into
MAX_CALLS = 128
MAX_ARGUMENTS_CHARS = 64 * 1024


def check_parser_name(_: Any, attribute: Any, value: str | None) -> None:
    """Attrs validator of the `tool_call_parser` engine param."""
    if value is not None and value not in TOOL_CALL_PARSERS:
        raise FieldValueError(
            attribute.name,
            f"tool_call_parser must be one of {sorted(TOOL_CALL_PARSERS)} (vLLM's parser names)",
        )


def require_vllm(name: str | None, backend: str) -> None:
    """Refuse (400, naming the setting) a parser on an install without vLLM's parsers."""
    if name is not None and not parsers_available():
        raise InvalidRequestError(
            f"tool_call_parser '{name}' needs vLLM's tool parsers, and vllm is not installed "
            f"alongside backend '{backend}'",
            param="$.engine_params.tool_call_parser",
        )


def parsers_available() -> bool:
    """Whether vLLM's tool parsers can be imported here (a transformers-only install has none)."""
    return importlib.util.find_spec("vllm") is not None


@frozen
class ParsedCalls:
    """An answer split by the parser: the text outside the calls, and the calls."""

    content: str | None
    calls: tuple[ToolCall, ...]


class ToolCallParser:
    """One loaded model's tool-call parser (vLLM's class, built with the model's tokenizer)."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        with warnings.catch_warnings():
            # vLLM's import pulls in torch's inductor, which warns about its own deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            from vllm.tool_parsers import ToolParserManager  # noqa: PLC0415  (heavy, at load)

            self._cls: Any = ToolParserManager.get_tool_parser(name)
        self.name = name
        self.keeps_special_tokens = name in _KEEP_SPECIAL_TOKENS
        """Requests with tools keep special tokens in the text (vLLM's `adjust_request`)."""
        self._tokenizer = tokenizer
        self.start: str = str(getattr(self._cls, "tool_call_start_token", "<tool_call>"))
        """The text that opens a call: a stream holds its text back from here."""
        self._cls(tokenizer)  # fails at load, not at the first request

    def extract(self, text: str) -> ParsedCalls | None:
        """The calls in a whole answer; None when it holds none (or none the parser can read)."""
        if self.start not in text:
            return None
        # a fresh parser per answer: vLLM's keep streaming state on the instance
        parser = self._cls(self._tokenizer)
        # Hermes reads no field of the request; the others read `tools` / `tool_choice`
        request = SimpleNamespace(tools=None, tool_choice="auto")
        try:
            info = parser.extract_tool_calls(text, request)
        except Exception:
            return None
        if not info.tools_called or not info.tool_calls:
            return None
        calls = []
        for call in info.tool_calls[:MAX_CALLS]:
            arguments = str(call.function.arguments)
            if len(arguments) > MAX_ARGUMENTS_CHARS:
                return None
            calls.append(ToolCall(str(call.id), str(call.function.name)[:64], arguments))
        return ParsedCalls(info.content or None, tuple(calls))
