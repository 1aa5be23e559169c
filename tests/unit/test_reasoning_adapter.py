"""The reasoning post-processor over a scripted inner adapter: split, start detection, pass-through.

These were the DeepSeek adapter's tests; the behaviours they pin now belong to any backend with
`reasoning_parser` set (`adapters.reasoning_adapter.ReasoningAdapter`).
"""

# DeepSeek's special tokens really are spelt with U+FF5C FULLWIDTH VERTICAL LINE.
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import attrs
import pytest

from adapters.base import AdapterContext, BaseAdapter, Capabilities, EngineStats, LoadInfo
from adapters.echo import EchoAdapter, EchoParams
from adapters.reasoning import PARSERS, ReasoningParser
from adapters.reasoning_adapter import ChatPromptSource, ReasoningAdapter
from adapters.sglang import SglangParams
from schemas.errors import EngineError, ParamsValidationError
from schemas.generation import (
    FinishReason,
    GenerationRequest,
    Message,
    SamplingOptions,
    TokenDelta,
    TokenLogprob,
)

R1 = PARSERS["deepseek_r1"]
THINK = PARSERS["think"]
SAMPLING = frozenset({"temperature", "top_p", "stop", "n"})
FEATURES = frozenset({"logit_bias", "response_format.json_schema", "tool_choice.required"})


class BareEngineAdapter(BaseAdapter[SglangParams]):
    """A scripted inner adapter that cannot show its rendered prompt (as echo or transformers)."""

    params_type = SglangParams

    def __init__(
        self,
        script: Sequence[TokenDelta] = (),
        *,
        generation_prompt: str = "<｜Assistant｜>",
        features: frozenset[str] = FEATURES,
    ) -> None:
        super().__init__(AdapterContext(name="sglang"))
        self.script = list(script)
        self.generation_prompt = generation_prompt
        self.features = features
        self.loaded: list[tuple[str, Any]] = []
        self.requests: list[GenerationRequest] = []
        self.closed = 0
        self.unloads = 0
        self.fail_check: ParamsValidationError | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What the fake engine honours."""
        return Capabilities(sampling=SAMPLING, max_n=4, max_context=4096, features=self.features)

    def check(self, model: str, params: SglangParams) -> None:
        """Raise the scripted refusal, if any."""
        del model, params
        if self.fail_check is not None:
            raise self.fail_check

    async def load(self, model: str, params: SglangParams) -> LoadInfo:
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
    """The scripted inner adapter that renders its prompt (a `ChatPromptSource`, as vLLM)."""

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


async def _loaded(
    inner: BareEngineAdapter, parser: ReasoningParser = R1
) -> ReasoningAdapter[SglangParams]:
    adapter = ReasoningAdapter(inner, parser)
    await adapter.load("deepseek-ai/DeepSeek-R1", SglangParams())
    return adapter


async def _run(
    adapter: ReasoningAdapter[SglangParams], req: GenerationRequest | None = None
) -> list[TokenDelta]:
    return [d async for d in adapter.generate(req or _request())]


def _joined(deltas: list[TokenDelta]) -> tuple[str, str]:
    return "".join(d.reasoning for d in deltas), "".join(d.text for d in deltas)


# --- the seam ----------------------------------------------------------------------------------


def test_the_wrapper_is_an_adapter() -> None:
    """The wrapped instance satisfies the adapter protocol and keeps the inner params/context."""
    inner = EchoAdapter(AdapterContext(name="echo"))
    adapter = ReasoningAdapter(inner, THINK)
    assert adapter.params_type is EchoParams
    assert adapter.context is inner.context
    assert adapter.inner is inner
    # echo keeps its capabilities object: the wrapper builds its own once, not per request
    assert adapter.capabilities is adapter.capabilities
    assert adapter.capabilities.reasoning is True


async def test_load_passes_params_through_and_reports_the_parser() -> None:
    """load() hands the inner adapter its own params and says which parser runs."""
    inner = FakeEngineAdapter()
    adapter = ReasoningAdapter(inner, R1)
    info = await adapter.load("deepseek-ai/DeepSeek-R1", SglangParams(context_length=4096))
    ((model, params),) = inner.loaded
    assert (model, params.context_length) == ("deepseek-ai/DeepSeek-R1", 4096)
    assert info.details == {
        "engine": "fake",
        "reasoning_parser": "deepseek_r1",
        "reasoning_reads_prompt": True,
    }
    assert info.init_s == 1.0
    bare = await _loaded(BareEngineAdapter())
    assert bare.capabilities.reasoning is True
    assert (await bare.load("m", SglangParams())).details["reasoning_reads_prompt"] is False


def test_check_is_the_inner_check() -> None:
    """A refusal of the inner adapter comes back as it was (same param path)."""
    inner = FakeEngineAdapter()
    inner.fail_check = ParamsValidationError("no", param="$.engine_params.trust_remote_code")
    with pytest.raises(ParamsValidationError) as caught:
        ReasoningAdapter(inner, R1).check("deepseek-ai/DeepSeek-R1", SglangParams())
    assert caught.value.param == "$.engine_params.trust_remote_code"


async def test_capabilities_stats_and_unload_pass_through() -> None:
    """Capabilities are the inner's plus reasoning, less constraints; stats and unload pass."""
    inner = FakeEngineAdapter()
    adapter = await _loaded(inner)
    caps = adapter.capabilities
    assert caps.reasoning is True
    assert (caps.sampling, caps.max_n, caps.max_context) == (SAMPLING, 4, 4096)
    assert caps.features == {"logit_bias"}  # a constraint would bind the thinking too
    assert adapter.stats().running == 3
    await adapter.unload()
    assert inner.unloads == 1


