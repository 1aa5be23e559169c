r"""Bounded regular expressions and a streaming redactor that agrees with whole-text redaction.

A stream is redacted as it goes, so a secret split across two deltas ("jo" + "hn@x.com") must
still be caught, without holding the whole completion back. The redactor holds back only the
last `width` characters (the longest text any pattern can match), which is why every pattern
must have a bounded match length: `x+` or `.*` would force holding back everything, and is
refused at start-up. Patterns may not use anchors (`^`, `$`, `\A`, `\Z`), lookarounds or
back-references: across chunk boundaries they would need text the redactor has already emitted
or not yet seen. Word boundaries (`\b`, `\B`) are allowed: one character of context on each
side is kept for them.

The property `feed(c1) + ... + feed(cn) + end() == redact(c1 + ... + cn)` for every split is
tested with hypothesis (tests/property/test_redact_stream.py).

Must never: emit text that a later chunk could turn into (part of) a match; hold back more than
`width` characters.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any

#: longest match a redaction pattern may have (characters held back while streaming)
MAX_PATTERN_WIDTH = 256
_parser: Any = importlib.import_module("re._parser")  # the stdlib parser (no public API)
_ALLOWED_AT = {"AT_BOUNDARY", "AT_NON_BOUNDARY", "AT_LOC_BOUNDARY", "AT_LOC_NON_BOUNDARY",
               "AT_UNI_BOUNDARY", "AT_UNI_NON_BOUNDARY"}  # fmt: skip
_REFUSED_OPS = {
    "ASSERT": "lookarounds are not allowed",
    "ASSERT_NOT": "lookarounds are not allowed",
    "GROUPREF": "back-references are not allowed",
    "GROUPREF_EXISTS": "back-references are not allowed",
}


class PatternError(ValueError):
    """A redaction pattern that cannot be applied to a stream safely."""


def _walk(node: Any) -> None:
    data = getattr(node, "data", None)
    if data is not None:
        for op, av in data:
            name = str(op)
            if name in _REFUSED_OPS:
                raise PatternError(_REFUSED_OPS[name])
            if name == "AT" and str(av) not in _ALLOWED_AT:
                raise PatternError("anchors (^, $, \\A, \\Z) are not allowed")
            _walk(av)
    elif isinstance(node, tuple | list):
        for item in node:
            _walk(item)


def pattern_width(pattern: str, flags: int = 0) -> int:
    """Longest text `pattern` can match; `PatternError` when unbounded, empty-matching or unsafe."""
    try:
        tree = _parser.parse(pattern, flags)
    except re.error as exc:
        raise PatternError(f"not a valid regular expression: {exc.msg}") from None
    _walk(tree)
    lo, hi = tree.getwidth()
    if lo == 0:
        raise PatternError("pattern can match empty text")
    if hi > MAX_PATTERN_WIDTH:
        raise PatternError(
            f"pattern's matches are unbounded or longer than {MAX_PATTERN_WIDTH} characters "
            "(use {m,n} instead of + and *)"
        )
    return int(hi)


class Redactor:
    """Several bounded patterns applied as one alternation, leftmost match first."""

    __slots__ = ("pattern", "replacement", "width")

    def __init__(
        self, patterns: Sequence[str], replacement: str, *, ignore_case: bool = False
    ) -> None:
        flags = re.IGNORECASE if ignore_case else 0
        self.width = max(pattern_width(p, flags) for p in patterns)
        try:
            self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns), flags)
        except re.error as exc:  # e.g. two patterns naming the same group
            raise PatternError(f"patterns do not combine: {exc.msg}") from None
        self.replacement = replacement

    def _repl(self, _: re.Match[str]) -> str:
        return self.replacement

    def redact(self, text: str) -> str:
        """Whole-text redaction."""
        return self.pattern.sub(self._repl, text)

    def stream(self) -> StreamRedactor:
        """A redactor for one stream of text."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts text that arrives in pieces; see the module docstring for the guarantee."""

    __slots__ = ("_left", "_pending", "_redactor")

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._left = ""  # the last emitted original character (context for \b)
        self._pending = ""  # original text not yet emitted

    def feed(self, text: str) -> str:
        """Add a piece; return the redacted text that no later piece can change."""
        if not text:
            return ""
        self._pending += text
        return self._drain(final=False)

    def end(self) -> str:
        """The stream ended: redact and return what was held back."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> str:
        r = self._redactor
        buf = self._left + self._pending
        size = len(buf)
        pos = len(self._left)
        # a match starting at s is settled when s + width + 1 <= size: it cannot grow into text
        # not seen yet, and \b after it can see its next character
        settled = size if final else size - r.width - 1
        out: list[str] = []
        search = r.pattern.search
        while pos < size:
            m = search(buf, pos)
            if m is None or m.start() > settled:
                break
            start, end = m.span()
            out.append(buf[pos:start])
            out.append(r.replacement)
            pos = end
        # starts at or after size - width might still begin a match: hold them back
        safe = size if final else max(pos, size - r.width)
        out.append(buf[pos:safe])
        self._left = buf[safe - 1 : safe] if safe > 0 else ""
        self._pending = buf[safe:]
        return "".join(out)
