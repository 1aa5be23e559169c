r"""The DeepSeek adapter: DeepSeek-family models on vLLM (default) or SGLang, served DeepSeek-style.

It wraps an inner engine adapter (`adapters.vllm:VllmAdapter` or `adapters.sglang:SglangAdapter`)
and adds what DeepSeek's own API gives its users:

- Reasoning models write `<think>…</think>` before the answer; the thinking goes out as
  `TokenDelta.reasoning` (the service turns it into `reasoning_content`), the rest as content,
  split by `adapters.reasoning.ReasoningSplitter` per choice. `reasoning: auto` splits when the
  model's chat template mentions `<think>` (and always when the inner adapter cannot show its
  template: a text without tags is all content either way).
- Templates that open the block in the prompt (DeepSeek-R1-0528 and the updated R1 template end
  it with `<think>\n`) make the output start inside reasoning; `starts_in_reasoning: null` detects
  that per request from the rendered prompt, `true`/`false` force it.
- The family's recommended sampling, applied where a request leaves it unset: temperature 0.6 and
  top_p 0.95, from the DeepSeek-R1 model card ("Usage Recommendations": temperature 0.5-0.7, 0.6
  recommended; evaluations with top-p 0.95), the values of R1's `generation_config.json` too.
- The model's own chat template: the inner adapter renders it (vLLM's renderer or sglang's
  tokenizer), nothing is rewritten here.

The inner engine's params travel in `engine_params.engine_params` and are validated as that
engine's params, with errors at `$.engine_params.engine_params.<field>`.

Must never: import an engine or the inner adapter's engine at module level; import a module named
by a request (only the two fixed paths in `_INNER`); drop or reorder generated text; hold back more
than a possible tag.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import attrs
from attrs import field, frozen

from adapters.base import BaseAdapter, Capabilities, EngineStats, LoadInfo
from adapters.kit import ParamPolicy
from adapters.reasoning import OPEN_TAG, ReasoningSplitter
from schemas.converter import StructureError, structure
from schemas.errors import EngineError, ParamsValidationError
from schemas.generation import GenerationRequest, Message, TokenDelta, TokenLogprob
from schemas.validators import FieldValueError, in_range

if TYPE_CHECKING:
    from adapters.base import AdapterContext

__all__ = ["ChatPromptSource", "DeepseekAdapter", "DeepseekParams", "inner_adapter_class"]

Engine = Literal["vllm", "sglang"]
T = TypeVar("T")

#: engine name → adapter class path; fixed here, never taken from a request
_INNER: dict[str, tuple[str, str]] = {
    "vllm": ("adapters.vllm", "VllmAdapter"),
    "sglang": ("adapters.sglang", "SglangAdapter"),
}
_NESTED = "engine_params"


def inner_adapter_class(engine: str) -> type[Any]:
    """The adapter class serving `engine` (imports the adapter module, never the engine)."""
    module_name, class_name = _INNER[engine]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise EngineError(f"the {engine} adapter is not available in this build") from None
    cls: type[Any] = getattr(module, class_name)
    return cls


#: feature names (schemas/features.py) that constrain decoding from the first token
_CONSTRAINED = ("response_format.", "structured_outputs.", "tool", "parallel_tool_calls")


@runtime_checkable
class ChatPromptSource(Protocol):
    """What an inner adapter may offer so that reasoning detection can read the chat template."""

    @property
    def chat_template(self) -> str | None:
        """The loaded model's chat template."""
        ...

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the template makes of `messages`, generation prompt included."""
        ...


def _inner_params(instance: Any, attribute: Any, value: dict[str, Any]) -> None:
    """Validate `engine_params` as the chosen engine's params, errors under its own path."""
    # attrs runs validators after every field is set, so `engine` is already there
    try:
        params_type = inner_adapter_class(instance.engine).params_type
    except EngineError as exc:
        raise FieldValueError("engine", exc.message) from None
    try:
        structure(value, params_type, path="")
    except StructureError as exc:
        first = exc.errors[0]
        where = attribute.name if first.path in ("", "$") else f"{attribute.name}.{first.path}"
        raise FieldValueError(where, first.message) from None


