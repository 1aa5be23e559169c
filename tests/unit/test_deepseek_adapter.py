"""The DeepSeek adapter over a fake inner engine adapter: params, reasoning split, defaults."""

# DeepSeek's special tokens really are spelt with U+FF5C FULLWIDTH VERTICAL LINE.
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, ClassVar

import attrs
import pytest

from adapters.base import AdapterContext, Capabilities, EngineStats, LoadInfo
from adapters.deepseek import ChatPromptSource, DeepseekAdapter, DeepseekParams
from adapters.sglang import SglangParams
from adapters.vllm import VllmParams
from registry.config import AdapterEntry, RegistryConfig
from registry.registry import AdapterRegistry
from schemas.errors import EngineError, ParamsValidationError
from schemas.generation import (
    FinishReason,
    GenerationRequest,
    Message,
    SamplingOptions,
    TokenDelta,
    TokenLogprob,
)
from schemas.jsonschema import field_docs

R1_TEMPLATE = "{{ bos }}...<｜Assistant｜><think>\\n"  # shape only: it mentions the tag
PLAIN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}...{% endfor %}"
SAMPLING = frozenset({"temperature", "top_p", "stop", "n"})


class BareEngineAdapter:
    """A scripted inner adapter that cannot show its chat template (as vLLM's may not)."""

    params_type: ClassVar[type[Any]] = SglangParams

    def __init__(
        self,
        script: Sequence[TokenDelta] = (),
        *,
        template: str | None = R1_TEMPLATE,
        generation_prompt: str = "<｜Assistant｜>",
        sampling: frozenset[str] = SAMPLING,
    ) -> None:
        self.script = list(script)
        self.template = template
        self.generation_prompt = generation_prompt
        self.sampling = sampling
        self.loaded: list[tuple[str, Any]] = []
        self.requests: list[GenerationRequest] = []
        self.closed = 0
        self.unloads = 0
        self.fail_check: ParamsValidationError | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What the fake engine honours."""
        return Capabilities(sampling=self.sampling, max_n=4, max_context=4096)

    def check(self, model: str, params: Any) -> None:
        """Raise the scripted refusal, if any."""
        del model, params
        if self.fail_check is not None:
            raise self.fail_check

    async def load(self, model: str, params: Any) -> LoadInfo:
        """Record what was loaded."""
        self.loaded.append((model, params))
        return LoadInfo(init_s=1.0, details={"engine": "fake"})

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Yield the script; count being closed early."""
        self.requests.append(req)
        finished = False
        try:
            for delta in self.script:
                yield delta
            finished = True
        finally:
            if not finished:
                self.closed += 1

    async def unload(self) -> None:
        """Count unloads."""
        self.unloads += 1

    def stats(self) -> EngineStats:
        """Fixed figures."""
        return EngineStats(running=3, waiting=1)


class FakeEngineAdapter(BareEngineAdapter):
    """The scripted inner adapter with a chat template (a `ChatPromptSource`)."""

    @property
    def chat_template(self) -> str | None:
        """The scripted template."""
        return self.template

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """A made-up rendering ending with the scripted generation prompt."""
        return "".join(f"<{m.role}>{m.content}" for m in messages) + self.generation_prompt


def _deltas(*texts: str, finish: FinishReason = "stop", prompt_tokens: int = 7) -> list[TokenDelta]:
    out = [
        TokenDelta(t, 1, 0, None, prompt_tokens if i == 0 else None) for i, t in enumerate(texts)
    ]
    last = out[-1]
    out[-1] = attrs.evolve(last, finish_reason=finish, prompt_tokens=prompt_tokens)
    return out


def _request(**sampling: Any) -> GenerationRequest:
    options = SamplingOptions(**{"max_tokens": 64, **sampling})
    return GenerationRequest("req-1", (Message("user", "Capital of France?"),), options)


def _params(**values: Any) -> DeepseekParams:
    return DeepseekParams(**{"engine": "sglang", **values})


async def _loaded(inner: BareEngineAdapter, **params: Any) -> DeepseekAdapter:
    adapter = DeepseekAdapter(AdapterContext(name="deepseek"), inner=inner)
    await adapter.load("deepseek-ai/DeepSeek-R1", _params(**params))
    return adapter


