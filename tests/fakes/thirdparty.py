"""A minimal third-party adapter, written against the public surface (`adapters.__all__`) only.

What an outside author would write for a blocking engine: a params class, `BaseAdapter[P]`, the
kit's `ThreadBridge` for the decoding thread, `fit_max_tokens` for the context rule,
`StopMatcher` for stop strings and `clean_error_text` for engine text. Its "engine" counts words
(`word0 word1 ...`), one per `step_s`, so the contract suite can watch it stop. mypy checks it
against the contract like any in-tree adapter (tests/unit/test_adapter_surface.py).

Must never: import anything from `adapters` but the package's public names.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from attrs import field, frozen
from attrs.validators import ge, le

from adapters import (
    AdapterContext,
    BaseAdapter,
    Capabilities,
    Emit,
    EngineError,
    EngineStats,
    GenerationRequest,
    Job,
    LoadInfo,
    ServiceUnavailableError,
    StopMatcher,
    ThreadBridge,
    TokenDelta,
    clean_error_text,
    fit_max_tokens,
)

__all__ = ["CountingAdapter", "CountingParams"]


@frozen
class CountingParams:
    """Engine params of the counting engine."""

    max_model_len: int = field(default=64, validator=[ge(8), le(4096)])
    """Prompt + completion words the engine takes."""
    step_s: float = field(default=0.0, validator=[ge(0), le(1)])
    """Seconds per word (lets a test see generation stop)."""
    fail_with: str | None = None
    """Make every generation fail with this engine text (the error-cleaning check)."""


Item = tuple[str, int] | TokenDelta


class CountingAdapter(BaseAdapter[CountingParams]):
    """Streams `word0 word1 ...` from a blocking loop in the kit's thread bridge."""

    params_type = CountingParams

    def __init__(self, context: AdapterContext) -> None:
        super().__init__(context)
        self._params: CountingParams | None = None
        self._bridge: ThreadBridge[Item] | None = None
        self.words_made = 0
        """Words produced by every generation so far (tests prove a cancel stops the engine)."""

    @property
    def capabilities(self) -> Capabilities:
        """Stop strings only; the context once loaded."""
        params = self._params
        return Capabilities(
            sampling=frozenset({"stop"}),
            max_context=params.max_model_len if params is not None else None,
        )

    def check(self, model: str, params: CountingParams) -> None:
        """Any model name: the engine has no weights."""

    async def load(self, model: str, params: CountingParams) -> LoadInfo:
        """Start the bridge; a second load without unload is refused."""
        if self._bridge is not None:
            raise EngineError("a model is loaded; unload first")
        self._params = params
        self._bridge = ThreadBridge(1, name="iw-counting")
        return LoadInfo(max_context=params.max_model_len)

    def stats(self) -> EngineStats:
        """Running and waiting generations."""
        bridge = self._bridge
        if bridge is None:
            return EngineStats()
        return EngineStats(running=bridge.running, waiting=bridge.waiting)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Words until `max_tokens` or a stop string; stops within a word on `aclose()`."""
        bridge, params = self._bridge, self._params
        if bridge is None or params is None or bridge.closed:
            raise ServiceUnavailableError("no model is loaded")
        prompt = sum(len(m.content.split()) + 1 for m in req.messages)
        max_tokens = fit_max_tokens(prompt, req.sampling, params.max_model_len)
        stops = StopMatcher(req.sampling.stop)

        def work(job: Job, emit: Emit[Item]) -> None:
            if params.fail_with is not None:
                raise RuntimeError(params.fail_with)
            for i in range(max_tokens):
                if job.cancelled:
                    emit(TokenDelta("", 0, finish_reason="abort", prompt_tokens=prompt))
                    return
                time.sleep(params.step_s)
                self.words_made += 1
                emit((f"word{i} ", 1))
            emit(TokenDelta("", 0, finish_reason="length", prompt_tokens=prompt))

        try:
            async for item in bridge.stream(work):
                if isinstance(item, TokenDelta):
                    yield TokenDelta(stops.flush(), 0, finish_reason=item.finish_reason)
                    return
                text = stops.feed(item[0])
                if stops.stopped:
                    yield TokenDelta(text, 1, finish_reason="stop", prompt_tokens=prompt)
                    return
                yield TokenDelta(text, 1, prompt_tokens=prompt)
        except RuntimeError as exc:
            raise EngineError(clean_error_text(str(exc), self.context.mask)) from None

    async def unload(self) -> None:
        """Stop every generation and join its thread; idempotent."""
        bridge, self._bridge = self._bridge, None
        self._params = None
        if bridge is not None:
            await bridge.aclose()
