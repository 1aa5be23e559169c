"""The same `/v1/completions`, `/tokenize` and `/detokenize` checks, run on every real engine.

Each engine module (tests/engines/test_transformers.py, test_vllm.py) calls these against its own
module-scoped server, so no engine is loaded twice for them. Texts are compared with what the
same engine answered for an equivalent request (greedy), never with fixed strings; token ids are
compared with the model's own tokenizer read from the bundled folder.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import httpx
import openai
import pytest

from adapters.base import AdapterContext
from adapters.bundled import default_cache_dir, resolve_model_source
from helpers import API

PROMPT = "The capital of France is"
MSGS: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


@functools.cache
def tokenizer() -> Any:
    """The bundled SmolLM2's tokenizer, as transformers reads it from the converted folder."""
    from transformers import AutoTokenizer  # noqa: PLC0415  (heavy: only the engine tests)

    context = AdapterContext(name="checks", cache_dir=default_cache_dir())
    folder = resolve_model_source("bundled:smollm2-135m", context, progress=False)
    return AutoTokenizer.from_pretrained(folder)


def _stream_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


def check_token_prompt(oai: openai.OpenAI, model: str) -> None:
    """A token-id prompt runs exactly as its text: same greedy text, counts; whole and streamed."""
    ids = tokenizer().encode(PROMPT)
    by_text = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.object == "text_completion"
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.choices[0].text.strip()
    assert by_ids.usage is not None
    assert by_text.usage is not None
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    assert 0 < by_ids.usage.completion_tokens <= 6
    chunks = list(
        oai.completions.create(
            model=model, prompt=ids, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert len({c.id for c in chunks}) == 1
    assert _stream_text(chunks) == by_ids.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(ids)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == by_ids.choices[0].finish_reason
    assert chunks[-1].model_extra is not None
    assert chunks[-1].model_extra["metrics"]["time_to_first_token_ms"] > 0


def check_echo(oai: openai.OpenAI, model: str) -> None:
    """`echo` puts the prompt (text, or token ids decoded) before the same greedy completion."""
    plain = oai.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = oai.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    ids = tokenizer().encode(PROMPT)
    chunks = list(
        oai.completions.create(
            model=model, prompt=ids, max_tokens=4, temperature=0, echo=True, stream=True
        )
    )
    assert _stream_text(chunks) == tokenizer().decode(ids) + plain.choices[0].text


def check_logprobs(oai: openai.OpenAI, model: str) -> None:
    """`logprobs: 2`: OpenAI's completions shape, greedy picks the best, whole equals streamed."""
    out = oai.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert lp.text_offset is not None
    assert out.usage is not None
    assert len(lp.tokens) == out.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0
    steps = zip(lp.text_offset[:-1], lp.text_offset[1:], lp.tokens[:-1], strict=True)
    assert all(b - a == len(t) for a, b, t in steps)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is not None
        assert logprob is not None
        assert logprob <= 0
        assert 1 <= len(top) <= 3  # the sampled token, then up to 2 alternatives
        assert math.isclose(top[token], logprob, abs_tol=1e-4)
        assert logprob >= max(top.values()) - 1e-4  # greedy: the best of them
    chunks = list(
        oai.completions.create(
            model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, stream=True
        )
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens or ()]  # fmt: skip
    assert streamed == lp.tokens
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset or ()]  # fmt: skip
    assert offsets == lp.text_offset


def _extra(obj: Any) -> dict[str, Any]:
    extra: dict[str, Any] | None = obj.model_extra
    assert extra is not None
    return extra


def check_token_ids(oai: openai.OpenAI, model: str) -> None:
    """`return_token_ids` and `echo` as vLLM's completions server shapes them.

    Whole: the choice's `token_ids` and `prompt_token_ids`, and the echoed text empty (vLLM
    echoes no text with the ids). Streamed: `token_ids` per chunk joining to the whole's, and
    `prompt_token_ids` on the first chunk, with `echo` alone too.
    """
    ids = tokenizer().encode(PROMPT)
    args: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    plain = oai.completions.create(**args)
    whole = oai.completions.create(**args, echo=True, extra_body={"return_token_ids": True})
    choice = whole.choices[0]
    assert choice.text == plain.choices[0].text
    assert _extra(choice)["prompt_token_ids"] == ids
    assert whole.usage is not None
    assert len(_extra(choice)["token_ids"]) == whole.usage.completion_tokens
    assert tokenizer().decode(_extra(choice)["token_ids"]) == plain.choices[0].text
    chunks = list(
        oai.completions.create(**args, stream=True, extra_body={"return_token_ids": True})
    )
    with_text = [c for c in chunks if c.choices]
    assert _extra(with_text[0].choices[0])["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in _extra(c.choices[0]) for c in with_text[1:])
    streamed = [t for c in with_text for t in _extra(c.choices[0]).get("token_ids") or ()]
    assert streamed == _extra(choice)["token_ids"]
    chunks = list(oai.completions.create(**args, stream=True, echo=True))
    first = next(c for c in chunks if c.choices)
    assert _extra(first.choices[0])["prompt_token_ids"] == ids
    assert first.choices[0].text.startswith(PROMPT)


def check_prompt_logprobs(oai: openai.OpenAI, model: str) -> None:
    """`prompt_logprobs`, and `echo` with `logprobs`, as vLLM's completions server shapes them.

    The choice carries `prompt_logprobs` (null first, then each prompt token among its
    position's entries); with echo the logprobs cover the prompt first (its first position
    null), then the completion's, offsets running over both; streamed the same tokens come.
    A stream refuses `prompt_logprobs` above 0, naming it (vLLM's check).
    """
    ids = tokenizer().encode(PROMPT)
    args: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    plain = oai.completions.create(**args, logprobs=2)
    out = oai.completions.create(**args, extra_body={"prompt_logprobs": 1})
    positions = _extra(out.choices[0])["prompt_logprobs"]
    assert len(positions) == len(ids)
    assert positions[0] is None
    for token, position in zip(ids[1:], positions[1:], strict=True):
        assert str(token) in position
        assert 1 <= len(position) <= 2  # the top 1, and the prompt's own
        assert all(v["logprob"] <= 0 for v in position.values())
    echoed = oai.completions.create(**args, logprobs=2, echo=True)
    choice = echoed.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    lp = choice.logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert lp.text_offset is not None
    assert "".join(lp.tokens[: len(ids)]) == PROMPT
    assert lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert plain.choices[0].logprobs is not None
    assert lp.tokens[len(ids) :] == plain.choices[0].logprobs.tokens
    assert lp.text_offset[0] == 0
    steps = zip(lp.text_offset[:-1], lp.text_offset[1:], lp.tokens[:-1], strict=True)
    assert all(b - a == len(t) for a, b, t in steps)
    assert len(_extra(choice)["prompt_logprobs"]) == len(ids)
    chunks = list(oai.completions.create(**args, logprobs=2, echo=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens or ()]  # fmt: skip
    assert streamed == lp.tokens
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(**args, stream=True, extra_body={"prompt_logprobs": 1})
    assert refused.value.param == "prompt_logprobs"


def check_prompt_logprobs_refused(oai: openai.OpenAI, model: str) -> None:
    """A backend that does not compute prompt logprobs refuses them by name, echo's too."""
    args: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(**args, extra_body={"prompt_logprobs": 1})
    assert refused.value.param == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(**args, echo=True, logprobs=1)
    assert refused.value.param == "echo"


def check_logprobs_refused(oai: openai.OpenAI, model: str) -> None:
    """A backend without logprobs refuses `logprobs` by name."""
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=model, prompt=PROMPT, max_tokens=2, logprobs=1)
    assert info.value.param == "logprobs"


def check_tokenize_round_trip(url: str, model: str, max_model_len: int) -> None:
    """/tokenize gives the tokenizer's ids (prompt and chat), /detokenize gives the text back.

    The chat count also equals the prompt tokens the engine reports for the same messages.
    """
    tok = tokenizer()
    with httpx.Client(base_url=url, headers=API, timeout=60) as http:
        r = http.post(
            "/tokenize", json={"model": model, "prompt": PROMPT, "return_token_strs": True}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        ids = tok.encode(PROMPT)
        assert body["tokens"] == ids
        assert body["count"] == len(ids)
        assert body["max_model_len"] == max_model_len
        assert body["token_strs"] == tok.convert_ids_to_tokens(ids)
        r = http.post("/detokenize", json={"model": model, "tokens": body["tokens"]})
        assert r.status_code == 200, r.text
        assert r.json() == {"prompt": tok.decode(ids)}
        assert tok.decode(ids) == PROMPT
        r = http.post("/tokenize", json={"model": model, "messages": MSGS})
        assert r.status_code == 200, r.text
        templated = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
        chat_ids = tok.encode(templated, add_special_tokens=False)
        assert r.json()["tokens"] == chat_ids
        assert "token_strs" not in r.json() or r.json()["token_strs"] is None
        chat = http.post(
            "/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 1}
        )
        assert chat.json()["usage"]["prompt_tokens"] == len(chat_ids)
        r = http.post("/detokenize", json={"model": model, "tokens": [0, len(tok) + 10]})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "tokens"
        r = http.post("/tokenize", json={"model": "other-model", "prompt": PROMPT})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