async def _run(adapter: DeepseekAdapter, req: GenerationRequest | None = None) -> list[TokenDelta]:
    return [d async for d in adapter.generate(req or _request())]


def _joined(deltas: list[TokenDelta]) -> tuple[str, str]:
    return "".join(d.reasoning for d in deltas), "".join(d.text for d in deltas)


# --- params ------------------------------------------------------------------------------------


def _built_params(overrides: dict[str, Any]) -> DeepseekParams:
    """Params as the registry builds them for a load: over the defaults, 422 naming a field."""
    entry = AdapterEntry(module="adapters.deepseek:DeepseekAdapter")
    registry = AdapterRegistry(RegistryConfig(adapters={"deepseek": entry}), use_entry_points=False)
    params = registry.build_params("deepseek", overrides)
    # the registry knows a backend's params class only at run time (`SomeParams`)
    assert isinstance(params, DeepseekParams)
    return params


def test_defaults_are_vllm_and_the_r1_recommendations() -> None:
    """Unset params mean vLLM, auto reasoning, temperature 0.6 and top_p 0.95."""
    params = _built_params({})
    assert (params.engine, params.reasoning, params.starts_in_reasoning) == ("vllm", "auto", None)
    assert (params.default_temperature, params.default_top_p) == (0.6, 0.95)
    assert {f.name for f in attrs.fields(DeepseekParams)} == set(field_docs(DeepseekParams))


@pytest.mark.parametrize(
    ("engine", "inner", "param"),
    [
        ("vllm", {"max_model_lenn": 4096}, "$.engine_params.engine_params.max_model_lenn"),
        ("vllm", {"max_model_len": 2}, "$.engine_params.engine_params.max_model_len"),
        ("sglang", {"tp_size": "2"}, "$.engine_params.engine_params.tp_size"),
    ],
)
def test_inner_params_are_checked_under_our_path(
    engine: str, inner: dict[str, Any], param: str
) -> None:
    """The inner engine's params are validated as that engine's, errors under our path."""
    with pytest.raises(ParamsValidationError) as caught:
        _built_params({"engine": engine, "engine_params": inner})
    assert caught.value.status_code == 422
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("engine", "extra", "param", "code"),
    [
        ("sglang", {"mem_fractoin": 1}, "extra.mem_fractoin", "unknown_param"),
        (
            "sglang",
            {"custom_weight_loader": ["x.y"]},
            "extra.custom_weight_loader",
            "param_refused",
        ),
        ("vllm", {"worker_cls": "evil.Worker"}, "extra.worker_cls", "param_refused"),
        (
            "vllm",
            {"compilation_config": {"backend": "evil.fn"}},
            "extra.compilation_config.backend",
            "param_refused",
        ),
    ],
)
def test_inner_extra_goes_through_the_engine_allowlist(
    engine: str, extra: dict[str, Any], param: str, code: str
) -> None:
    """DeepSeek's check applies the inner engine's `extra` allowlist itself, under our path."""
    params = _built_params({"engine": engine, "engine_params": {"extra": extra}})
    inner = FakeEngineAdapter()  # a fake inner: the refusal cannot come from it
    with pytest.raises(ParamsValidationError) as caught:
        DeepseekAdapter(AdapterContext(name="deepseek"), inner=inner).check("org/model", params)
    assert caught.value.status_code == 422
    assert caught.value.param == f"$.engine_params.engine_params.{param}"
    assert caught.value.code == code


def test_inner_params_reach_the_inner_schema() -> None:
    """Valid inner params structure into the chosen engine's params class."""
    params = _built_params({"engine_params": {"max_model_len": 4096, "enforce_eager": True}})
    adapter = DeepseekAdapter(AdapterContext(name="deepseek"))
    inner = adapter._inner_params(params)
    assert isinstance(inner, VllmParams)
    assert (inner.max_model_len, inner.enforce_eager) == (4096, True)


def test_check_moves_inner_refusals_under_our_path() -> None:
    """An inner refusal at `$.engine_params.x` comes back at `$.engine_params.engine_params.x`."""
    inner = FakeEngineAdapter()
    inner.fail_check = ParamsValidationError("no", param="$.engine_params.trust_remote_code")
    adapter = DeepseekAdapter(AdapterContext(name="deepseek"), inner=inner)
    with pytest.raises(ParamsValidationError) as caught:
        adapter.check("deepseek-ai/DeepSeek-R1", _params())
    assert caught.value.param == "$.engine_params.engine_params.trust_remote_code"


