"""The strict converter: what it refuses, the paths it names, and the messages it keeps."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from attrs import field, frozen

from adapters.echo import EchoParams
from registry.config import AdapterEntry
from schemas.control import LoadRequest
from schemas.converter import FieldError, StructureError, structure, unstructure
from schemas.openai import ChatCompletionRequest
from schemas.validators import in_range

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@frozen
class Sample:
    """A class with one field of each primitive kind, for the strictness tests."""

    count: int = 0
    ratio: float = 0.0
    name: str = ""
    flag: bool = False
    mode: Literal[1, "one"] = 1
    limit: int | None = field(default=None, validator=in_range(1, 10))
    anything: Any = None


def errors_of(data: Any, cls: type[Any], path: str = "$") -> list[FieldError]:
    """The field errors `structure` raises for `data`."""
    with pytest.raises(StructureError) as info:
        structure(data, cls, path=path)
    return info.value.errors


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("count", "5", "expected an integer, got a string"),
        ("count", True, "expected an integer, got a boolean"),
        ("count", 1.5, "expected an integer, got a number"),
        ("count", 2.0, "expected an integer, got a number"),
        ("count", None, "expected an integer, got null"),
        ("ratio", "1.0", "expected a number, got a string"),
        ("ratio", False, "expected a number, got a boolean"),
        ("name", 5, "expected a string, got an integer"),
        ("name", [], "expected a string, got an array"),
        ("flag", 1, "expected a boolean, got an integer"),
        ("flag", "true", "expected a boolean, got a string"),
        ("flag", {}, "expected a boolean, got an object"),
    ],
)
def test_primitives_are_not_coerced(name: str, value: Any, expected: str) -> None:
    """Strings, booleans and floats never pass for another JSON kind, and the kind is named."""
    assert errors_of({name: value}, Sample) == [FieldError(f"$.{name}", expected)]


def test_exact_kinds_pass_and_ints_widen_to_floats() -> None:
    """Each field takes its own JSON kind; a JSON integer is a valid number."""
    got = structure({"count": 3, "ratio": 2, "name": "x", "flag": True}, Sample)
    assert got == Sample(count=3, ratio=2.0, name="x", flag=True)
    assert isinstance(got.ratio, float)


def test_literal_compares_types_too() -> None:
    """`true` is not the literal 1 and `1.0` is not either; the allowed values are listed."""
    assert structure({"mode": "one"}, Sample).mode == "one"
    for bad in (True, 1.0, "1", 2):
        (err,) = errors_of({"mode": bad}, Sample)
        assert err.path == "$.mode"
        assert err.message == "must be one of 1, 'one'"


def test_optional_accepts_null_and_checks_the_inner_type() -> None:
    """`X | None` takes null, and otherwise refuses with the inner type's message."""
    assert structure({"limit": None}, Sample).limit is None
    assert errors_of({"limit": "3"}, Sample) == [
        FieldError("$.limit", "expected an integer, got a string")
    ]


def test_validator_message_survives_with_the_field_path() -> None:
    """A range validator's own message reaches the error, at the field's path."""
    assert errors_of({"limit": 11}, Sample) == [FieldError("$.limit", "must be between 1 and 10")]


def test_any_passes_through_untouched() -> None:
    """An `Any` field keeps whatever JSON it was given."""
    value = {"a": [1, "x", None, {"b": 2.5}]}
    assert structure({"anything": value}, Sample).anything == value


def test_unknown_keys_are_refused_and_named() -> None:
    """Each extra key is an error at its own path, sorted, with the closest or known fields."""
    known = "known: anything, count, flag, limit, mode, name, ratio"
    assert errors_of({"zeta": 1, "alpha": 2, "limt": 3}, Sample) == [
        FieldError("$.alpha", f"unknown field; {known}"),
        FieldError("$.limt", "unknown field; did you mean 'limit'?"),
        FieldError("$.zeta", f"unknown field; {known}"),
    ]


def test_required_field_missing() -> None:
    """A missing required field is named at its own path."""
    assert errors_of({}, AdapterEntry) == [FieldError("$.module", "required field missing")]
    assert errors_of({"messages": CHAT["messages"]}, ChatCompletionRequest, path="") == [
        FieldError("model", "required field missing")
    ]


@pytest.mark.parametrize("payload", [[], "x", 3, None, True])
def test_root_must_be_an_object(payload: Any) -> None:
    """A payload that is not a JSON object is refused at the root with its kind named."""
    (err,) = errors_of(payload, Sample)
    assert err.path == "$"
    assert err.message.startswith("expected an object, got ")


