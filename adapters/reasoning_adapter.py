"""The reasoning post-processor: any loaded adapter's output split into reasoning and content.

`ReasoningAdapter` wraps an adapter instance the registry has already built (vLLM, SGLang,
transformers, echo, an outside adapter) and delegates everything to it, except that each chat
choice's text goes through a `adapters.reasoning.ReasoningSplitter` chosen by name
(`reasoning_parser` in adapters.yaml, a preset or the load request): the thinking leaves as
`TokenDelta.reasoning` (the service sends it as `reasoning_content`), the rest as text, and the
capabilities say `reasoning: True`. vLLM's model: `--reasoning-parser deepseek_r1`, a
post-processor chosen by name, not a backend of its own.

- A parser that `reads_prompt` (deepseek_r1) asks the inner adapter for the rendered prompt once
  per request when it can show it (`ChatPromptSource`: vLLM, SGLang), to tell a template that
  opened `<think>` itself.
- Raw prompts (`/v1/completions`) pass through unsplit, as vLLM's completions do.
- Of the inner adapter's features only those that leave the split alone stay (`_KEEPS_SPLIT`):
  a decoding constraint would bind the thinking too, and the template switches move where the
  answer starts.
- Deltas that produce no visible text (a tag, or the start of one) are held and their token
  counts, logprobs, token ids and engine times ride on the next delta, so usage and timings
  stay whole.

Must never: drop or reorder generated text (apart from the tags); hold back more than a possible
tag; leave the inner stream open when the consumer goes away; import an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import attrs

from adapters.base import Adapter, Capabilities, EngineStats, LoadInfo, MemoryEstimate, P
from adapters.kit.tokens import TokenOps
from adapters.reasoning import ReasoningParser, ReasoningSplitter, Start
from adapters.tool_parsing import ToolCallParser
from schemas.generation import GenerationRequest, Message, TokenDelta, TokenLogprob

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["ChatPromptSource", "ReasoningAdapter"]

#: catalogued features (schemas/features.py) that leave the split alone; an allowlist: a new
#: feature stays off under a reasoning parser until someone has thought about it
_KEEPS_SPLIT = frozenset(
    {
        "/v1/completions",  # raw prompts pass through unsplit
        "/tokenize",
        "/detokenize",
        "tools",  # the template sees the tools; no constraint, no parsing of the answer
        "logit_bias",
        "prompt_logprobs",
        "return_token_ids",
        "echo",  # the service sends the echoed message ahead of the generated text
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "stream_options.continuous_usage_stats",
        "image_url",
    }
)
#: kept too where the parser does not read the prompt: template variables (`enable_thinking`)
#: change whether the model thinks, which the split then sees in the output itself
_KEEPS_SPLIT_WITHOUT_PROMPT = _KEEPS_SPLIT | {"chat_template_kwargs"}


@runtime_checkable
class ChatPromptSource(Protocol):
    """What an inner adapter may offer so that a parser can read the rendered prompt."""

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the template makes of `messages`, generation prompt included."""
        ...


def _first(a: T | None, b: T | None) -> T | None:
    return a if a is not None else b


def _joined(a: tuple[T, ...] | None, b: tuple[T, ...] | None) -> tuple[T, ...] | None:
    if a is None:
        return b
    return (*a, *(b or ()))


class _Pending:
    """What deltas that produced no visible text carried, kept for the next emitted delta."""

    __slots__ = (
        "first_token_at",
        "logprobs",
        "prompt_logprobs",
        "prompt_token_ids",
        "prompt_tokens",
        "queued_at",
        "scheduled_at",
        "token_ids",
        "tokens",
    )

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.prompt_tokens: int | None = None
        self.logprobs: tuple[TokenLogprob, ...] | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prompt_token_ids: tuple[int, ...] | None = None
        self.prompt_logprobs: Any = None
        self.queued_at: float | None = None
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None

    def hold(self, delta: TokenDelta) -> None:
        self.tokens += delta.token_count
        self.prompt_tokens = _first(self.prompt_tokens, delta.prompt_tokens)
        self.logprobs = _joined(self.logprobs, delta.logprobs)
        self.token_ids = _joined(self.token_ids, delta.token_ids)
        self.prompt_token_ids = _first(self.prompt_token_ids, delta.prompt_token_ids)
        self.prompt_logprobs = _first(self.prompt_logprobs, delta.prompt_logprobs)
        self.queued_at = _first(self.queued_at, delta.engine_queued_at)
        self.scheduled_at = _first(self.scheduled_at, delta.engine_scheduled_at)
        self.first_token_at = _first(self.first_token_at, delta.engine_first_token_at)

    def merge(self, delta: TokenDelta, text: str, reasoning: str) -> TokenDelta:
        """`delta` with `text`/`reasoning` and everything held folded in; then forget it."""
        merged = attrs.evolve(
            delta,
            text=text,
            reasoning=reasoning,
            token_count=self.tokens + delta.token_count,
            prompt_tokens=_first(delta.prompt_tokens, self.prompt_tokens),
            logprobs=_joined(self.logprobs, delta.logprobs),
            token_ids=_joined(self.token_ids, delta.token_ids),
            prompt_token_ids=_first(self.prompt_token_ids, delta.prompt_token_ids),
            prompt_logprobs=_first(self.prompt_logprobs, delta.prompt_logprobs),
            engine_queued_at=_first(self.queued_at, delta.engine_queued_at),
            engine_scheduled_at=_first(self.scheduled_at, delta.engine_scheduled_at),
            engine_first_token_at=_first(self.first_token_at, delta.engine_first_token_at),
        )
        self._reset()
        return merged


