"""StopMatcher: chunking never changes what is emitted, stops split across chunks are caught."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.text import StopMatcher

# a small alphabet makes stop strings occur, overlap and split across chunks often
_ALPHABET = "ab c"
_TEXT = st.text(alphabet=_ALPHABET, max_size=30)
_STOP = st.text(alphabet=_ALPHABET, min_size=1, max_size=4)


def _not_inside_another(stops: list[str]) -> bool:
    """No stop string occurs inside a different one (see the contained-stop test below)."""
    return not any(a != b and a in b for a in stops for b in stops)


_STOPS = st.lists(_STOP, max_size=3).filter(_not_inside_another)


def expected_output(text: str, stops: list[str]) -> str:
    """The whole text cut at the first occurrence of any stop string (OpenAI's `stop`)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


def stream(chunks: list[str], stops: list[str]) -> tuple[str, bool, int]:
    """Feed `chunks`, flush; return the emitted text, `stopped`, and the most ever held back."""
    matcher = StopMatcher(stops)
    out = []
    fed = 0
    held = 0
    for chunk in chunks:
        out.append(matcher.feed(chunk))
        fed += len(chunk)
        held = max(held, fed - len("".join(out))) if not matcher.stopped else held
    out.append(matcher.flush())
    return "".join(out), matcher.stopped, held


@st.composite
def text_and_chunks(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A text and an arbitrary chunking of it (empty chunks included)."""
    text = draw(_TEXT)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 3)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(case=text_and_chunks(), stops=_STOPS)
def test_any_chunking_emits_what_the_whole_text_would(
    case: tuple[str, list[str]], stops: list[str]
) -> None:
    """Streaming in any chunks gives the whole text cut at its first stop string."""
    text, chunks = case
    emitted, stopped, _ = stream(chunks, stops)
    assert emitted == expected_output(text, stops)
    assert stopped == any(s in text for s in stops)


@settings(max_examples=300, deadline=None)
@given(case=text_and_chunks(), stops=_STOPS)
def test_never_holds_back_more_than_a_stop_prefix(
    case: tuple[str, list[str]], stops: list[str]
) -> None:
    """At most the longest stop string minus one character is held back between chunks."""
    _, chunks = case
    _, _, held = stream(chunks, stops)
    assert held <= max((len(s) - 1 for s in stops), default=0)


def test_stop_split_across_chunks_is_caught() -> None:
    """A stop string arriving one character per chunk still stops the stream and is trimmed."""
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("hello <") == "hello "
    assert matcher.feed("/") == ""
    assert matcher.feed("s") == ""
    assert matcher.feed("> more") == ""
    assert matcher.stopped
    assert matcher.flush() == ""


def test_held_back_text_is_flushed_when_no_stop_completes() -> None:
    """A partial stop at the end of the stream is not lost: flush returns it."""
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("O") == ""
    assert matcher.flush() == "STO"
    assert not matcher.stopped
    assert matcher.flush() == ""


def test_a_false_start_is_released_as_soon_as_it_breaks() -> None:
    """Held-back text comes out with the chunk that shows it is not a stop."""
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ""
    assert matcher.feed("AR") == "STAR"


def test_after_a_stop_nothing_more_is_emitted() -> None:
    """Once stopped, further chunks and the flush emit nothing."""
    matcher = StopMatcher(["x"])
    assert matcher.feed("abxcd") == "ab"
    assert matcher.feed("more") == ""
    assert matcher.flush() == ""


def test_no_stops_and_empty_stops_pass_text_through() -> None:
    """Without stop strings (empty ones are ignored) every chunk is emitted at once."""
    for stops in ([], [""]):
        matcher = StopMatcher(stops)
        assert matcher.feed("anything") == "anything"
        assert matcher.flush() == ""
        assert not matcher.stopped


def test_earliest_stop_wins() -> None:
    """With several stops in one chunk the output ends at the earliest one."""
    matcher = StopMatcher(["c", "b"])
    assert matcher.feed("aabbcc") == "aa"


def test_a_stop_inside_another_stop_does_not_depend_on_chunking() -> None:
    """With stops ['</answer>', 'answer'], one chunk and one character per chunk agree."""
    stops = ["</answer>", "answer"]
    text = "x</answer>y"
    whole, _, _ = stream([text], stops)
    by_char, _, _ = stream(list(text), stops)
    assert whole == by_char