@frozen
class DeepseekParams:
    """Engine params of the DeepSeek backend."""

    engine: Engine = "vllm"
    """Engine that serves the model: `vllm` (default) or `sglang` (CUDA only)."""
    reasoning: Literal["auto", "on", "off"] = "auto"
    """Split `<think>…</think>` into `reasoning_content`: `auto` when the chat template mentions
    `<think>`, `on` always, `off` never (the tags stay in the content)."""
    starts_in_reasoning: bool | None = None
    """Whether output starts inside `<think>` (the template opened it in the prompt, as
    DeepSeek-R1-0528's does); unset detects it per request from the rendered prompt."""
    default_temperature: float | None = field(default=0.6, validator=in_range(0, 2))
    """Temperature when a request sets none (DeepSeek-R1 card: 0.5-0.7, 0.6 recommended);
    null leaves it to the engine."""
    default_top_p: float | None = field(default=0.95, validator=in_range(0.01, 1))
    """top_p when a request sets none (DeepSeek-R1 card: 0.95); null leaves it to the engine."""
    engine_params: dict[str, Any] = field(factory=dict, validator=_inner_params)
    """Params of the chosen engine's adapter (see the `vllm` or `sglang` backend's schema)."""


def _reparam(exc: ParamsValidationError) -> ParamsValidationError:
    """Move an inner `$.engine_params.x` under ours: `$.engine_params.engine_params.x`."""
    param = exc.param
    prefix = "$.engine_params."
    if param is not None and param.startswith(prefix):
        param = f"{prefix}{_NESTED}.{param.removeprefix(prefix)}"
    return ParamsValidationError(exc.message, param=param, code=exc.code)


def _first(a: T | None, b: T | None) -> T | None:
    return a if a is not None else b


class _Pending:
    """What deltas that produced no visible text carried, kept for the next emitted delta."""

    __slots__ = (
        "first_token_at",
        "logprobs",
        "prompt_tokens",
        "queued_at",
        "scheduled_at",
        "tokens",
    )

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.prompt_tokens: int | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.queued_at: float | None = None
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None

    def hold(self, delta: TokenDelta) -> None:
        self.tokens += delta.token_count
        self.prompt_tokens = _first(self.prompt_tokens, delta.prompt_tokens)
        if delta.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *delta.logprobs]
        self.queued_at = _first(self.queued_at, delta.engine_queued_at)
        self.scheduled_at = _first(self.scheduled_at, delta.engine_scheduled_at)
        self.first_token_at = _first(self.first_token_at, delta.engine_first_token_at)

    def merge(self, delta: TokenDelta, text: str, reasoning: str) -> TokenDelta:
        """`delta` with `text`/`reasoning` and everything held folded in; then forget it."""
        logprobs = delta.logprobs
        if self.logprobs is not None:
            logprobs = (*self.logprobs, *(delta.logprobs or ()))
        merged = attrs.evolve(
            delta,
            text=text,
            reasoning=reasoning,
            token_count=self.tokens + delta.token_count,
            prompt_tokens=_first(delta.prompt_tokens, self.prompt_tokens),
            logprobs=logprobs,
            engine_queued_at=_first(self.queued_at, delta.engine_queued_at),
            engine_scheduled_at=_first(self.scheduled_at, delta.engine_scheduled_at),
            engine_first_token_at=_first(self.first_token_at, delta.engine_first_token_at),
        )
        self._reset()
        return merged


