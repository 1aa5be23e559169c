"""The transformers adapter against the real engine on the bundled SmolLM2 (fp32, CPU).

The first run converts the bundled GGUF into the cache (`IW_CACHE_DIR`, else the user cache);
later runs reuse it. Assertions compare the adapter with the same model driven directly, never
with fixed text: greedy answers differ between dtypes and engines (see ENGINES.md).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
from attrs import evolve, frozen

from adapters.base import AdapterContext, LoadInfo
from adapters.bundled import default_cache_dir, resolve_model_source
from adapters.transformers import TransformersAdapter, TransformersParams
from registry.memory import release_host_memory
from schemas.converter import StructureError, structure
from schemas.errors import EngineError, InvalidRequestError, ParamsValidationError
from schemas.generation import (
    GenerationRequest,
    Message,
    SamplingOptions,
    StructuredOutput,
    TokenDelta,
)

pytestmark = [
    pytest.mark.engine,
    pytest.mark.transformers,
    pytest.mark.asyncio(loop_scope="module"),
]

MODEL = "bundled:smollm2-135m"
PARAMS = TransformersParams(dtype="float32", device="cpu", max_concurrency=2, torch_threads=2)
QUESTION = "What is the capital of France?"
#: safety net so that a broken slot release fails the test instead of hanging it (not a speed check)
HANG = 120
MIB = 2**20


@frozen
class Loaded:
    """The module's shared adapter and what its load reported."""

    adapter: TransformersAdapter
    info: LoadInfo


def _context(**kw: Any) -> AdapterContext:
    return AdapterContext(name="transformers", cache_dir=default_cache_dir(), **kw)


def chat(content: str = QUESTION, **sampling: Any) -> GenerationRequest:
    """One user turn with the given sampling options (max_tokens defaults to 16)."""
    sampling.setdefault("max_tokens", 16)
    return GenerationRequest("t", (Message("user", content),), SamplingOptions(**sampling))


async def collect(adapter: TransformersAdapter, req: GenerationRequest) -> list[TokenDelta]:
    """Every delta of one request."""
    return [d async for d in adapter.generate(req)]


def text_of(deltas: list[TokenDelta]) -> str:
    """The streamed text, joined."""
    return "".join(d.text for d in deltas)


def tokens_of(deltas: list[TokenDelta]) -> int:
    """Completion tokens, as the service sums them."""
    return sum(d.token_count for d in deltas)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def loaded() -> AsyncIterator[Loaded]:
    """The bundled model, loaded once for the module."""
    adapter = TransformersAdapter(_context())
    info = await adapter.load(MODEL, PARAMS)
    yield Loaded(adapter, info)
    await adapter.unload()


async def test_load_reports_what_it_resolved(loaded: Loaded) -> None:
    """LoadInfo names the device, dtype, source kind and context; capabilities follow."""
    info = loaded.info
    assert info.device == "cpu"
    assert info.details["dtype"] == "float32"
    assert info.details["source"] == "bundled"
    assert info.max_context == PARAMS.max_model_len
    assert info.import_s >= 0
    assert info.init_s > 0
    assert info.warmup_s > 0
    caps = loaded.adapter.capabilities
    assert caps.max_n == 8
    assert caps.max_top_logprobs == 20
    assert caps.max_context == PARAMS.max_model_len
    assert {"seed", "stop", "ignore_eos", "min_tokens", "temperature"} <= caps.sampling