class ReasoningAdapter(Generic[P]):
    """An adapter instance with a reasoning parser on its output; see the module docstring."""

    def __init__(self, inner: Adapter[P], parser: ReasoningParser) -> None:
        self.inner = inner
        """The wrapped adapter (tests and diagnostics reach engine specifics through it)."""
        self.parser = parser
        self.params_type: type[P] = inner.params_type
        self.context = inner.context
        self._prompts: ChatPromptSource | None = None
        self._keep = _KEEPS_SPLIT if parser.reads_prompt else _KEEPS_SPLIT_WITHOUT_PROMPT
        self._caps: tuple[Capabilities, Capabilities] | None = None

    @property
    def capabilities(self) -> Capabilities:
        """The inner adapter's, with reasoning deltas, less what would upset the split."""
        base = self.inner.capabilities
        cached = self._caps
        # read twice per request: built once per inner capabilities object, not per call
        if cached is None or cached[0] is not base:
            caps = attrs.evolve(base, reasoning=True, features=base.features & self._keep)
            cached = self._caps = (base, caps)
        return cached[1]

    def check(self, model: str, params: P) -> None:
        """The inner adapter's dry run."""
        self.inner.check(model, params)

    def estimate_memory(self, model: str, params: P) -> MemoryEstimate | None:
        """The inner adapter's estimate (the parser needs no memory of its own)."""
        return self.inner.estimate_memory(model, params)

    async def load(self, model: str, params: P) -> LoadInfo:
        """Load the inner engine; status shows the parser in the load's details."""
        info = await self.inner.load(model, params)
        inner = self.inner
        if self.parser.reads_prompt and isinstance(inner, ChatPromptSource):
            self._prompts = inner
        details = {
            **info.details,
            "reasoning_parser": self.parser.name,
            "reasoning_reads_prompt": self._prompts is not None,
        }
        return attrs.evolve(info, details=details)

    async def unload(self) -> None:
        """Unload the inner engine (idempotent as the inner adapter is)."""
        self._prompts = None
        await self.inner.unload()

    def stats(self) -> EngineStats:
        """The inner engine's figures."""
        return self.inner.stats()

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        """The inner adapter's count."""
        return self.inner.count_prompt_tokens(messages)

    def token_ops(self) -> TokenOps | None:
        """The inner adapter's tokenizer operations."""
        return self.inner.token_ops()

    def tool_parser(self) -> ToolCallParser | None:
        """The inner adapter's tool-call parser (the service parses the content only)."""
        getter = getattr(self.inner, "tool_parser", None)
        parser = getter() if callable(getter) else None
        return parser if isinstance(parser, ToolCallParser) else None

    async def _start(self, req: GenerationRequest) -> Start:
        """Where this request's output starts, from its rendered prompt where the parser asks."""
        source = self._prompts
        prompt = None
        if source is not None:
            try:
                # a template renders in milliseconds: off the event loop, once per request
                prompt = await asyncio.to_thread(source.render_prompt, req.messages)
            except Exception:  # the inner generate reports a refused template itself
                logger.debug("rendering the prompt for the reasoning parser failed")
        return self.parser.starts(prompt)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Run the inner stream; split each choice's text into reasoning and content."""
        stream: AsyncIterator[TokenDelta] = self.inner.generate(req)
        try:
            if req.prompt is not None:
                async for delta in stream:
                    yield delta
                return
            start = await self._start(req)
            splitters: dict[int, ReasoningSplitter] = {}
            pending: dict[int, _Pending] = {}
            async for delta in stream:
                index = delta.index
                splitter = splitters.get(index)
                if splitter is None:
                    splitter = splitters[index] = ReasoningSplitter(start=start)
                    pending[index] = _Pending()
                held = pending[index]
                reasoning, content = splitter.feed(delta.text)
                if delta.reasoning:  # an inner adapter that splits already keeps its part
                    reasoning = delta.reasoning + reasoning
                if delta.finish_reason is not None:
                    tail_reasoning, tail_content = splitter.flush()
                    reasoning, content = reasoning + tail_reasoning, content + tail_content
                elif not reasoning and not content:
                    held.hold(delta)  # a tag, or the start of one: its tokens count with the next
                    continue
                yield held.merge(delta, content, reasoning)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
