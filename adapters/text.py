"""Text helpers shared by adapters whose engines do not handle stop strings themselves.

`StopMatcher` holds back just enough streamed text to recognise a stop string that arrives split
across tokens, and trims the stop string (and anything after it) from the output, which is what
OpenAI and vLLM do with `stop`.

Must never: hold back more than the longest stop string minus one character; lose text.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Incremental stop-string detection over a stream of text pieces."""

    __slots__ = ("_buffer", "_stops", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add `text`; return what is safe to emit now. Sets `stopped` when a stop string hit."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._buffer + text
        # the stop that completes first wins (as it would streaming one character at a time);
        # among those, the one that started first
        hits = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped = True
            self._buffer = ""
            return buf[: min(hits)[1]]
        keep = self._partial_suffix(buf)
        self._buffer = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Return held-back text at the end of the stream (no stop string completed)."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