def test_template_variables_stay_only_where_the_prompt_is_not_read() -> None:
    """`chat_template_kwargs` (enable_thinking) stays for `think`; deepseek_r1 renders without."""
    inner = BareEngineAdapter(features=frozenset({"chat_template_kwargs", "logit_bias"}))
    assert "chat_template_kwargs" in ReasoningAdapter(inner, THINK).capabilities.features
    assert "chat_template_kwargs" not in ReasoningAdapter(inner, R1).capabilities.features


def test_the_fake_is_a_prompt_source() -> None:
    """The fake offers the prompt protocol; the bare one does not (both paths get tested)."""
    assert isinstance(FakeEngineAdapter(), ChatPromptSource)
    assert not isinstance(BareEngineAdapter(), ChatPromptSource)


# --- the split ---------------------------------------------------------------------------------


async def test_think_block_becomes_reasoning_with_counts_kept() -> None:
    """Tags cut across deltas are removed; thinking is reasoning; tokens and finish are kept."""
    script = _deltas("<th", "ink>", "Let me", " think", "</thi", "nk>\n\n", "Paris", "")
    for parser in PARSERS.values():
        adapter = await _loaded(FakeEngineAdapter(script), parser)
        deltas = await _run(adapter)
        assert _joined(deltas) == ("Let me think", "\n\nParis")
        assert sum(d.token_count for d in deltas) == len(script)
        assert deltas[0].prompt_tokens == 7  # carried over from the swallowed tag deltas
        assert deltas[-1].finish_reason == "stop"
        assert all(d.text or d.reasoning for d in deltas[:-1])


async def test_template_opened_block_is_detected_per_request() -> None:
    """deepseek_r1: a prompt that ends by opening the block means the output starts inside it."""
    inner = FakeEngineAdapter(
        _deltas("plan ", "more</think>", "answer"), generation_prompt="<｜Assistant｜><think>\n"
    )
    adapter = await _loaded(inner)
    assert _joined(await _run(adapter)) == ("plan more", "answer")


async def test_think_does_not_read_the_prompt() -> None:
    """`think`: the block counts only when the output opens it, whatever the template did."""
    inner = FakeEngineAdapter(
        _deltas("plan</think>", "answer"), generation_prompt="<｜Assistant｜><think>\n"
    )
    adapter = await _loaded(inner, THINK)
    assert _joined(await _run(adapter)) == ("", "plan</think>answer")


async def test_a_known_prompt_without_the_tag_gives_untagged_text_as_content() -> None:
    """deepseek_r1 over a prompt that did not open the block: untagged output is all content."""
    adapter = await _loaded(FakeEngineAdapter(_deltas("The capital", " is Paris.")))
    deltas = await _run(adapter)
    assert _joined(deltas) == ("", "The capital is Paris.")
    assert [d.text for d in deltas] == ["The capital", " is Paris."]


