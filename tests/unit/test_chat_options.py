"""vLLM's chat-template extensions: kwargs bounded to plain JSON, reserved names refused."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.chat_options import MAX_TEMPLATE_KWARGS, check_template_kwargs
from schemas.converter import structure
from schemas.errors import InvalidRequestError
from schemas.generation import ChatOptions
from schemas.openai import ChatCompletionRequest
from service.serving import chat_options


def request(**extra: Any) -> ChatCompletionRequest:
    """A chat request with `extra` fields."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    return structure(body, ChatCompletionRequest, path="")


def test_plain_request_changes_nothing() -> None:
    """A request without extensions gives the default options (adapters' fast path)."""
    assert chat_options(request()) == ChatOptions()


def test_values_pass_through_in_order() -> None:
    """Template variables keep their JSON values; the switches are copied."""
    options = chat_options(
        request(
            add_generation_prompt=False,
            continue_final_message=True,
            chat_template_kwargs={"enable_thinking": False, "names": ["a", {"b": 1}]},
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
        )
    )
    assert options == ChatOptions(
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs=(("enable_thinking", False), ("names", ["a", {"b": 1}])),
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    )


def test_continue_and_generation_prompt_together_is_vllms_400() -> None:
    """Both at once is refused, as vLLM refuses it, naming continue_final_message."""
    with pytest.raises(InvalidRequestError) as refused:
        chat_options(request(continue_final_message=True))
    assert refused.value.param == "continue_final_message"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages": []},
        {"tools": [{"type": "function"}]},
        {"tokenize": True},
        {"add_generation_prompt": False},
        {"chat_template": "{{ 1 }}"},
        {"bad key": 1},
        {"x": [[[[["too deep"]]]]]},
        {"x": "y" * 20_000},
        {f"k{i}": i for i in range(MAX_TEMPLATE_KWARGS + 1)},
    ],
)
def test_refused_kwargs_name_the_field(kwargs: dict[str, Any]) -> None:
    """Reserved names, non-identifiers, deep or large values: 400 on chat_template_kwargs."""
    with pytest.raises(InvalidRequestError) as refused:
        check_template_kwargs(kwargs)
    assert refused.value.param == "chat_template_kwargs"


def test_prompt_logprobs_with_stream_is_vllms_400() -> None:
    """Prompt logprobs come with whole responses only (as on vLLM); the refusal names them."""
    with pytest.raises(InvalidRequestError) as refused:
        chat_options(request(prompt_logprobs=1, stream=True))
    assert refused.value.param == "prompt_logprobs"
    assert chat_options(request(prompt_logprobs=1)).prompt_logprobs == 1


def test_a_whole_echo_asks_the_prompts_logprobs_where_the_backend_has_them() -> None:
    """The chat rule of vLLM: echo without prompt_logprobs takes top_logprobs (default 0)."""
    assert chat_options(request(echo=True), prompt_logprobs=True).prompt_logprobs == 0
    both = request(echo=True, logprobs=True, top_logprobs=3)
    assert chat_options(both, prompt_logprobs=True).prompt_logprobs == 3
    assert (
        chat_options(request(echo=True, prompt_logprobs=1), prompt_logprobs=True).prompt_logprobs
        == 1
    )
    # not asked where the backend has none, nor on a stream (vLLM sends none in chunks)
    assert chat_options(request(echo=True)).prompt_logprobs is None
    assert (
        chat_options(request(echo=True, stream=True), prompt_logprobs=True).prompt_logprobs is None
    )


def test_only_the_templates_own_variables_are_passed_on() -> None:
    """The allowlist is the model's template: what it reads, nothing the tokenizer call takes."""
    from adapters.kit.tokens import template_variables  # noqa: PLC0415

    template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking %}<think>{% endif %}{% set local = 1 %}{{ local }}"
    )
    assert template_variables(template) == {"messages", "enable_thinking"}
    assert template_variables({"default": template, "tool_use": "{{ tools }}"}) == {
        "messages", "enable_thinking", "tools",
    }  # fmt: skip
    assert template_variables("{% if %}") == frozenset()  # broken: it fails when applied