def test_real_inner_check_gates_trust_remote_code() -> None:
    """With the real SGLang adapter inside, trust_remote_code needs deepseek's registry entry."""
    adapter = DeepseekAdapter(AdapterContext(name="deepseek"))
    params = _params(engine_params={"trust_remote_code": True})
    with pytest.raises(ParamsValidationError) as caught:
        adapter.check("deepseek-ai/DeepSeek-R1", params)
    assert caught.value.param == "$.engine_params.engine_params.trust_remote_code"


# --- lifecycle ---------------------------------------------------------------------------------


async def test_load_passes_structured_inner_params_and_reports() -> None:
    """load() hands the inner adapter its own params class and says what it decided."""
    inner = FakeEngineAdapter()
    adapter = DeepseekAdapter(AdapterContext(name="deepseek"), inner=inner)
    info = await adapter.load(
        "deepseek-ai/DeepSeek-R1", _params(engine_params={"context_length": 4096})
    )
    ((model, params),) = inner.loaded
    assert model == "deepseek-ai/DeepSeek-R1"
    assert isinstance(params, SglangParams)
    assert params.context_length == 4096
    assert info.details["engine"] == "sglang"
    assert info.details["reasoning_split"] is True
    assert info.init_s == 1.0


async def test_capabilities_stats_and_unload_pass_through() -> None:
    """Capabilities are the inner's plus reasoning; stats are the inner's; unload is idempotent."""
    inner = FakeEngineAdapter()
    adapter = await _loaded(inner)
    caps = adapter.capabilities
    assert caps.reasoning is True
    assert (caps.sampling, caps.max_n, caps.max_context) == (SAMPLING, 4, 4096)
    assert adapter.stats().running == 3
    await adapter.unload()
    await adapter.unload()
    assert inner.unloads == 1
    assert adapter.stats().running is None
    with pytest.raises(EngineError):
        await _run(adapter)


def test_the_fake_is_a_prompt_source() -> None:
    """The fake offers the template protocol; the bare one does not (both paths get tested)."""
    assert isinstance(FakeEngineAdapter(), ChatPromptSource)
    assert not isinstance(BareEngineAdapter(), ChatPromptSource)


# --- the split ---------------------------------------------------------------------------------


async def test_think_block_becomes_reasoning_with_counts_kept() -> None:
    """Tags cut across deltas are removed; thinking is reasoning; tokens and finish are kept."""
    script = _deltas("<th", "ink>", "Let me", " think", "</thi", "nk>\n\n", "Paris", "")
    adapter = await _loaded(FakeEngineAdapter(script))
    deltas = await _run(adapter)
    assert _joined(deltas) == ("Let me think", "\n\nParis")
    assert sum(d.token_count for d in deltas) == len(script)
    assert deltas[0].prompt_tokens == 7  # carried over from the swallowed tag deltas
    assert deltas[-1].finish_reason == "stop"
    assert all(d.text or d.reasoning for d in deltas[:-1])


async def test_template_opened_block_is_detected_per_request() -> None:
    """A prompt that ends by opening the think block means the output starts inside it."""
    inner = FakeEngineAdapter(
        _deltas("plan ", "more</think>", "answer"), generation_prompt="<｜Assistant｜><think>\n"
    )
    adapter = await _loaded(inner)
    assert _joined(await _run(adapter)) == ("plan more", "answer")


async def test_starts_in_reasoning_can_be_forced_off() -> None:
    """`starts_in_reasoning: false` overrides detection: text before a tag is content."""
    inner = FakeEngineAdapter(
        _deltas("plan</think>", "answer"), generation_prompt="<｜Assistant｜><think>\n"
    )
    adapter = await _loaded(inner, starts_in_reasoning=False)
    assert _joined(await _run(adapter)) == ("", "plan</think>answer")


