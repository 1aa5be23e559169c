"""Sampling checks both real engines must pass, through the service and the official client.

tests/engines/test_transformers.py and test_vllm.py call the same functions on their own loaded
servers, so the two backends are held to the same assertions where both honour a field.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
import transformers

from adapters.base import AdapterContext
from adapters.bundled import default_cache_dir, resolve_model_source
from helpers import ADMIN, LiveServer

#: README's first request
README_MSGS: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def bundled_tokenizer() -> Any:
    """The bundled SmolLM2's tokenizer (token ids for logit_bias)."""
    context = AdapterContext("transformers", cache_dir=default_cache_dir())
    return transformers.AutoTokenizer.from_pretrained(
        resolve_model_source("bundled:smollm2-135m", context)
    )


def preset_defaults_answer_paris(oai: openai.OpenAI, server: LiveServer, model: str) -> None:
    """README's first request sets no sampling: the preset's temperature 0 / top_p 0.9 apply.

    At the engine's temperature 1.0 this model rambles (and at its card's 0.2 in 2 of 3 draws
    through `make serve`); the preset is greedy, so every seed must name Paris.
    """
    status = httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json()
    effective = status["capabilities"]["sampling_defaults"]["effective"]
    assert effective == {"temperature": 0.0, "top_p": 0.9}
    answers = [
        oai.chat.completions.create(model=model, messages=README_MSGS, max_tokens=32, seed=seed)
        .choices[0]
        .message.content
        or ""
        for seed in range(5)
    ]
    assert all("Paris" in a for a in answers), answers


