"""The echo adapter: a deterministic dev and test backend, no model, no engine.

It streams the last user message back token by token (a token is a run of non-space characters
with its leading whitespace; a `/v1/completions` prompt is echoed whole, and token ids as their
decimal spelling, " 1 2 3"), so every path of the service can be exercised in milliseconds:
streaming, usage, `max_tokens` (finish `length`), `stop` strings, `ignore_eos` (the message repeats
until `max_tokens`, like a benchmark's fixed output length), cancellation, and the failure paths
(`fail_on_load`, `fail_after_tokens`, a slow load), and, with `spawn_child`, an engine process
of its own that a test can kill to prove the service notices a dead engine. It is documented as
such and never stands in for a real engine.

Must never: pretend to sample: it accepts temperature/top_p/seed and is deterministic regardless.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

from attrs import evolve, field, frozen

from adapters.base import BaseAdapter, Capabilities, LoadInfo, MemoryEstimate
from adapters.kit.context import fit_max_tokens
from adapters.kit.errors import clean_error_text
from adapters.text import StopMatcher
from schemas.errors import ConflictError, EngineError, ServiceUnavailableError
from schemas.generation import GenerationRequest, TokenDelta
from schemas.validators import in_range

_TOKEN = re.compile(r"\s*\S+")


@frozen
class EchoParams:
    """Engine params of the echo backend."""

    token_delay_ms: float = field(default=0.0, validator=in_range(0, 60_000))
    """Sleep before each generated token, to simulate decode speed."""
    first_token_delay_ms: float = field(default=0.0, validator=in_range(0, 60_000))
    """Extra sleep before the first token, to simulate prefill."""
    load_delay_ms: float = field(default=0.0, validator=in_range(0, 600_000))
    """Sleep during load, to exercise the `loading` state."""
    fail_on_load: str | None = None
    """When set, `load()` raises an engine error with this message."""
    fail_after_tokens: int | None = field(default=None, validator=in_range(0))
    """When set, generation raises an engine error after this many tokens."""
    fail_fatal: bool = False
    """Report that failure as the engine dying (code `engine_dead`): the service unloads."""
    max_n: int = field(default=4, validator=in_range(1, 16))
    """Largest `n` accepted (every choice echoes the same text)."""
    max_context: int = field(default=32_768, validator=in_range(16))
    """Context length reported to clients."""
    claims_memory_mib: float | None = field(default=None, validator=in_range(0))
    """Host memory the load claims to need, to exercise the watchdog's admission check."""
    spawn_child: bool = False
    """Start an idle child process and report it as the engine process (`engine_pids`), as vLLM
    and SGLang do; killing it simulates an engine that dies."""


#: the child of `spawn_child`: idles, and leaves by itself once its parent is gone
_CHILD = (
    "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent:\n    time.sleep(0.5)\n"
)