async def test_greedy_text_and_counts_match_the_model(loaded: Loaded) -> None:
    """Greedy output equals plain `model.generate`: same text, token counts and prompt size."""
    engine = loaded.adapter._engine
    assert engine is not None
    deltas = await collect(loaded.adapter, chat(max_tokens=48, temperature=0.0))
    text = text_of(deltas)
    assert text.strip()
    torch, tok = engine.torch, engine.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=48,
            do_sample=False,
        )
    generated = out[0, ids.shape[1] :].tolist()
    assert deltas[0].prompt_tokens == ids.shape[1]
    assert tokens_of(deltas) == len(generated)
    assert text == tok.decode(generated, skip_special_tokens=True)
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_logprobs_are_the_raw_log_softmax_as_vllm_reports_them(loaded: Loaded) -> None:
    """Greedy tokens' logprobs equal log_softmax of the model's logits; alternatives are the top.

    vLLM's default logprobs_mode is raw_logprobs (before temperature, penalties, logit_bias):
    the first token's alternatives are the same at temperature 0 and 1.5.
    """
    engine = loaded.adapter._engine
    assert engine is not None
    torch, tok = engine.torch, engine.tokenizer
    deltas = await collect(
        loaded.adapter, chat(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3)
    )
    lps = [lp for d in deltas for lp in d.logprobs or ()]
    assert len(lps) == tokens_of(deltas) == 4
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False
        )
        generated = out[0, len(prompt_ids) :].tolist()
        logits = engine.model(out).logits[0]
    for i, (token, lp) in enumerate(zip(generated, lps, strict=True)):
        row = torch.log_softmax(logits[len(prompt_ids) - 1 + i].float(), dim=-1)
        assert lp.token == tok.decode([token])
        assert lp.logprob == pytest.approx(float(row[token]), abs=1e-3)
        assert lp.bytes == tuple(lp.token.encode())
        best = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == [tok.decode([int(j)]) for j in best.indices]
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-3)
    hot = await collect(
        loaded.adapter,
        chat(max_tokens=1, temperature=1.5, seed=3, logprobs=True, top_logprobs=3),
    )
    first_hot = next(lp for d in hot for lp in d.logprobs or ())
    assert [t for t, _ in first_hot.top] == [t for t, _ in lps[0].top]
    assert [v for _, v in first_hot.top] == pytest.approx([v for _, v in lps[0].top], abs=1e-4)


async def test_n_choices_run_in_turn_each_seeded(loaded: Loaded) -> None:
    """n=3 yields indexes 0-2, one finish each; choice i repeats a single run with seed + i."""
    deltas = await collect(loaded.adapter, chat(max_tokens=5, temperature=1.0, seed=5, n=3))
    assert {d.index for d in deltas} == {0, 1, 2}
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2]
    by_index = ["".join(d.text for d in deltas if d.index == i) for i in range(3)]
    for i in (0, 1):
        single = await collect(loaded.adapter, chat(max_tokens=5, temperature=1.0, seed=5 + i))
        assert by_index[i] == text_of(single)


async def test_logit_bias_forces_and_is_checked_against_the_vocabulary(loaded: Loaded) -> None:
    """+100 on a token makes greedy pick it; an id past the vocabulary is a 400 on logit_bias."""
    engine = loaded.adapter._engine
    assert engine is not None
    token = engine.tokenizer("Bonjour", add_special_tokens=False)["input_ids"][0]
    deltas = await collect(
        loaded.adapter,
        chat(max_tokens=1, temperature=0.0, logit_bias=((token, 100.0),), logprobs=True),
    )
    (lp,) = [lp for d in deltas for lp in d.logprobs or ()]
    assert lp.token == engine.tokenizer.decode([token])
    vocab = int(engine.model.config.vocab_size)
    with pytest.raises(InvalidRequestError) as refused:
        await collect(loaded.adapter, chat(logit_bias=((vocab, 1.0),)))
    assert refused.value.param == "logit_bias"


async def test_max_tokens_ends_with_length(loaded: Loaded) -> None:
    """Hitting max_tokens ends the choice with finish_reason 'length' and that many tokens."""
    deltas = await collect(loaded.adapter, chat(max_tokens=3, temperature=0.0))
    assert deltas[-1].finish_reason == "length"
    assert tokens_of(deltas) == 3
    assert text_of(deltas)


