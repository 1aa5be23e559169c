"""Streaming redaction equals whole-text redaction for every split, and holds back little."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hooks.base import HookCall, HookSetup
from hooks.builtin.redaction import RegexRedactHook, RegexRedactParams
from hooks.redact import MAX_PATTERN_WIDTH, PatternError, Redactor, pattern_width

# pattern sets that overlap, nest, share prefixes, and use word boundaries
PATTERN_SETS = [
    (r"[a-z0-9.]{1,20}@[a-z]{1,10}\.(?:com|org)",),
    (r"\d{3}-\d{4}", r"\d{3} \d{4}"),
    (r"\bsecret\b",),
    (r"ab|abc", r"b{2,4}"),
    (r"a.{0,3}b",),
    (r"sk-[A-Za-z0-9]{8}",),
    (r"\Bcd", r"x{1,2}y?"),
]
_PIECES = st.sampled_from(
    ["a", "b", "c", "d", "x", "y", "ab", "abc", "bbb", "secret", " ", "-", ".", "@", "com", "org",
     "jo", "hn", "@ex", "ample.com", "555", "1234", "555-1234", "sk-", "AbC12345", "é", "\n"]
)  # fmt: skip
_TEXTS = st.one_of(st.lists(_PIECES, max_size=24).map("".join), st.text(max_size=60))


def _stream(redactor: Redactor, text: str, cuts: list[int]) -> str:
    stream = redactor.stream()
    out, prev = [], 0
    for cut in [*sorted(set(cuts)), len(text)]:
        out.append(stream.feed(text[prev:cut]))
        prev = cut
    out.append(stream.end())
    return "".join(out)


@example(patterns=(r"\bsecret\b",), text="secrets", cuts=[6], ignore_case=False)
@example(patterns=(r"ab|abc",), text="xabc", cuts=[3], ignore_case=False)
@given(
    patterns=st.sampled_from(PATTERN_SETS),
    text=_TEXTS,
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
    ignore_case=st.booleans(),
)
def test_any_split_redacts_like_the_whole_text(
    patterns: tuple[str, ...], text: str, cuts: list[int], ignore_case: bool
) -> None:
    """Feeding any split of a text, then ending, gives exactly the whole-text redaction."""
    redactor = Redactor(patterns, "[R]", ignore_case=ignore_case)
    cuts = [c for c in cuts if c <= len(text)]
    assert _stream(redactor, text, cuts) == redactor.redact(text)


@given(patterns=st.sampled_from(PATTERN_SETS), text=_TEXTS)
def test_every_character_split_and_bounded_holdback(patterns: tuple[str, ...], text: str) -> None:
    """One character at a time also agrees, and never more than `width` characters are held."""
    redactor = Redactor(patterns, "#")
    stream = redactor.stream()
    for ch in text:
        stream.feed(ch)
        assert len(stream._pending) <= redactor.width
    assert _stream(redactor, text, list(range(len(text)))) == redactor.redact(text)


def test_a_secret_split_across_chunks_never_leaks_in_any_prefix() -> None:
    """Every split of an e-mail address: no emitted prefix shows a part of the address."""
    redactor = Redactor([r"[a-z]{1,10}@[a-z]{1,10}\.com"], "[EMAIL]")
    text = "mail john@example.com now"
    for cut in range(len(text) + 1):
        stream = redactor.stream()
        first = stream.feed(text[:cut])
        assert "john" not in first
        assert "@" not in first
        assert first + stream.feed(text[cut:]) + stream.end() == "mail [EMAIL] now"


def test_the_hook_filters_each_choice_and_kind_apart() -> None:
    """The hook keeps one stream per (choice, content/reasoning) and flushes each at its end."""
    params = RegexRedactParams(patterns=(r"\d{3}-\d{4}",), replacement="#")
    hook = RegexRedactHook(params, HookSetup("redact"))
    call = HookCall(request_id="r", backend="echo", model="m", preset=None, stream=True, headers={})
    pieces = [
        (0, "content", "call 555-"),
        (1, "content", "555"),
        (0, "reasoning", "555-12"),
        (0, "content", "1234 ok"),
        (1, "content", "-9999"),
        (0, "reasoning", "34"),
    ]
    out: dict[tuple[int, str], str] = {}
    for index, kind, text in pieces:
        out[index, kind] = out.get((index, kind), "") + hook.on_chunk(call, index, kind, text)  # type: ignore[arg-type]
    for key in list(out):
        out[key] += hook.on_chunk_end(call, *key)  # type: ignore[arg-type]
    assert out == {(0, "content"): "call # ok", (1, "content"): "#", (0, "reasoning"): "#"}


@pytest.mark.parametrize(
    "pattern",
    ["a+", "a*b", ".*", "x?", "^a", "a$", r"\Aa", "(?=a)a", "(?!a)b", r"(a)\1", "(?<=a)b"],
)
def test_unbounded_or_context_dependent_patterns_are_refused(pattern: str) -> None:
    """Unbounded, empty-matching, anchored, lookaround and back-reference patterns are refused."""
    with pytest.raises(PatternError):
        pattern_width(pattern)


def test_width_limit() -> None:
    """A bounded pattern longer than MAX_PATTERN_WIDTH is refused; one at the limit is not."""
    assert pattern_width(f"a{{1,{MAX_PATTERN_WIDTH}}}") == MAX_PATTERN_WIDTH
    with pytest.raises(PatternError):
        pattern_width(f"a{{1,{MAX_PATTERN_WIDTH + 1}}}")