class EchoAdapter(BaseAdapter[EchoParams]):
    """Echoes the last user message; see the module docstring."""

    params_type = EchoParams
    #: the service's own streaming options work over any token stream; completions echo the prompt
    declared_features: ClassVar[frozenset[str]] = frozenset(
        {"stream_options.continuous_usage_stats", "/v1/completions"}
    )

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.params = EchoParams()
        self._closing = asyncio.Event()
        self.active: set[str] = set()
        """Request ids being generated now (tests read it to prove cancellation)."""
        self.finished: list[tuple[str, str]] = []
        """(request id, how it ended) for every generation, in order: complete/cancelled/aborted."""
        self.child: subprocess.Popen[bytes] | None = None
        self._caps: tuple[EchoParams, Capabilities] | None = None
        self._loaded = False

    @property
    def capabilities(self) -> Capabilities:
        """Echo honours stops, lengths and n; sampling params are accepted and have no effect."""
        params = self.params
        cached = self._caps
        # read twice per request: built once per loaded params, not per call
        if cached is None or cached[0] is not params:
            caps = Capabilities(
                sampling=frozenset(
                    {"temperature", "top_p", "seed", "stop", "ignore_eos", "min_tokens", "n"}
                ),
                max_n=params.max_n,
                max_context=params.max_context,
                features=self.declared_features,
            )
            cached = self._caps = (params, caps)
        return cached[1]

    def check(self, model: str, params: EchoParams) -> None:
        """Any model name is fine: echo loads nothing."""

    def estimate_memory(self, model: str, params: EchoParams) -> MemoryEstimate | None:
        """Only what `claims_memory_mib` says (echo itself needs nothing)."""
        if params.claims_memory_mib is None:
            return None
        return MemoryEstimate(host_mib=params.claims_memory_mib, basis="claims_memory_mib param")

    async def load(self, model: str, params: EchoParams) -> LoadInfo:
        """Pretend to load: wait `load_delay_ms`, fail if asked to; refuse a second load."""
        if self._loaded:
            raise ConflictError("a model is loaded; unload it first")
        started = time.perf_counter()
        self.params = params
        self._closing = asyncio.Event()
        if params.load_delay_ms:
            await asyncio.sleep(params.load_delay_ms / 1000)
        if params.fail_on_load is not None:
            raise EngineError(clean_error_text(params.fail_on_load, self.context.mask))
        pids: tuple[int, ...] = ()
        if params.spawn_child:
            # S603: our own interpreter running fixed code; ASYNC220: Popen returns at once,
            # the wait for the child happens in a thread at unload
            self.child = subprocess.Popen(  # noqa: S603, ASYNC220
                [sys.executable, "-c", _CHILD], stdin=subprocess.DEVNULL
            )
            pids = (self.child.pid,)
        self._loaded = True
        return LoadInfo(
            init_s=time.perf_counter() - started,
            max_context=params.max_context,
            details={"model": model},
            engine_pids=pids,
        )

    async def generate(  # noqa: C901, PLR0912, PLR0915  (one flat loop: no relaying generator per token)
        self, req: GenerationRequest
    ) -> AsyncGenerator[TokenDelta, None]:
        """Yield the last user message (or the raw prompt) token by token, for each choice."""
        if not self._loaded:
            raise ServiceUnavailableError("no model is loaded")
        if isinstance(req.prompt, str):
            source = _TOKEN.findall(req.prompt)
            prompt_tokens = len(source)
        elif req.prompt is not None:
            # echo has no vocabulary: a token id echoes as its decimal spelling
            source = [f" {i}" for i in req.prompt]
            prompt_tokens = len(source)
        else:
            user = next((m.content for m in reversed(req.messages) if m.role == "user"), "")
            source = _TOKEN.findall(user)
            prompt_tokens = sum(len(_TOKEN.findall(m.content)) + 1 for m in req.messages)
        # the same context rule as the real engines, over echo's own token count
        sampling = req.sampling
        max_tokens = fit_max_tokens(prompt_tokens, sampling, self.params.max_context)
        if max_tokens != sampling.max_tokens:
            sampling = evolve(sampling, max_tokens=max_tokens)
        request_id = req.request_id
        # one generator, one delta per token, for every choice: what does not change during
        # the stream is read once (this loop runs per token, and the benchmark,
        # bench/overhead.py, must measure the service rather than the fake engine)
        max_tokens, ignore_eos, min_tokens = (
            sampling.max_tokens, sampling.ignore_eos, sampling.min_tokens
        )  # fmt: skip
        params = self.params
        delay = params.token_delay_ms / 1000
        first_delay = params.first_token_delay_ms / 1000
        fail_after = params.fail_after_tokens
        closing = self._closing.is_set
        self.active.add(request_id)
        outcome = "cancelled"
        try:
            for index in range(sampling.n):
                stops = StopMatcher(sampling.stop)
                feed = stops.feed
                words = source
                produced = 0
                while True:
                    if produced >= max_tokens:
                        yield TokenDelta(stops.flush(), 0, index, "length", prompt_tokens)
                        break
                    exhausted = produced >= len(words)
                    if exhausted and not ignore_eos and produced >= min_tokens:
                        yield TokenDelta(stops.flush(), 0, index, "stop", prompt_tokens)
                        break
                    if not words:
                        words = ["."]  # ignore_eos/min_tokens on an empty message: repeat a dot
                    wait = delay + (first_delay if produced == 0 else 0)
                    if wait and await self._closed_within(wait):
                        yield TokenDelta(stops.flush(), 0, index, "abort", prompt_tokens)
                        break
                    if closing():
                        yield TokenDelta("", 0, index, "abort", prompt_tokens)
                        break
                    if fail_after is not None and produced >= fail_after:
                        raise EngineError(
                            f"echo: failing after {produced} tokens as configured",
                            code="engine_dead" if params.fail_fatal else None,
                        )
                    token = words[produced % len(words)]
                    produced += 1
                    text = feed(token)
                    if stops.stopped:
                        # vLLM's stop_reason: the stop string that ended it
                        yield TokenDelta(
                            text, 1, index, "stop", prompt_tokens, stop_reason=stops.matched
                        )
                        break
                    yield TokenDelta(text, 1, index, None, prompt_tokens if produced == 1 else None)
            outcome = "aborted" if closing() else "complete"
        finally:
            self.active.discard(request_id)
            self.finished.append((request_id, outcome))

    async def _closed_within(self, seconds: float) -> bool:
        """Sleep `seconds` unless unload starts first; True when it did."""
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def unload(self) -> None:
        """End in-flight generations (they finish with `abort`); stop and reap the child."""
        self._closing.set()
        self._loaded = False
        child, self.child = self.child, None
        if child is not None:
            child.kill()
            await asyncio.to_thread(child.wait, 10)