async def test_ignore_eos_and_min_tokens(loaded: Loaded) -> None:
    """ignore_eos runs to max_tokens; min_tokens holds EOS back past the natural answer."""
    natural = await collect(loaded.adapter, chat(max_tokens=48, temperature=0.0))
    assert natural[-1].finish_reason == "stop"
    n = tokens_of(natural)
    forced = await collect(loaded.adapter, chat(max_tokens=n + 6, temperature=0.0, ignore_eos=True))
    assert tokens_of(forced) == n + 6
    assert forced[-1].finish_reason == "length"
    longer = await collect(
        loaded.adapter, chat(max_tokens=n + 20, temperature=0.0, min_tokens=n + 3)
    )
    assert tokens_of(longer) >= n + 3


async def test_stop_string_is_trimmed(loaded: Loaded) -> None:
    """Output ends right before the first occurrence of the stop string; finish is 'stop'."""
    full = text_of(
        await collect(loaded.adapter, chat(max_tokens=24, temperature=0.0, ignore_eos=True))
    )
    words = full.split()
    assert len(words) >= 4
    stop = words[3]
    deltas = await collect(
        loaded.adapter, chat(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
    )
    assert text_of(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].stop_reason == stop


async def test_same_seed_same_text_even_alongside_another_request(loaded: Loaded) -> None:
    """A seed repeats its sample, also while an unseeded request samples at the same time."""
    req = chat("Write a short poem about the sea.", max_tokens=16, temperature=1.0, seed=1234)
    alone = text_of(await collect(loaded.adapter, req))
    noise = chat("Tell me a story.", max_tokens=16, temperature=1.0, ignore_eos=True)
    together, _ = await asyncio.gather(collect(loaded.adapter, req), collect(loaded.adapter, noise))
    assert alone
    assert text_of(together) == alone


async def test_different_seeds_sample_differently(loaded: Loaded) -> None:
    """Four seeds at temperature 1 do not all give one text (each pair matching is unlikely)."""
    texts = set()
    for seed in (1, 2, 3, 4):
        req = chat("Write a short poem about the sea.", max_tokens=16, temperature=1.0, seed=seed)
        texts.add(text_of(await collect(loaded.adapter, req)))
    assert len(texts) >= 2


async def test_closing_a_stream_stops_it_and_frees_the_slot(loaded: Loaded) -> None:
    """aclose() after two deltas stops the worker; a new request runs at once in the freed slot."""
    adapter = loaded.adapter
    long = chat(max_tokens=400, temperature=0.0, ignore_eos=True)
    first, second = adapter.generate(long), adapter.generate(long)
    async with asyncio.timeout(HANG):
        for _ in range(2):
            await anext(first)
        await anext(second)
        assert adapter.stats().running == 2
        await first.aclose()
        # the worker has returned by the time aclose() does: one slot is free again
        assert adapter.stats().running == 1
        third = adapter.generate(long)
        await anext(third)
        stats = adapter.stats()
        assert (stats.running, stats.waiting) == (2, 0)
        await second.aclose()
        await third.aclose()
    assert (adapter.stats().running, adapter.stats().waiting) == (0, 0)


async def test_waiting_request_is_counted_and_runs_later(loaded: Loaded) -> None:
    """With both slots busy a third request waits (counted), then runs when one frees."""
    adapter = loaded.adapter
    long = chat(max_tokens=400, temperature=0.0, ignore_eos=True)
    a, b = adapter.generate(long), adapter.generate(long)
    async with asyncio.timeout(HANG):
        await anext(a)
        await anext(b)
        short = asyncio.ensure_future(collect(adapter, chat(max_tokens=2, temperature=0.0)))
        # the adapter's public counter is the thing under test: there is no event to wait on
        while adapter.stats().waiting == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert not short.done()
        await a.aclose()
        deltas = await short
        await b.aclose()
    assert tokens_of(deltas) == 2
    assert (adapter.stats().running, adapter.stats().waiting) == (0, 0)


async def test_prompt_beyond_context_is_a_400(loaded: Loaded) -> None:
    """A prompt that fills the whole context is refused on `messages`, with the numbers."""
    req = chat("word " * 2100, max_tokens=16)
    with pytest.raises(InvalidRequestError) as info:
        await collect(loaded.adapter, req)
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert "2048" in info.value.message


async def test_max_tokens_is_clamped_only_when_the_request_set_none(loaded: Loaded) -> None:
    """A set max_tokens beyond the room left is a 400; without one the room is used: length."""
    with pytest.raises(InvalidRequestError) as info:
        await collect(loaded.adapter, chat("word " * 2000, max_tokens=1200, ignore_eos=True))
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    req = chat("word " * 2000, max_tokens=2048, max_tokens_default=True, ignore_eos=True)
    deltas = await collect(loaded.adapter, req)
    prompt = next(d.prompt_tokens for d in deltas if d.prompt_tokens is not None)
    assert tokens_of(deltas) == 2048 - prompt
    assert deltas[-1].finish_reason == "length"


#: nested counted repetitions in a schema's `pattern` (the service bounds `{m,n}` in regex and
#: grammar specs, not inside a JSON schema): a valid schema xgrammar needs seconds to compile
EXPENSIVE = {
    "type": "object",
    "properties": {
        f"p{i}": {"type": "string", "pattern": "([a-z]{1,200}x){1,200}"} for i in (0, 1)
    },
    "required": ["p0", "p1"],
}


async def test_a_grammar_compile_past_its_bound_is_a_400_on_the_field(
    loaded: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema xgrammar compiles for seconds is a 400 naming the field once the bound passes.

    Unbounded, the request would wait out the compile and generate: no error at all.
    """
    adapter = loaded.adapter
    # a cheap constraint builds the compiler; then its bound is lowered for this test
    cheap = evolve(chat(max_tokens=1, temperature=0.0), structured=StructuredOutput("json_object"))
    await collect(adapter, cheap)
    engine = adapter._engine
    assert engine is not None
    assert engine.grammars is not None
    monkeypatch.setattr(engine.grammars, "timeout_s", 0.2)
    param = "response_format.json_schema.schema"
    structured = StructuredOutput("json", json.dumps(EXPENSIVE), param)
    req = evolve(chat(max_tokens=1, temperature=0.0), structured=structured)
    async with asyncio.timeout(HANG):
        with pytest.raises(InvalidRequestError) as info:
            await collect(adapter, req)
    assert (info.value.status_code, info.value.param) == (400, param)
    assert info.value.code == "grammar_compile_timeout"
    assert (adapter.stats().running, adapter.stats().waiting) == (0, 0)


async def test_unload_mid_stream_ends_it_with_abort() -> None:
    """unload() while a stream runs ends that stream with finish 'abort' and frees everything."""
    adapter = TransformersAdapter(_context())
    await adapter.load(MODEL, PARAMS)
    stream = adapter.generate(chat(max_tokens=400, temperature=0.0, ignore_eos=True))
    async with asyncio.timeout(HANG):
        seen = [await anext(stream), await anext(stream)]
        unloading = asyncio.ensure_future(adapter.unload())
        seen += [d async for d in stream]
        await unloading
    assert seen[-1].finish_reason == "abort"
    assert tokens_of(seen) < 400
    assert adapter._engine is None
    assert (adapter.stats().running, adapter.stats().waiting) == (0, 0)
    await adapter.unload()  # idempotent


def _rss() -> int:
    release_host_memory()  # what the manager does after unload: give freed heap back
    return int(psutil.Process().memory_info().rss)


async def test_load_unload_cycles_do_not_grow_rss() -> None:
    """Ten load/unload cycles stay within 256 MiB of the first (a leaked copy is ~540 MiB)."""
    adapter = TransformersAdapter(_context())
    samples: list[int] = []
    loaded_rss = 0
    for _ in range(10):
        await adapter.load(MODEL, TransformersParams(dtype="float32", device="cpu"))
        loaded_rss = int(psutil.Process().memory_info().rss)
        await collect(adapter, chat(max_tokens=2, temperature=0.0))
        await adapter.unload()
        samples.append(_rss())
    growth = max(samples[1:]) - samples[0]
    assert growth < 256 * MIB, [s // MIB for s in samples]
    # unload really returned the fp32 weights (about 540 MB), not only dropped references
    assert loaded_rss - samples[-1] > 300 * MIB


async def test_hub_id_offline_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id that cannot be fetched is a 422 before any loading; the adapter loads fine after."""
    import huggingface_hub.constants  # noqa: PLC0415  (imported by transformers already)

    # this machine is offline either way; offline mode fails at once instead of after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    canary = "hf_canary_4c1d9e0b7a"
    monkeypatch.setenv("HF_TOKEN", canary)
    adapter = TransformersAdapter(_context())
    started = time.monotonic()
    with pytest.raises(ParamsValidationError) as info:
        await adapter.load("iw-test-org/no-such-model", PARAMS)
    assert time.monotonic() - started < 5
    message = info.value.message
    assert info.value.code == "model_unreachable"
    assert message == (
        "model 'iw-test-org/no-such-model' is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set"
    )
    assert canary not in message
    await adapter.unload()  # the manager's clean-up after a failed load
    assert adapter._engine is None
    await adapter.load(MODEL, PARAMS)
    assert tokens_of(await collect(adapter, chat(max_tokens=2, temperature=0.0))) == 2
    await adapter.unload()


@pytest.fixture
def no_template_model(tmp_path: Path) -> Path:
    """A copy of the bundled folder (weights linked) without its chat template."""
    source = Path(resolve_model_source(MODEL, _context(), progress=False))
    copy = tmp_path / "no-template"
    copy.mkdir()
    for item in source.iterdir():
        if item.name == "chat_template.jinja":
            continue
        if item.suffix == ".safetensors":
            (copy / item.name).symlink_to(item)
        else:
            shutil.copy(item, copy / item.name)
    assert "chat_template" not in (copy / "tokenizer_config.json").read_text()
    return copy


async def test_model_without_chat_template_fails_at_load(no_template_model: Path) -> None:
    """A local model whose tokenizer has no chat template is refused at load, clearly."""
    adapter = TransformersAdapter(_context(model_roots=(no_template_model.parent,)))
    with pytest.raises(EngineError) as info:
        await adapter.load(str(no_template_model), PARAMS)
    assert "chat template" in info.value.message
    assert str(no_template_model.parent) not in info.value.message
    await adapter.unload()
    assert adapter._engine is None


async def test_params_are_strict_and_name_the_field() -> None:
    """Engine params refuse unknown dtypes, devices and kernels with the field's path."""
    cases = {
        "dtype": "fp8",
        "device": "tpu",
        "attn_implementation": "flash",
        "max_concurrency": 0,
        "max_model_len": 8,
    }
    for name, value in cases.items():
        with pytest.raises(StructureError) as info:
            structure({name: value}, TransformersParams, path="$.engine_params")
        assert info.value.errors[0].path == f"$.engine_params.{name}"
    params = structure({"device": "cuda:1", "dtype": "bfloat16"}, TransformersParams)
    assert (params.device, params.dtype, params.max_model_len) == ("cuda:1", "bfloat16", 2048)


async def test_trust_remote_code_needs_the_registry() -> None:
    """trust_remote_code is refused (422) unless adapters.yaml allows it, before any import."""
    adapter = TransformersAdapter(_context())
    with pytest.raises(ParamsValidationError) as info:
        await adapter.load(MODEL, TransformersParams(trust_remote_code=True))
    assert info.value.param == "$.engine_params.trust_remote_code"
    assert adapter._engine is None