def n_logprobs_streamed_equal_whole(oai: openai.OpenAI, model: str) -> None:
    """n=2 with top_logprobs, seeded: OpenAI's logprobs shape, usage summed, stream == whole."""
    ask: dict[str, Any] = {
        "model": model, "messages": README_MSGS, "max_tokens": 6, "seed": 11,
        "temperature": 1.0, "n": 2, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip
    whole = oai.chat.completions.create(**ask)
    assert [c.index for c in whole.choices] == [0, 1]
    count = 0
    for choice in whole.choices:
        assert choice.logprobs is not None
        assert choice.logprobs.content
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0
            assert entry.bytes == list(entry.token.encode())
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-4
        count += len(choice.logprobs.content)
    assert whole.usage is not None
    assert whole.usage.completion_tokens == count
    texts: list[str] = ["", ""]
    tokens: list[list[str]] = [[], []]
    for chunk in oai.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                tokens[c.index] += [e.token for e in c.logprobs.content]
    for i, choice in enumerate(whole.choices):
        assert texts[i] == choice.message.content
        assert choice.logprobs is not None
        assert choice.logprobs.content
        assert tokens[i] == [e.token for e in choice.logprobs.content]


def logit_bias_bans_and_is_checked(oai: openai.OpenAI, model: str) -> None:
    """A token id past the vocabulary is a 400 naming logit_bias; a -100 bias bans a token."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=model, messages=README_MSGS, max_tokens=2, logit_bias={"10000000": 5}
        )
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]
    greedy = oai.chat.completions.create(
        model=model, messages=README_MSGS, max_tokens=1, temperature=0, logprobs=True
    )
    assert greedy.choices[0].logprobs is not None
    assert greedy.choices[0].logprobs.content
    first = greedy.choices[0].logprobs.content[0].token
    (banned,) = bundled_tokenizer()(first, add_special_tokens=False)["input_ids"]
    biased = oai.chat.completions.create(
        model=model, messages=README_MSGS, max_tokens=1, temperature=0, logprobs=True,
        logit_bias={str(banned): -100},
    )  # fmt: skip
    assert biased.choices[0].logprobs is not None
    assert biased.choices[0].logprobs.content
    assert biased.choices[0].logprobs.content[0].token != first


def template_switches(oai: openai.OpenAI, model: str) -> None:
    """add_generation_prompt, continue_final_message, skip_special_tokens, template kwargs.

    Passed as the official client passes vLLM's extensions: in `extra_body`.
    """
    plain = oai.chat.completions.create(model=model, messages=README_MSGS, max_tokens=1)
    bare = oai.chat.completions.create(
        model=model,
        messages=README_MSGS,
        max_tokens=1,
        extra_body={"add_generation_prompt": False, "chat_template_kwargs": {"note": "x"}},
    )
    assert plain.usage is not None
    assert bare.usage is not None
    # vLLM's role rule: with no generation prompt the answer continues the last turn, in its role
    assert plain.choices[0].message.role == "assistant"
    # the typed client says Literal["assistant"]; vLLM (and the wrapper) send the turn's role
    assert str(bare.choices[0].message.role) == "user"
    streamed = oai.chat.completions.create(
        model=model,
        messages=README_MSGS,
        max_tokens=1,
        stream=True,
        extra_body={"add_generation_prompt": False},
    )
    assert next(c.choices[0].delta.role for c in streamed if c.choices) == "user"
    # SmolLM2's generation prompt is "<|im_start|>assistant\n"
    generation_prompt = bundled_tokenizer()("<|im_start|>assistant\n", add_special_tokens=False)
    assert bare.usage.prompt_tokens == plain.usage.prompt_tokens - len(
        generation_prompt["input_ids"]
    )
    started: list[Any] = [
        *README_MSGS,
        {"role": "assistant", "content": "The capital of France is"},
    ]
    cont = oai.chat.completions.create(
        model=model,
        messages=started,
        max_tokens=3,
        temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert "Paris" in (cont.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=model,
            messages=README_MSGS,
            max_tokens=1,
            extra_body={"chat_template_kwargs": {"messages": []}},
        )
    assert refused.value.body["param"] == "chat_template_kwargs"  # type: ignore[index]
    # past the end token (ignore_eos) the text shows it only when special tokens are kept
    texts = [
        oai.chat.completions.create(
            model=model,
            messages=README_MSGS,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": skip},
        )
        .choices[0]
        .message.content
        or ""
        for skip in (True, False)
    ]
    assert "<|im_end|>" not in texts[0]
    assert "<|im_end|>" in texts[1]


def token_ids_and_echo(oai: openai.OpenAI, model: str, *, prompt_logprobs: bool = False) -> None:
    """return_token_ids and echo, whole and streamed, shaped as vLLM's server shapes them.

    The assistant's started answer is continued (continue_final_message) and echoed back in
    front of the new text; `token_ids` on the choice decode to the new text, the top-level
    `prompt_token_ids` end with the started answer (no end-of-turn token after it).
    """
    started = "The capital of France is"
    msgs: list[Any] = [*README_MSGS, {"role": "assistant", "content": started}]
    extra = {
        "return_token_ids": True, "echo": True,
        "add_generation_prompt": False, "continue_final_message": True,
    }  # fmt: skip
    ask: dict[str, Any] = {
        "model": model, "messages": msgs, "max_tokens": 4, "temperature": 0, "extra_body": extra,
    }  # fmt: skip
    tok = bundled_tokenizer()
    whole = oai.chat.completions.create(**ask)
    choice = whole.choices[0]
    content = choice.message.content or ""
    assert content.startswith(started)
    assert choice.model_extra is not None
    assert whole.model_extra is not None
    ids, prompt_ids = choice.model_extra["token_ids"], whole.model_extra["prompt_token_ids"]
    assert whole.usage is not None
    assert len(ids) == whole.usage.completion_tokens
    assert len(prompt_ids) == whole.usage.prompt_tokens
    assert tok.decode(ids, skip_special_tokens=True) == content[len(started) :]
    assert tok.decode(prompt_ids).endswith(started)
    # vLLM's chat server: a whole echo carries the prompt's logprobs unasked (0 alternatives),
    # where the backend computes them (`prompt_logprobs`); one entry per prompt token, the first
    # null; a backend without them answers the echo without the key
    assert ("prompt_logprobs" in whole.model_extra) is prompt_logprobs
    if prompt_logprobs:
        prompt_lps = whole.model_extra["prompt_logprobs"]
        assert len(prompt_lps) == len(prompt_ids)
        assert prompt_lps[0] is None
        assert all(len(p) == 1 for p in prompt_lps[1:])
    streamed_ids: list[int] = []
    streamed_prompt: list[int] | None = None
    texts: list[str] = []
    for chunk in oai.chat.completions.create(**ask, stream=True):
        extra_top = chunk.model_extra or {}
        if "prompt_token_ids" in extra_top:
            assert streamed_prompt is None  # once, on the first token chunk
            streamed_prompt = extra_top["prompt_token_ids"]
        for c in chunk.choices:
            texts.append(c.delta.content or "")
            streamed_ids += (c.model_extra or {}).get("token_ids") or []
    assert texts[0] == started  # the echo comes first, alone
    assert "".join(texts) == content
    assert streamed_ids == ids
    assert streamed_prompt == prompt_ids
