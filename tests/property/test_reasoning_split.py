"""The reasoning split: any chunking gives the whole-text split, and no text is lost."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.reasoning import CLOSE_TAG, OPEN_TAG, ReasoningSplitter, Start, split_reasoning

# Texts built from pieces that are likely to form, break and nest tags, plus free text.
_PIECES = st.sampled_from(
    [
        OPEN_TAG,
        CLOSE_TAG,
        "<",
        "</",
        "<th",
        "</thi",
        "think>",
        ">",
        " ",
        "\n",
        "\t",
        "a",
        "é",
        "x y",
    ]
)
_TEXTS = st.one_of(
    st.lists(_PIECES, max_size=12).map("".join),
    st.text(max_size=40),
    st.builds(
        lambda pre, r, c: f"{pre}{OPEN_TAG}{r}{CLOSE_TAG}{c}",
        st.sampled_from(["", " ", "\n\n", " \t\n"]),
        st.text(max_size=15),
        st.text(max_size=15),
    ),
)


@st.composite
def text_and_cuts(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A text and an arbitrary chunking of it (empty chunks included)."""
    text = draw(_TEXTS)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 3)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


_STARTS: tuple[Start, ...] = ("outside", "inside", "assumed")


def _stream(chunks: list[str], *, start: Start) -> tuple[str, str]:
    splitter = ReasoningSplitter(start=start)
    reasoning, content = [], []
    for chunk in chunks:
        r, c = splitter.feed(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = splitter.flush()
    reasoning.append(r)
    content.append(c)
    return "".join(reasoning), "".join(content)


@given(text_and_cuts(), st.sampled_from(_STARTS))
def test_any_chunking_gives_the_whole_text_split(case: tuple[str, list[str]], start: Start) -> None:
    """Feeding any chunking and flushing yields exactly `split_reasoning` of the whole text."""
    text, chunks = case
    reasoning, content = _stream(chunks, start=start)
    assert (reasoning, content) == split_reasoning(text, start=start)


@given(text_and_cuts())
def test_no_text_is_lost(case: tuple[str, list[str]]) -> None:
    """Reasoning and content put back between their tags rebuild the input (bar leading space)."""
    text, chunks = case
    reasoning, content = _stream(chunks, start="outside")
    if text.lstrip().startswith(OPEN_TAG):
        closed = CLOSE_TAG in text.lstrip()[len(OPEN_TAG) :]
        rebuilt = OPEN_TAG + reasoning + (CLOSE_TAG if closed else "") + content
        assert rebuilt == text.lstrip()
    else:
        assert (reasoning, content) == ("", text)


@given(text_and_cuts())
def test_opened_block_loses_no_text(case: tuple[str, list[str]]) -> None:
    """With the block opened by the prompt, reasoning + `</think>` + content is the input."""
    text, chunks = case
    reasoning, content = _stream(chunks, start="inside")
    rebuilt = reasoning + (CLOSE_TAG if CLOSE_TAG in text else "") + content
    assert rebuilt == text


@given(text_and_cuts())
def test_assumed_block_loses_no_text(case: tuple[str, list[str]]) -> None:
    """The R1 rule (vLLM's): a leading `<think>` and the space before it dropped, nothing else."""
    text, chunks = case
    reasoning, content = _stream(chunks, start="assumed")
    body = text.lstrip()
    if body.startswith(OPEN_TAG):
        text = body[len(OPEN_TAG) :]
    rebuilt = reasoning + (CLOSE_TAG if CLOSE_TAG in text else "") + content
    assert rebuilt == text


@given(st.text(max_size=30), st.text(max_size=30), st.integers(0, len(OPEN_TAG)))
def test_opening_tag_cut_at_every_position(reasoning: str, content: str, cut: int) -> None:
    """`<think>` cut anywhere across two chunks is still recognised and dropped."""
    reasoning = reasoning.replace(CLOSE_TAG, "")
    text = f"\n{OPEN_TAG}{reasoning}{CLOSE_TAG}{content}"
    at = 1 + cut
    got = _stream([text[:at], text[at:]], start="outside")
    assert got == (reasoning, content)


@pytest.mark.parametrize("cut", range(len(CLOSE_TAG) + 1))
def test_closing_tag_cut_at_every_position(cut: int) -> None:
    """`</think>` cut anywhere across chunks ends the reasoning there, with nothing leaking."""
    head = f"{OPEN_TAG}plan"
    chunks = [head + CLOSE_TAG[:cut], CLOSE_TAG[cut:] + "answer"]
    assert _stream(chunks, start="outside") == ("plan", "answer")


@pytest.mark.parametrize(
    ("text", "start", "expected"),
    [
        ("Paris.", "outside", ("", "Paris.")),
        ("<think>plan</think>answer", "outside", ("plan", "answer")),
        ("\n\n<think>\nplan\n</think>\n\nanswer", "outside", ("\nplan\n", "\n\nanswer")),
        ("<think>unterminated", "outside", ("unterminated", "")),
        ("<think>", "outside", ("", "")),
        ("<think>a<think>b</think>c</think>d", "outside", ("a<think>b", "c</think>d")),
        ("Hi <think>x</think>", "outside", ("", "Hi <think>x</think>")),
        ("   ", "outside", ("", "   ")),
        ("  <thin", "outside", ("", "  <thin")),
        ("plan</think>answer", "inside", ("plan", "answer")),
        ("plan only", "inside", ("plan only", "")),
        ("</think>", "inside", ("", "")),
        ("plan</think>", "inside", ("plan", "")),
        ("<think>plan</think>answer", "inside", ("<think>plan", "answer")),
        ("plan</think>answer", "assumed", ("plan", "answer")),
        ("\n<think>plan</think>answer", "assumed", ("plan", "answer")),
        ("Paris.", "assumed", ("Paris.", "")),
        ("  <thin", "assumed", ("  <thin", "")),
        ("   ", "assumed", ("   ", "")),
        ("Hi <think>x</think>y", "assumed", ("Hi <think>x", "y")),
    ],
)
def test_edge_cases(text: str, start: Start, expected: tuple[str, str]) -> None:
    """Whole-text and one-character streaming agree with the documented rules."""
    assert split_reasoning(text, start=start) == expected
    assert _stream(list(text), start=start) == expected


def test_only_a_possible_tag_is_held_back() -> None:
    """Reasoning text streams at once; only a trailing `</thi` waits for the next piece."""
    splitter = ReasoningSplitter()
    assert splitter.feed("<think>step one ") == ("step one ", "")
    assert splitter.feed("then </thi") == ("then ", "")
    assert splitter.feed("s is not a tag") == ("</this is not a tag", "")
    assert splitter.feed("</think>done") == ("", "done")
    assert splitter.feed(" more") == ("", " more")
    assert splitter.flush() == ("", "")


def test_unterminated_block_flushes_held_text_as_reasoning() -> None:
    """A stream that ends inside the block gives its held tail to reasoning, not content."""
    splitter = ReasoningSplitter(start="inside")
    assert splitter.feed("thinking </thi") == ("thinking ", "")
    assert splitter.flush() == ("</thi", "")


def test_leading_whitespace_waits_for_a_decision() -> None:
    """Whitespace before a possible `<think>` is held, then dropped or released as content."""
    splitter = ReasoningSplitter()
    assert splitter.feed("\n ") == ("", "")
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("e") == ("", "\n <the")
    assert splitter.in_reasoning is False
    assumed = ReasoningSplitter(start="assumed")
    assert assumed.feed("\n <th") == ("", "")
    assert assumed.feed("e") == ("\n <the", "")
    assert assumed.in_reasoning is True
