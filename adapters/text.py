"""Text helpers shared by adapters whose engines do not handle stop strings themselves.

`StopMatcher` holds back just enough streamed text to recognise a stop string that arrives split
across tokens, and trims the stop string (and anything after it) from the output, which is what
OpenAI and vLLM do with `stop`.

Cost: each stop string carries a Knuth-Morris-Pratt state (how much of it the stream's end
already matches), advanced over each new chunk only. A chunk costs O(len(chunk)) per stop string,
whatever the stop strings' lengths and whatever was held back; a stop whose first character is
not in the chunk (and that is not part-way matched) costs one C-level `find`. Nothing is ever
rescanned, so a long stop string cannot make matching quadratic.

Must never: hold back more than the longest stop string minus one character; lose text.
"""

from __future__ import annotations

from collections.abc import Sequence


def _failure(stop: str) -> tuple[int, ...]:
    """KMP failure function: for each prefix, the longest proper border's length."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


class StopMatcher:
    """Incremental stop-string detection over a stream of text pieces."""

    __slots__ = ("_buffer", "_fail", "_state", "_stops", "matched", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._fail = tuple(_failure(s) for s in self._stops)
        self._state = [0] * len(self._stops)
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that hit (vLLM's `stop_reason`), once `stopped`."""

    def feed(self, text: str) -> str:
        """Add `text`; return what is safe to emit now. Sets `stopped` when a stop string hit."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._buffer + text
        base = len(self._buffer)
        # the stop that completes first wins (as it would streaming one character at a time);
        # among those completing at the same character, the longest (it started first)
        best: tuple[int, int] | None = None  # (end offset in text, -length)
        for k, stop in enumerate(self._stops):
            end, self._state[k] = self._advance(stop, self._fail[k], self._state[k], text)
            if end is not None and (best is None or (end, -len(stop)) < best):
                best = (end, -len(stop))
                self.matched = stop
        if best is not None:
            self.stopped = True
            self._buffer = ""
            return buf[: base + best[0] + best[1]]
        keep = max(self._state)
        self._buffer = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    @staticmethod
    def _advance(stop: str, fail: tuple[int, ...], state: int, text: str) -> tuple[int | None, int]:
        """Run one stop's KMP over `text`: (end offset of a full match or None, new state)."""
        start = 0
        if state == 0:
            start = text.find(stop[0])
            if start < 0:
                return None, 0
        last = len(stop)
        for i in range(start, len(text)):
            ch = text[i]
            while state and stop[state] != ch:
                state = fail[state - 1]
            if stop[state] == ch:
                state += 1
                if state == last:
                    return i + 1, 0
        return None, state

    def flush(self) -> str:
        """Return held-back text at the end of the stream (no stop string completed)."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out


def tag_overlap(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back while a tag may follow).

    The one copy of the hold-back rule that tool-call parsing, the reasoning split and the
    streamed tool frames share: a piece of a tag never leaves before the tag is decided.
    """
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
