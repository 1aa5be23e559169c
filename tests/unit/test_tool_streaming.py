"""`CallStream`: tool calls read while the text grows, arguments handed out in pieces.

The pieces of a call must join to exactly what the whole answer sends as its arguments
(`json.dumps(value, ensure_ascii=False)`, vLLM's parsers' rendering), however the model spaced,
escaped or split its JSON, for the Hermes format (auto) and the JSON array of `required`.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.tool_parsing import MAX_ARGUMENTS_CHARS, CallStream

TAG = "<tool_call>"

#: JSON values as a model may write them in arguments: nested, any unicode, floats and ints
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
#: how the model spaces and escapes its JSON (the canonical form must not depend on it)
layouts = st.sampled_from(
    [
        {"ensure_ascii": False},
        {"ensure_ascii": True},
        {"ensure_ascii": True, "indent": 2},
        {"ensure_ascii": False, "separators": (",", ":")},
        {"ensure_ascii": False, "indent": "\t", "separators": (" ,", " : ")},
    ]
)


def read(reader: CallStream, text: str, cuts: list[int]) -> tuple[dict[int, str], dict[int, str]]:
    """Feed `text` split at `cuts`; the names and the joined arguments of each call."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    for a, b in itertools.pairwise(bounds):
        for k, name, piece in reader.feed(text[a:b]):
            if name is not None:
                assert k not in names, "a call is named once"
                names[k], arguments[k] = name, piece
            else:
                assert k in names, "pieces come after the call's name"
                arguments[k] += piece
    return names, arguments


@settings(max_examples=150, deadline=None)
@given(
    args=st.lists(st.dictionaries(st.text(max_size=6), values, max_size=4), min_size=1, max_size=3),
    layout=layouts,
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
    args_first=st.booleans(),
)
def test_hermes_pieces_join_to_the_canonical_arguments(
    args: list[dict[str, Any]], layout: dict[str, Any], cuts: list[int], args_first: bool
) -> None:
    """Each Hermes call: its name, then pieces that join to json.dumps(arguments)."""
    calls = []
    for k, value in enumerate(args):
        call = (
            {"arguments": value, "name": f"f{k}"}
            if args_first
            else {"name": f"f{k}", "arguments": value}
        )
        calls.append(f"{TAG}\n{json.dumps(call, **layout)}\n</tool_call>\n")
    text = "".join(calls)
    reader = CallStream(args_key="arguments", start_tag=TAG)
    names, arguments = read(reader, text, cuts)
    assert not reader.broken
    assert names == {k: f"f{k}" for k in range(len(args))}
    expected = {k: json.dumps(v, ensure_ascii=False) for k, v in enumerate(args)}
    assert arguments == expected


@settings(max_examples=100, deadline=None)
@given(
    args=st.lists(st.dictionaries(st.text(max_size=6), values, max_size=4), min_size=1, max_size=3),
    layout=layouts,
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_required_array_pieces_join_to_the_canonical_parameters(
    args: list[dict[str, Any]], layout: dict[str, Any], cuts: list[int]
) -> None:
    """The `required` answer (a JSON array of {name, parameters}) streams the same way."""
    text = json.dumps([{"name": f"g{k}", "parameters": v} for k, v in enumerate(args)], **layout)
    reader = CallStream(args_key="parameters", start_tag=None)
    names, arguments = read(reader, text, cuts)
    assert not reader.broken
    assert names == {k: f"g{k}" for k in range(len(args))}
    assert arguments == {k: json.dumps(v, ensure_ascii=False) for k, v in enumerate(args)}


def test_arguments_come_in_pieces_as_they_grow() -> None:
    """Token by token: the name once complete, then the arguments grow with the text."""
    reader = CallStream(args_key="arguments", start_tag=TAG)
    tokens = ["Sure. <tool", "_call>\n{", '"name', '": "get_', 'weather", "', 'arguments": {"ci',
              'ty": "Par', 'is", "n": 1', "2", "}}\n</tool_call>"]  # fmt: skip
    events = [reader.feed(t) for t in tokens]
    assert events[:3] == [[], [], []]
    assert events[3] == []  # the name is not complete yet
    assert events[4] == [(0, "get_weather", "")]
    assert events[5] == [(0, None, '{"ci')]
    assert events[6] == [(0, None, 'ty": "Par')]
    assert events[7] == [(0, None, 'is", "n": ')]  # the number waits for what follows it
    assert events[8] == []
    assert events[9] == [(0, None, "12}")]
    assert reader.calls[0].complete


def test_escapes_and_surrogates_are_rendered_as_json_dumps() -> None:
    """An escaped surrogate pair split between feeds joins to one character; quotes stay escaped."""
    reader = CallStream(args_key="arguments", start_tag=TAG)
    text = TAG + '{"name": "f", "arguments": {"s": "a\\"b\\u00e9\\ud83d\\ude00\\/\\n"}}'
    names, arguments = read(reader, text, list(range(len(text))))
    assert names == {0: "f"}
    assert arguments[0] == json.dumps({"s": 'a"bé\U0001f600/\n'}, ensure_ascii=False)


def test_malformed_text_stops_reading_and_never_raises() -> None:
    """Bad JSON breaks the reader for good: what went out stays, nothing more comes."""
    for text in (
        TAG + '{"name": "f", "arguments": {"a": tru}}',
        TAG + '{"name": "f", "arguments": {"a": 1,}}',
        TAG + '["f"]',
        TAG + '{"name": "f", "arguments": {"a": "x\ny"}}',  # a raw newline inside a string
        TAG + '{"name": "f", "arguments": {"a": "\\q"}}',
        TAG + '{"name": "f", "arguments": {"a": 01}}',
        TAG + '{"name": "f", "arguments": {"a": 1]}',
    ):
        reader = CallStream(args_key="arguments", start_tag=TAG)
        reader.feed(text)
        assert reader.broken, text
        assert reader.feed('{"more": 1}') == []
    reader = CallStream(args_key="parameters", start_tag=None)
    reader.feed('[{"name": "f", "parameters": {}}, "x"]')
    assert reader.broken


def test_text_between_calls_is_skipped_and_a_split_tag_found() -> None:
    """Hermes: whatever lies between calls is skipped, a tag split over feeds still opens one."""
    reader = CallStream(args_key="arguments", start_tag=TAG)
    first = reader.feed(TAG + '{"name": "a", "arguments": {}}</tool_call> and then <tool_')
    second = reader.feed('call>{"name": "b", "arguments": []}')
    assert first == [(0, "a", "{}")]
    assert second == [(1, "b", "[]")]


def test_oversized_arguments_stop_the_reading() -> None:
    """A call whose arguments outgrow the bound stops being read (the whole parse decides)."""
    reader = CallStream(args_key="arguments", start_tag=TAG)
    reader.feed(TAG + '{"name": "f", "arguments": {"a": "')
    reader.feed("x" * (MAX_ARGUMENTS_CHARS + 10))
    assert reader.broken
