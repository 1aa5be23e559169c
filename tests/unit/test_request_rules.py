"""The request-only rules of chat and completions, checked at the schema with no server or model.

Each table row is a body fragment that breaks one rule, with the exact refusal it must give
(class, param, message); the order of a table is the order of precedence. Hypothesis adds an
arbitrary accepted request around each fragment: a rule's verdict never depends on the rest.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.completions import CompletionRequest, check_completion_request
from schemas.converter import structure
from schemas.errors import InvalidRequestError, UnsupportedParameterError
from schemas.openai import REFUSED_FIELDS, ChatCompletionRequest, check_chat_request

EXAMPLES = settings(max_examples=60, deadline=None)
Row = tuple[dict[str, Any], type[InvalidRequestError], str, str]

# --- chat ----------------------------------------------------------------------------------------

#: one row per rule, in the order the rules are checked
CHAT_RULES: list[Row] = [
    *(
        ({name: value}, UnsupportedParameterError, name, f"{name} is not supported")
        for name, value in zip(
            REFUSED_FIELDS,
            ([{"name": "f"}], "auto", {"voice": "alloy"}, {"type": "content"}, {"x": 1}, "low"),
            strict=True,
        )
    ),
    ({"response_format": {"type": "xml"}}, InvalidRequestError, "response_format",
     "response_format.type must be 'text', 'json_object' or 'json_schema'"),
    ({"modalities": ["text", "audio"]}, UnsupportedParameterError, "modalities",
     "only the text modality is supported"),
    ({"store": True}, UnsupportedParameterError, "store", "stored completions are not supported"),
    ({"service_tier": "flex"}, UnsupportedParameterError, "service_tier",
     "service_tier is not supported"),
    ({"stream": False, "stream_options": {"include_usage": True}}, InvalidRequestError,
     "stream_options", "stream_options is only allowed when stream is true"),
    ({"logprobs": False, "top_logprobs": 3}, InvalidRequestError, "top_logprobs",
     "top_logprobs requires logprobs: true"),
    ({"min_tokens": 10, "max_tokens": 5}, InvalidRequestError, "min_tokens",
     "min_tokens must be less than or equal to max_tokens=5, got 10."),
]  # fmt: skip

#: more ways to break the same rules (edge values the rules must catch)
CHAT_MORE: list[Row] = [
    ({"reasoning_effort": ""}, UnsupportedParameterError, "reasoning_effort",
     "reasoning_effort is not supported"),
    ({"function_call": False}, UnsupportedParameterError, "function_call",
     "function_call is not supported"),
    ({"response_format": {}}, InvalidRequestError, "response_format",
     "response_format.type must be 'text', 'json_object' or 'json_schema'"),
    ({"response_format": {"type": "JSON_OBJECT"}}, InvalidRequestError, "response_format",
     "response_format.type must be 'text', 'json_object' or 'json_schema'"),
    ({"modalities": []}, UnsupportedParameterError, "modalities",
     "only the text modality is supported"),
    ({"modalities": ["audio"]}, UnsupportedParameterError, "modalities",
     "only the text modality is supported"),
    ({"service_tier": "priority"}, UnsupportedParameterError, "service_tier",
     "service_tier is not supported"),
    ({"stream": False, "stream_options": {}}, InvalidRequestError, "stream_options",
     "stream_options is only allowed when stream is true"),
    ({"logprobs": False, "top_logprobs": 20}, InvalidRequestError, "top_logprobs",
     "top_logprobs requires logprobs: true"),
    # max_completion_tokens wins over max_tokens, as for the budget
    ({"min_tokens": 3, "max_tokens": 50, "max_completion_tokens": 2}, InvalidRequestError,
     "min_tokens", "min_tokens must be less than or equal to max_tokens=2, got 3."),
]  # fmt: skip

#: values every rule accepts (unset, empty, or what the rule allows)
CHAT_ACCEPTED: list[dict[str, Any]] = [
    {},
    {"functions": [], "function_call": None, "audio": {}, "prediction": None},
    {"web_search_options": {}, "reasoning_effort": None},
    {"response_format": {"type": "text"}},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
    {"modalities": ["text"]},
    {"store": False},
    {"service_tier": "auto"},
    {"service_tier": "default"},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream": True, "stream_options": {"continuous_usage_stats": True}},
    {"logprobs": True, "top_logprobs": 5},
    {"top_logprobs": 0},  # zero alternatives asks for nothing
]


def chat(**fields: Any) -> ChatCompletionRequest:
    """A parsed chat request with `fields`."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return structure(body, ChatCompletionRequest, path="")