def test_root_path_is_configurable() -> None:
    """The root the paths hang from is the caller's: `$.engine_params` or bare field names."""
    assert errors_of({"max_n": 0}, EchoParams, path="$.engine_params")[0].path == (
        "$.engine_params.max_n"
    )
    assert errors_of({"max_n": 0}, EchoParams, path="")[0].path == "max_n"
    assert errors_of({"bogus": 0}, EchoParams, path="")[0].path == "bogus"


def test_nested_paths_name_list_indexes_and_dict_keys() -> None:
    """Errors inside lists and dicts carry the index or key in the path."""
    bad_role = {**CHAT, "messages": [CHAT["messages"][0], {"role": "bot"}]}
    (err,) = errors_of(bad_role, ChatCompletionRequest, path="")
    assert err.path == "messages[1].role"
    assert "'user'" in err.message
    (err,) = errors_of({"env": {"HF_TOKEN": 5}}, LoadRequest)
    assert err.path == "$.env.HF_TOKEN"
    assert err.message == "expected a string, got an integer"


def test_every_failing_field_is_reported_in_order() -> None:
    """All errors are collected, and the exception text renders each, its field named once."""
    with pytest.raises(StructureError) as info:
        structure({"count": "x", "flag": 0}, Sample)
    assert [e.path for e in info.value.errors] == ["$.count", "$.flag"]
    assert str(info.value) == (
        "count: expected an integer, got a string; flag: expected a boolean, got an integer"
    )


def test_content_parts_and_stop_hooks() -> None:
    """Chat content takes text and well-formed image parts; stop takes a string or up to 16."""
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert structure(parts, ChatCompletionRequest).messages[0].text() == "a"
    image = {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    (err,) = errors_of(image, ChatCompletionRequest)
    assert err.path == "$.messages[0].content"
    # an image part without its url is malformed (whether images are served is the backend's)
    assert "an image part is {'type': 'image_url'" in err.message
    audio = {**CHAT, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}
    (err,) = errors_of(audio, ChatCompletionRequest)
    assert err.path == "$.messages[0].content"
    assert structure({**CHAT, "stop": "x"}, ChatCompletionRequest).stop == "x"
    (err,) = errors_of({**CHAT, "stop": ["s"] * 17}, ChatCompletionRequest)
    assert (err.path, err.message) == ("$.stop", "accepts at most 16 strings")
    (err,) = errors_of({**CHAT, "stop": [1]}, ChatCompletionRequest)
    assert (err.path, err.message) == ("$.stop", "must be a string or an array of strings")


def test_unstructure_gives_json_builtins() -> None:
    """Tuples become lists and nested attrs instances become dicts."""
    entry = AdapterEntry(module="a.b:C", env_allow=("HF_TOKEN",))
    data = unstructure(entry)
    assert data["env_allow"] == ["HF_TOKEN"]
    assert data["defaults"] == {}
    assert structure(data, AdapterEntry) == entry
    request = structure({**CHAT, "stream_options": {"include_usage": True}}, ChatCompletionRequest)
    assert unstructure(request)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
        "include_obfuscation": False,
    }


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        (AdapterEntry, "env_allow", "HF_TOKEN"),
        (AdapterEntry, "allowed_hosts", "example.com"),
        (AdapterEntry, "env_allow", {"HF_TOKEN": True}),
        (ChatCompletionRequest, "modalities", "text"),
        (ChatCompletionRequest, "tools", {"type": "function"}),
    ],
)
def test_a_string_or_object_is_not_an_array(cls: type[Any], name: str, value: Any) -> None:
    """A JSON string or object where an array is expected is refused, not split into items."""
    base: dict[str, Any] = {"module": "a.b:C"} if cls is AdapterEntry else dict(CHAT)
    (err,) = errors_of({**base, name: value}, cls)
    assert err.path == f"$.{name}"
    assert err.message.startswith("expected an array")


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({**CHAT, "messages": [1]}, "$.messages[0]"),
        ({**CHAT, "messages": [[{"role": "user"}]]}, "$.messages[0]"),
        ({**CHAT, "messages": ["hi"]}, "$.messages[0]"),
        ({**CHAT, "stream_options": 3}, "$.stream_options"),
        ({**CHAT, "stream_options": [True]}, "$.stream_options"),
    ],
)
def test_nested_object_of_the_wrong_kind_says_so(payload: dict[str, Any], path: str) -> None:
    """A non-object where a nested object belongs gets a user message, not Python's text."""
    (err,) = errors_of(payload, ChatCompletionRequest)
    assert err.path == path
    assert err.message.startswith("expected an object")