class DeepseekAdapter(BaseAdapter[DeepseekParams]):
    """DeepSeek models behind an inner vLLM or SGLang adapter; see the module docstring."""

    params_type = DeepseekParams
    #: of what its inner engines honour, what leaves the <think> split alone (the template
    #: switches change where the answer starts); a unit test keeps it within theirs
    declared_features: ClassVar[frozenset[str]] = frozenset({"logit_bias"})

    def __init__(self, context: AdapterContext, *, inner: Any | None = None) -> None:
        super().__init__(context)
        self._given_inner = inner  # tests hand in a fake engine adapter; the registry does not
        self._inner: Any = None
        self._params: DeepseekParams | None = None
        self._split = False

    @property
    def capabilities(self) -> Capabilities:
        """The inner adapter's, plus reasoning deltas."""
        base = self._inner.capabilities if self._inner is not None else Capabilities()
        # of the inner engine's features only those that leave the <think> split alone: raw
        # prompts (completions, tokenize) skip the template the split reads, a constraint would
        # bind the <think> part too, and the template switches move where the answer starts
        return attrs.evolve(base, reasoning=True, features=base.features & self.declared_features)

    @classmethod
    def check_extra_allow(cls, entries: Sequence[str]) -> None:
        """`extra_allow` applies to the inner engine's `extra`: each entry must fit one engine."""
        for entry in entries:
            problems = []
            for engine in _INNER:
                policy = getattr(inner_adapter_class(engine), "extra_policy", None)
                try:
                    if policy is not None:
                        policy.check_allow_entry(entry)
                        break
                except ValueError as exc:
                    problems.append(str(exc))
            else:
                raise ValueError("; ".join(problems) or f"no inner engine allows {entry!r}")

    def _make_inner(self, engine: str) -> Any:
        if self._given_inner is not None:
            return self._given_inner
        return inner_adapter_class(engine)(self.context)

    def _inner_params(self, params: DeepseekParams) -> Any:
        params_type = inner_adapter_class(params.engine).params_type
        try:
            return structure(params.engine_params, params_type, path=f"$.engine_params.{_NESTED}")
        except StructureError as exc:
            first = exc.first
            raise ParamsValidationError(first.render(), param=first.param or "$") from None

    def check(self, model: str, params: DeepseekParams) -> None:
        """The inner engine's `extra` allowlist and the inner adapter's checks, under our path."""
        inner_params = self._inner_params(params)
        # the inner engine's allowlist, applied here too: it holds whichever inner adapter runs
        policy: ParamPolicy | None = getattr(
            inner_adapter_class(params.engine), "extra_policy", None
        )
        extra = getattr(inner_params, "extra", None)
        if policy is not None and extra is not None:
            policy.check(
                extra,
                allow=self.context.extra_allow,
                path=f"$.engine_params.{_NESTED}.extra",
            )
        try:
            self._make_inner(params.engine).check(model, inner_params)
        except ParamsValidationError as exc:
            raise _reparam(exc) from None

    async def load(self, model: str, params: DeepseekParams) -> LoadInfo:
        """Load the inner engine; decide whether to split reasoning from its chat template."""
        inner_params = self._inner_params(params)
        inner = self._make_inner(params.engine)
        self._inner, self._params = inner, params
        try:
            info: LoadInfo = await inner.load(model, inner_params)
        except ParamsValidationError as exc:
            raise _reparam(exc) from None
        template = inner.chat_template if isinstance(inner, ChatPromptSource) else None
        if params.reasoning == "auto":
            self._split = template is None or OPEN_TAG in template
        else:
            self._split = params.reasoning == "on"
        details = {
            **info.details,
            "family": "deepseek",
            "engine": params.engine,
            "reasoning_split": self._split,
            "template_known": template is not None,
        }
        return attrs.evolve(info, details=details)

    async def unload(self) -> None:
        """Unload the inner engine. Idempotent."""
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.unload()

    def stats(self) -> EngineStats:
        """The inner engine's figures."""
        inner = self._inner
        return inner.stats() if inner is not None else EngineStats()

    def _with_defaults(
        self, params: DeepseekParams, req: GenerationRequest, caps: Capabilities
    ) -> GenerationRequest:
        """Apply the family's recommended temperature/top_p where the request set none."""
        changes: dict[str, Any] = {}
        sampling = req.sampling
        if sampling.temperature is None and "temperature" in caps.sampling:
            changes["temperature"] = params.default_temperature
        if sampling.top_p is None and "top_p" in caps.sampling:
            changes["top_p"] = params.default_top_p
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return req
        return attrs.evolve(req, sampling=attrs.evolve(sampling, **changes))

    def _opens_in_reasoning(self, params: DeepseekParams, req: GenerationRequest) -> bool:
        if params.starts_in_reasoning is not None:
            return params.starts_in_reasoning
        if not isinstance(self._inner, ChatPromptSource):
            return False
        # R1-0528 style: the generation prompt ends with "<think>\n" (V3.1 thinking: "<think>")
        return self._inner.render_prompt(req.messages).rstrip().endswith(OPEN_TAG)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Run the inner stream; split each choice's text into reasoning and content."""
        inner, params = self._inner, self._params
        if inner is None or params is None:
            raise EngineError("no deepseek model is loaded")
        req = self._with_defaults(params, req, inner.capabilities)
        stream: AsyncIterator[TokenDelta] = inner.generate(req)
        try:
            if not self._split:
                async for delta in stream:
                    yield delta
                return
            async for delta in self._split_stream(stream, self._opens_in_reasoning(params, req)):
                yield delta
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    @staticmethod
    async def _split_stream(
        stream: AsyncIterator[TokenDelta], opened: bool
    ) -> AsyncGenerator[TokenDelta, None]:
        splitters: dict[int, ReasoningSplitter] = {}
        pending: dict[int, _Pending] = {}
        async for delta in stream:
            splitter = splitters.setdefault(
                delta.index, ReasoningSplitter(starts_in_reasoning=opened)
            )
            held = pending.setdefault(delta.index, _Pending())
            reasoning, content = splitter.feed(delta.text)
            if delta.finish_reason is not None:
                tail_reasoning, tail_content = splitter.flush()
                reasoning, content = reasoning + tail_reasoning, content + tail_content
            elif not reasoning and not content:
                held.hold(delta)  # a tag, or the start of one: its tokens count with what follows
                continue
            yield held.merge(delta, content, reasoning)
