"""Auto tool choice: the model's own tool-call text, parsed by vLLM's tool parsers.

With `tool_choice: "auto"` the model decides whether to call a tool and writes the call in its own
format (Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` for SmolLM2, Qwen,
Hermes). vLLM's server parses that text with the parser `--tool-call-parser` names; a preset names
it the same way, as the engine param `tool_call_parser`, and the adapter builds it here at load
with its tokenizer. The chat serving runs an answer's full text through `extract`.

Streaming: `CallStream` reads the calls while the text grows (the Hermes format, and the JSON
array of calls that a `required` tool choice constrains the answer to), so that a stream sends
each call's name once it is complete and then its arguments in pieces, as vLLM's server does.
The pieces are the arguments re-serialised token by token exactly as `json.dumps(value,
ensure_ascii=False)` writes the whole value (what vLLM's parsers, and so the whole answer, send),
so they join to the whole answer's arguments. Only what can no longer change is handed out: a
number waits for the character after it, a surrogate escape for its pair. (The one difference
left: arguments that repeat a key stream both members, where `json.loads` keeps the last.)

Must never: accept a parser name outside `TOOL_CALL_PARSERS` (vLLM's registry also imports plugin
paths); raise on model output (text a parser cannot read stays content).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from types import SimpleNamespace
from typing import Any

from attrs import define, field, frozen

from adapters.text import tag_overlap
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


class _OneLine(logging.Filter):
    """Keeps a record, without its traceback (see `ToolCallParser.__init__`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


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
        # a model's unreadable call makes vLLM's parser log a whole traceback at ERROR: any client
        # could flood the log with them; one line each says the same (the text stays content)
        parser_log = logging.getLogger(self._cls.__module__)
        if not any(isinstance(f, _OneLine) for f in parser_log.filters):
            parser_log.addFilter(_OneLine())
        self.start: str = str(getattr(self._cls, "tool_call_start_token", "<tool_call>"))
        """The text that opens a call: a stream holds its text back from here."""
        self._cls(tokenizer)  # fails at load, not at the first request

    def stream(self) -> CallStream:
        """A reader of one answer's calls as its text grows (Hermes: objects after the tag)."""
        return CallStream(args_key="arguments", start_tag=self.start)

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


# --- streaming ------------------------------------------------------------------------------------

#: characters of a JSON number or literal (`true`, `null`, and Python's `NaN`, `-Infinity`)
_SCALAR = frozenset("0123456789+-.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SPACE = frozenset(" \t\n\r")
_SHORT_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_HEX = frozenset("0123456789abcdefABCDEF")
#: the characters above the control range that `json.dumps` escapes
_ESCAPED = frozenset('"\\')


def _canonical_char(ch: str) -> str:
    """`ch` inside a string as `json.dumps(..., ensure_ascii=False)` writes it."""
    if ch in _ESCAPED or ch < " ":
        return json.dumps(ch)[1:-1]
    return ch


@define
class StreamedCall:
    """One call as read so far: its name once complete, its arguments' canonical pieces."""

    name: str | None = None
    pieces: list[str] = field(factory=list)
    size: int = 0
    """Characters in `pieces` (bounded by `MAX_ARGUMENTS_CHARS`)."""
    complete: bool = False
    """The arguments value has ended."""
    started: bool = False
    """The name was handed out (with the pieces so far)."""
    given: int = 0
    """Pieces already handed out."""

    @property
    def arguments(self) -> str:
        """The canonical arguments read so far."""
        return "".join(self.pieces)


class CallStream:
    """Tool calls read from an answer's text as it grows; `feed` says what is new.

    `start_tag` set (Hermes): each call is a JSON object after the tag, anything between calls
    is skipped. `start_tag` None (`required`): the text is one JSON array of call objects. In
    both, a call object's `name` member names it and its `args_key` member is the arguments.
    Malformed text stops the reading for good (`broken`): what was handed out stays, and the
    caller settles the end with the whole text's parse.
    """

    def __init__(self, *, args_key: str, start_tag: str | None) -> None:
        self.args_key = args_key
        self.start_tag = start_tag
        self.calls: list[StreamedCall] = []
        self.broken = False
        self._call_depth = 1 if start_tag is not None else 2
        self._seeking = start_tag is not None
        self._tag_buf = ""
        self._done = False
        # containers open: [kind, expecting, key of the member being read]
        self._stack: list[list[Any]] = []
        self._in_args = False
        self._out: list[str] = []
        # the token being read: "" none, "s" a string, "k" a key, "n" a number or literal
        self._tok = ""
        self._text: list[str] = []  # a string's characters, kept where they are needed
        self._keep = False
        self._esc: str | None = None  # "" after a backslash, "u..." inside a \\u escape
        self._high: str | None = None  # a high surrogate waiting for its low half
        self._scalar = ""
        self._scan_from = 0

    # -- feeding ----------------------------------------------------------------------------------

    def feed(self, text: str) -> list[tuple[int, str | None, str]]:
        """Read `text`; return (call index, name on its first event else None, new arguments)."""
        i = 0
        while i < len(text) and not self.broken and not self._done:
            if self._seeking:
                tag = self.start_tag
                assert tag is not None  # noqa: S101  (only Hermes seeks)
                buf = self._tag_buf + text[i:]
                at = buf.find(tag)
                if at < 0:
                    self._tag_buf = buf[len(buf) - tag_overlap(buf, tag) :]
                    break
                self._seeking, self._tag_buf = False, ""
                text, i = buf[at + len(tag) :], 0
                continue
            self._step(text[i])
            i += 1
        self._flush()
        return self._events()

    def _events(self) -> list[tuple[int, str | None, str]]:
        events: list[tuple[int, str | None, str]] = []
        for k in range(self._scan_from, len(self.calls)):
            call = self.calls[k]
            if not call.started:
                if call.name is None:
                    continue
                call.started = True
                events.append((k, call.name, "".join(call.pieces)))
                call.given = len(call.pieces)
            elif call.given < len(call.pieces):
                events.append((k, None, "".join(call.pieces[call.given :])))
                call.given = len(call.pieces)
            if call.started and call.complete and k == self._scan_from:
                self._scan_from += 1
        return events

    def _flush(self) -> None:
        """Move this feed's canonical text into the current call."""
        if self._out and self.calls:
            piece = "".join(self._out)
            call = self.calls[-1]
            call.size += len(piece)
            if call.size > MAX_ARGUMENTS_CHARS:
                self.broken = True
            else:
                call.pieces.append(piece)
        self._out.clear()

    # -- the JSON machine -------------------------------------------------------------------------

    def _break(self) -> None:
        self.broken = True

    def _emit(self, text: str) -> None:
        if self._in_args:
            self._out.append(text)

    def _step(self, c: str) -> None:  # noqa: C901, PLR0912  (one character, one flat dispatch)
        if self._tok in ("s", "k"):
            self._string_char(c)
            return
        if self._tok == "n":
            if c in _SCALAR:
                self._scalar += c
                return
            self._end_scalar()
            if self.broken:
                return
        if c in _SPACE:
            return
        frame = self._stack[-1] if self._stack else None
        expecting = frame[1] if frame is not None else "value"
        if expecting == "key":
            if c == '"':
                self._start_string(key=True)
            elif c == "}" and frame is not None and frame[2] is None:
                self._close("{")
            else:
                self._break()
        elif expecting == "colon":
            if c == ":":
                assert frame is not None  # noqa: S101  (a colon is inside an object)
                frame[1] = "value"
                self._emit(": ")
            else:
                self._break()
        elif expecting == "next":
            if c == ",":
                assert frame is not None  # noqa: S101  (a comma is inside a container)
                frame[1] = "key" if frame[0] == "{" else "value"
                if frame[0] == "{":
                    frame[2] = ""  # a member follows: `}` is no longer allowed
                self._emit(", ")
            elif c in "}]":
                self._close("{" if c == "}" else "[")
            else:
                self._break()
        elif c == "]" and frame is not None and frame[0] == "[" and frame[2] is None:
            self._close("[")  # an empty array
        else:
            self._start_value(c)

    def _start_value(self, c: str) -> None:
        depth = len(self._stack)
        if depth == self._call_depth - 1 and c != "{" and self.start_tag is not None:
            self._break()  # a Hermes call is an object
            return
        if depth == 0 and self.start_tag is None and c != "[":
            self._break()  # `required`: one array of calls
            return
        if depth == self._call_depth - 1 and depth and c != "{":
            self._break()  # an element of the `required` array that is not a call
            return
        if depth == self._call_depth and self._stack[-1][2] == self.args_key:
            self._in_args = True  # the arguments value starts
        if c in "{[":
            if depth == self._call_depth - 1:
                if len(self.calls) >= MAX_CALLS:
                    self._break()
                    return
                self._flush()
                self.calls.append(StreamedCall())
            # None: nothing read inside yet (an empty container may close)
            self._stack.append([c, "key" if c == "{" else "value", None])
            self._emit(c)
        elif c == '"':
            self._start_string(key=False)
        elif c in _SCALAR:
            self._tok, self._scalar = "n", c
        else:
            self._break()

    def _close(self, kind: str) -> None:
        frame = self._stack.pop() if self._stack else None
        if frame is None or frame[0] != kind:
            self._break()
            return
        self._emit("}" if kind == "{" else "]")
        self._value_done()

    def _value_done(self, value: str | None = None) -> None:
        """A value ended (`value`: its text when it was a string that was kept)."""
        depth = len(self._stack)
        if depth == self._call_depth and self._in_args:
            self._in_args = False
            self._flush()
            self.calls[-1].complete = True
        if depth == self._call_depth and self._stack[-1][2] == "name" and value is not None:
            self.calls[-1].name = value[:64]
        if depth:
            frame = self._stack[-1]
            frame[1] = "next"
            if frame[0] == "[":
                frame[2] = ""
        elif self.start_tag is not None:
            self._seeking = True  # the call ended: look for the next one
        else:
            self._done = True

    # -- strings ----------------------------------------------------------------------------------

    def _start_string(self, *, key: bool) -> None:
        self._tok = "k" if key else "s"
        depth = len(self._stack)
        # keys of a call object, and its `name`, are read; the rest only streams
        self._keep = depth == self._call_depth and (key or self._stack[-1][2] == "name")
        self._text = []
        self._emit('"')

    def _char(self, ch: str) -> None:
        if self._keep:
            self._text.append(ch)
        if self._in_args:
            self._out.append(_canonical_char(ch))

    def _flush_high(self) -> None:
        if self._high is not None:
            high, self._high = self._high, None
            self._char(high)

    def _code_point(self, code: int) -> None:
        """A `u` escape's code point: surrogate pairs join as Python's json joins them."""
        if self._high is not None:
            if 0xDC00 <= code <= 0xDFFF:
                high, self._high = ord(self._high), None
                self._char(chr(0x10000 + (((high - 0xD800) << 10) | (code - 0xDC00))))
                return
            self._flush_high()
        if 0xD800 <= code <= 0xDBFF:
            self._high = chr(code)
        else:
            self._char(chr(code))

    def _escape_char(self, esc: str, c: str) -> None:
        """`c` after a backslash (`esc` empty) or inside a `u` escape (`esc` its text so far)."""
        self._esc = None
        if esc == "":
            if c == "u":
                self._esc = "u"
            elif c in _SHORT_ESCAPES:
                self._flush_high()
                self._char(_SHORT_ESCAPES[c])
            else:
                self._break()
        elif c not in _HEX:
            self._break()
        elif len(esc) < 4:
            self._esc = esc + c
        else:
            self._code_point(int(esc[1:] + c, 16))

    def _string_char(self, c: str) -> None:
        if self._esc is not None:
            self._escape_char(self._esc, c)
        elif c == "\\":
            self._esc = ""
        else:
            self._flush_high()
            if c == '"':
                self._end_string()
            elif c < " ":
                self._break()  # json.loads refuses raw control characters in strings
            else:
                self._char(c)

    def _end_string(self) -> None:
        key = self._tok == "k"
        self._tok = ""
        self._emit('"')
        text = "".join(self._text) if self._keep else None
        self._text = []
        if key:
            frame = self._stack[-1]
            frame[1], frame[2] = "colon", text if text is not None else ""
            return
        self._value_done(text)

    # -- numbers and literals ---------------------------------------------------------------------

    def _end_scalar(self) -> None:
        token, self._tok, self._scalar = self._scalar, "", ""
        try:
            value = json.loads(token)
        except ValueError:
            self._break()
            return
        if not isinstance(value, int | float | bool) and value is not None:
            self._break()
            return
        self._emit(json.dumps(value))
        self._value_done()