@st.composite
def chat_base(draw: st.DrawFn) -> dict[str, Any]:
    """An arbitrary request body that keeps every request-only rule."""
    stream = draw(st.booleans())
    logprobs = draw(st.booleans())
    body: dict[str, Any] = {
        "stream": stream,
        "logprobs": logprobs,
        "n": draw(st.integers(1, 4)),
        "temperature": draw(st.none() | st.floats(0, 2)),
        "top_logprobs": draw(st.integers(0, 20) if logprobs else st.none() | st.just(0)),
    }
    for extra in draw(st.lists(st.sampled_from(CHAT_ACCEPTED[:-2]), max_size=4)):
        if "stream_options" not in extra or stream:
            body.update(extra)
    return body


def refusal(check: Any, req: Any) -> InvalidRequestError:
    """The error `check(req)` raises (the test fails if it raises none)."""
    with pytest.raises(InvalidRequestError) as info:
        check(req)
    return info.value


def assert_refused(error: InvalidRequestError, cls: type[Any], param: str, message: str) -> None:
    """`error` is exactly this refusal: class, 400, param, code and message."""
    assert type(error) is cls
    assert error.status_code == 400
    assert error.param == param
    assert error.message == message
    expected_code = "unsupported_parameter" if cls is UnsupportedParameterError else None
    assert error.code == expected_code


@pytest.mark.parametrize(("fields", "cls", "param", "message"), CHAT_RULES + CHAT_MORE)
def test_chat_rule_refuses_by_name(
    fields: dict[str, Any], cls: type[Any], param: str, message: str
) -> None:
    """Each broken chat rule is its own 400: class, param, code and message as the API sends."""
    assert_refused(refusal(check_chat_request, chat(**fields)), cls, param, message)


@pytest.mark.parametrize("fields", CHAT_ACCEPTED)
def test_chat_accepted_values_pass(fields: dict[str, Any]) -> None:
    """What each rule allows passes (unset and empty values ask for nothing)."""
    check_chat_request(chat(**fields))


@EXAMPLES
@given(base=chat_base())
def test_chat_requests_keeping_the_rules_pass(base: dict[str, Any]) -> None:
    """Any combination of allowed values passes: the rules refuse nothing else."""
    check_chat_request(chat(**base))


@EXAMPLES
@given(base=chat_base(), row=st.sampled_from(CHAT_RULES + CHAT_MORE))
def test_chat_rule_holds_whatever_else_is_set(base: dict[str, Any], row: Row) -> None:
    """A broken rule gives the same refusal whatever allowed values surround it."""
    fields, cls, param, message = row
    assert_refused(refusal(check_chat_request, chat(**{**base, **fields})), cls, param, message)


@pytest.mark.parametrize(
    ("first", "second"), list(itertools.combinations(range(len(CHAT_RULES)), 2))
)
def test_chat_rules_keep_their_order(first: int, second: int) -> None:
    """With two rules broken the earlier one is named (the order they were always checked in)."""
    request = chat(**{**CHAT_RULES[second][0], **CHAT_RULES[first][0]})
    assert refusal(check_chat_request, request).param == CHAT_RULES[first][2]


# --- completions ---------------------------------------------------------------------------------