@pytest.mark.parametrize(
    ("parser", "script", "expected"),
    [
        # vLLM's deepseek_r1: reasoning from the first token; a leading <think> is dropped
        (R1, ("The capital", " is</think> Paris."), ("The capital is", " Paris.")),
        (R1, ("\n<thi", "nk>x</think>", "y"), ("x", "y")),
        (R1, ("no tags at all",), ("no tags at all", "")),
        (THINK, ("no tags at all",), ("", "no tags at all")),
    ],
)
async def test_an_unknown_prompt_takes_vllms_r1_assumption(
    parser: ReasoningParser, script: tuple[str, ...], expected: tuple[str, str]
) -> None:
    """Where the inner adapter cannot show its prompt, deepseek_r1 assumes it opened the block."""
    adapter = await _loaded(BareEngineAdapter(_deltas(*script)), parser)
    assert _joined(await _run(adapter)) == expected


async def test_unterminated_block_is_all_reasoning() -> None:
    """A stream that ends inside `<think>` (max_tokens) gives everything to reasoning."""
    adapter = await _loaded(
        FakeEngineAdapter(_deltas("<think>", "still going </thi", finish="length"))
    )
    deltas = await _run(adapter)
    assert _joined(deltas) == ("still going </thi", "")
    assert deltas[-1].finish_reason == "length"


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


async def test_held_deltas_keep_logprobs_token_ids_and_timestamps() -> None:
    """What a swallowed tag delta carried (logprobs, ids, engine times) rides on the next delta."""
    tag = TokenLogprob("<think>", -0.1)
    word = TokenLogprob("hm", -0.2)
    script = [
        TokenDelta(
            "<think>", 1, 0, None, 5, logprobs=(tag,), engine_first_token_at=1.5, token_ids=(9,)
        ),
        TokenDelta("hm", 1, 0, None, None, logprobs=(word,), token_ids=(4,)),
        TokenDelta("", 1, 0, "stop", 5, token_ids=(2,)),
    ]
    adapter = await _loaded(FakeEngineAdapter(script))
    deltas = await _run(adapter)
    assert deltas[0].reasoning == "hm"
    assert deltas[0].logprobs == (tag, word)
    assert deltas[0].token_ids == (9, 4)
    assert (deltas[0].token_count, deltas[0].engine_first_token_at) == (2, 1.5)


async def test_raw_prompts_pass_through_unsplit() -> None:
    """`/v1/completions` text is not split (vLLM's completions parse no reasoning either)."""
    script = _deltas("<think>a</think>", "b")
    adapter = await _loaded(FakeEngineAdapter(script))
    req = attrs.evolve(_request(), messages=(), prompt="<think>")
    assert await _run(adapter, req) == script


async def test_sampling_is_left_to_the_preset() -> None:
    """The parser changes no sampling: defaults come from the preset, applied by the service."""
    inner = FakeEngineAdapter(_deltas("a"))
    adapter = await _loaded(inner)
    await _run(adapter, _request(temperature=0.0))
    (only,) = inner.requests
    assert (only.sampling.temperature, only.sampling.top_p) == (0.0, None)


async def test_closing_the_stream_closes_the_inner_stream() -> None:
    """A client going away closes the inner engine's stream (which aborts its request)."""
    inner = FakeEngineAdapter(_deltas("<think>a", "b", "c</think>", "d"))
    adapter = await _loaded(inner)
    stream = adapter.generate(_request())
    assert (await anext(stream)).reasoning == "a"
    await stream.aclose()
    assert inner.closed == 1


async def test_a_prompt_that_fails_to_render_falls_back_to_the_assumption() -> None:
    """A template the parser cannot render leaves the refusal to the engine, and R1's rule holds."""

    class Refusing(FakeEngineAdapter):
        def render_prompt(self, messages: Sequence[Message]) -> str:
            raise EngineError("template refused")

    adapter = await _loaded(Refusing(_deltas("hm</think>", "ok")))
    assert _joined(await _run(adapter)) == ("hm", "ok")