async def test_unterminated_block_is_all_reasoning() -> None:
    """A stream that ends inside `<think>` (max_tokens) gives everything to reasoning."""
    adapter = await _loaded(
        FakeEngineAdapter(_deltas("<think>", "still going </thi", finish="length"))
    )
    deltas = await _run(adapter)
    assert _joined(deltas) == ("still going </thi", "")
    assert deltas[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("template", "reasoning", "split"),
    [
        (PLAIN_TEMPLATE, "auto", False),
        (R1_TEMPLATE, "auto", True),
        (R1_TEMPLATE, "off", False),
        (PLAIN_TEMPLATE, "on", True),
    ],
)
async def test_reasoning_switch(template: str, reasoning: str, split: bool) -> None:
    """`auto` splits when the template mentions `<think>`; `on`/`off` force it."""
    inner = FakeEngineAdapter(_deltas("<think>x</think>", "y"), template=template)
    adapter = await _loaded(inner, reasoning=reasoning)
    expected = ("x", "y") if split else ("", "<think>x</think>y")
    assert _joined(await _run(adapter)) == expected


async def test_inner_without_template_still_gives_plain_text_as_content() -> None:
    """An inner adapter that cannot show its template: split on, untagged text all content."""
    adapter = await _loaded(BareEngineAdapter(_deltas("The capital", " is Paris.")))
    deltas = await _run(adapter)
    assert _joined(deltas) == ("", "The capital is Paris.")
    assert [d.text for d in deltas] == ["The capital", " is Paris."]


async def test_choices_are_split_separately() -> None:
    """With n > 1 each choice index has its own splitter."""
    script = [
        TokenDelta("<think>a", 1, 0),
        TokenDelta("plain", 1, 1),
        TokenDelta("</think>A", 1, 0, "stop"),
        TokenDelta(" text", 1, 1, "stop"),
    ]
    adapter = await _loaded(FakeEngineAdapter(script))
    deltas = await _run(adapter, _request(n=2))
    by_index = {i: _joined([d for d in deltas if d.index == i]) for i in (0, 1)}
    assert by_index == {0: ("a", "A"), 1: ("", "plain text")}


async def test_held_deltas_keep_logprobs_and_timestamps() -> None:
    """What a swallowed tag delta carried (logprobs, engine times) rides on the next delta."""
    tag = TokenLogprob("<think>", -0.1)
    word = TokenLogprob("hm", -0.2)
    script = [
        TokenDelta("<think>", 1, 0, None, 5, logprobs=(tag,), engine_first_token_at=1.5),
        TokenDelta("hm", 1, 0, None, None, logprobs=(word,)),
        TokenDelta("", 1, 0, "stop", 5),
    ]
    adapter = await _loaded(FakeEngineAdapter(script))
    deltas = await _run(adapter)
    assert deltas[0].reasoning == "hm"
    assert deltas[0].logprobs == (tag, word)
    assert (deltas[0].token_count, deltas[0].engine_first_token_at) == (2, 1.5)


# --- sampling defaults and cancellation --------------------------------------------------------


async def test_recommended_sampling_fills_only_unset_values() -> None:
    """Temperature 0.6 and top_p 0.95 apply where unset; a request's own values win."""
    inner = FakeEngineAdapter(_deltas("a"))
    adapter = await _loaded(inner)
    await _run(adapter)
    await _run(adapter, _request(temperature=0.0))
    first, second = (r.sampling for r in inner.requests)
    assert (first.temperature, first.top_p) == (0.6, 0.95)
    assert (second.temperature, second.top_p) == (0.0, 0.95)


async def test_recommended_sampling_respects_capabilities_and_null() -> None:
    """No default is sent for an option the engine lacks, nor when the param is null."""
    inner = FakeEngineAdapter(_deltas("a"), sampling=frozenset({"top_p"}))
    adapter = await _loaded(inner, default_top_p=None)
    await _run(adapter)
    (only,) = inner.requests
    assert (only.sampling.temperature, only.sampling.top_p) == (None, None)


async def test_closing_the_stream_closes_the_inner_stream() -> None:
    """A client going away closes the inner engine's stream (which aborts its request)."""
    inner = FakeEngineAdapter(_deltas("<think>a", "b", "c</think>", "d"))
    adapter = await _loaded(inner)
    stream = adapter.generate(_request())
    assert (await anext(stream)).reasoning == "a"
    await stream.aclose()
    assert inner.closed == 1