COMPLETION_RULES: list[Row] = [
    ({"best_of": 3, "n": 2}, UnsupportedParameterError, "best_of",
     "best_of is not supported (only best_of equal to n)"),
    ({"stream": False, "stream_options": {"include_usage": True}}, InvalidRequestError,
     "stream_options", "stream_options is only allowed when stream is true"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
     UnsupportedParameterError, "stream_options.continuous_usage_stats",
     "stream_options.continuous_usage_stats is not supported"),
    ({"min_tokens": 17}, InvalidRequestError, "min_tokens",
     "min_tokens must be less than or equal to max_tokens=16, got 17."),
]  # fmt: skip

COMPLETION_MORE: list[Row] = [
    ({"best_of": 2, "n": 1}, UnsupportedParameterError, "best_of",
     "best_of is not supported (only best_of equal to n)"),
    # without stream the first rule broken is stream_options itself
    ({"stream": False, "stream_options": {"continuous_usage_stats": True}}, InvalidRequestError,
     "stream_options",
     "stream_options is only allowed when stream is true"),
]  # fmt: skip

COMPLETION_ACCEPTED: list[dict[str, Any]] = [
    {},
    {"best_of": 1},
    {"best_of": 4, "n": 4},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream": True, "stream_options": {}},
]


def completion(**fields: Any) -> CompletionRequest:
    """A parsed completions request with `fields`."""
    return structure({"model": "m", "prompt": "hi", **fields}, CompletionRequest, path="")


@st.composite
def completion_base(draw: st.DrawFn) -> dict[str, Any]:
    """An arbitrary completions body that keeps every request-only rule."""
    n = draw(st.integers(1, 4))
    stream = draw(st.booleans())
    body: dict[str, Any] = {
        "n": n,
        "best_of": draw(st.sampled_from([None, n])),
        "stream": stream,
        "echo": draw(st.booleans()),
        "logprobs": draw(st.none() | st.integers(0, 5)),
        "suffix": draw(st.none() | st.text(max_size=3)),  # a capability, not checked here
    }
    if stream:
        body["stream_options"] = draw(st.none() | st.just({"include_usage": True}))
    return body


@pytest.mark.parametrize(("fields", "cls", "param", "message"), COMPLETION_RULES + COMPLETION_MORE)
def test_completion_rule_refuses_by_name(
    fields: dict[str, Any], cls: type[Any], param: str, message: str
) -> None:
    """Each broken completions rule is its own 400 with the API's class, param and message."""
    assert_refused(refusal(check_completion_request, completion(**fields)), cls, param, message)


@pytest.mark.parametrize("fields", COMPLETION_ACCEPTED)
def test_completion_accepted_values_pass(fields: dict[str, Any]) -> None:
    """`best_of` equal to n, and stream options with a stream, pass."""
    check_completion_request(completion(**fields))


@EXAMPLES
@given(base=completion_base(), row=st.sampled_from(COMPLETION_RULES + COMPLETION_MORE))
def test_completion_rule_holds_whatever_else_is_set(base: dict[str, Any], row: Row) -> None:
    """A broken completions rule gives the same refusal whatever allowed values surround it."""
    fields, cls, param, message = row
    request = completion(**{**base, **fields})
    assert_refused(refusal(check_completion_request, request), cls, param, message)


@EXAMPLES
@given(base=completion_base())
def test_completion_requests_keeping_the_rules_pass(base: dict[str, Any]) -> None:
    """Allowed values in any combination pass (capabilities are the service's to check)."""
    check_completion_request(completion(**base))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (a, b)
        for a, b in itertools.combinations(range(len(COMPLETION_RULES)), 2)
        if not COMPLETION_RULES[a][0].keys() & COMPLETION_RULES[b][0].keys()
    ],
)
def test_completion_rules_keep_their_order(first: int, second: int) -> None:
    """With two rules broken the earlier one is named (best_of before the stream options)."""
    request = completion(**{**COMPLETION_RULES[second][0], **COMPLETION_RULES[first][0]})
    assert refusal(check_completion_request, request).param == COMPLETION_RULES[first][2]
