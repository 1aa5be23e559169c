"""Test hooks for the contract's rules (ordering, refusals, failures, budgets, after_response).

Named in test registries as `fakes.hooks:<Class>`, exactly as an operator names a hook module.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import attrs
from attrs import frozen

from hooks.base import ChunkKind, Exchange, Hook, HookCall
from schemas.errors import (
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    PermissionDeniedError,
    RateLimitError,
    WrapperError,
)
from schemas.generation import GenerationRequest


@frozen
class AppendParams:
    """What to append."""

    suffix: str
    """Appended to the last message's content."""


class AppendHook(Hook):
    """Appends `suffix` to the last message (the echo backend then shows the order of hooks)."""

    params_type: ClassVar[type[Any]] = AppendParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """The last message with the suffix."""
        *head, last = request.messages
        last = attrs.evolve(last, content=last.content + self.params.suffix)
        return attrs.evolve(request, messages=(*head, last))


_REFUSALS: dict[int, type[WrapperError]] = {
    400: InvalidRequestError,
    403: PermissionDeniedError,
    422: ParamsValidationError,
    429: RateLimitError,
    500: EngineError,
}


@frozen
class RefuseParams:
    """How to refuse."""

    status: int = 403
    code: str = "policy"
    when: str = "refuse-me"
    """Refuse only requests whose last message contains this."""


class RefuseHook(Hook):
    """Refuses marked requests with the configured status and code."""

    params_type: ClassVar[type[Any]] = RefuseParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Raise the configured error for marked requests."""
        p = self.params
        if p.when in request.messages[-1].content:
            raise _REFUSALS[p.status](f"refused by policy ({p.code})", code=p.code)
        return None


@frozen
class FailParams:
    """Where and when to fail."""

    point: str = "before_request"
    when: str = "fail-me"


SECRET_TEXT = "internal-detail-that-must-not-leak"


class FailHook(Hook):
    """Raises a RuntimeError carrying private text, in the configured point, for marked requests."""

    params_type: ClassVar[type[Any]] = FailParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Remember whether this request is marked; fail here if configured."""
        marked = self.params.when in request.messages[-1].content
        call.state(self, lambda: {"marked": marked})
        if marked and self.params.point == "before_request":
            raise RuntimeError(SECRET_TEXT)
        return None

    def on_chunk(self, call: HookCall, index: int, kind: ChunkKind, text: str) -> str:
        """Fail mid-stream for marked requests when configured."""
        if self.params.point == "on_chunk" and call.state(self, dict).get("marked"):
            raise RuntimeError(SECRET_TEXT)
        return text

    async def after_response(self, exchange: Exchange) -> None:
        """Fail after the response for marked requests when configured."""
        marked = self.params.when in exchange.request.messages[-1].content
        if self.params.point == "after_response" and marked:
            raise RuntimeError(SECRET_TEXT)


@frozen
class SlowParams:
    """How slow."""

    sleep_ms: float = 30.0
    busy_chunk_ms: float = 0.0
    """Busy-wait this long in each on_chunk call (0: no on_chunk work)."""


class SlowHook(Hook):
    """Sleeps in before_request; optionally burns CPU in on_chunk."""

    params_type: ClassVar[type[Any]] = SlowParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Sleep."""
        await asyncio.sleep(self.params.sleep_ms / 1000)
        return None

    def on_chunk(self, call: HookCall, index: int, kind: ChunkKind, text: str) -> str:
        """Busy-wait when configured."""
        end = time.perf_counter() + self.params.busy_chunk_ms / 1000
        while time.perf_counter() < end:
            pass
        return text


@frozen
class AmendParams:
    """Which forbidden amendment to make."""

    what: str = "max_tokens"


class BadAmendHook(Hook):
    """Amends the request beyond what the service allows."""

    params_type: ClassVar[type[Any]] = AmendParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Break a limit, or return something that is not a request."""
        if self.params.what == "max_tokens":
            sampling = attrs.evolve(request.sampling, max_tokens=10**9)
            return attrs.evolve(request, sampling=sampling)
        if self.params.what == "model":
            return attrs.evolve(request, model="another-model")
        return "not a request"  # type: ignore[return-value]


class RecordHook(Hook):
    """Keeps every exchange it sees (class-level, so tests can read it)."""

    seen: ClassVar[list[Exchange]] = []

    async def after_response(self, exchange: Exchange) -> None:
        """Remember the exchange."""
        type(self).seen.append(exchange)


class NotAHook:
    """A class that is not a hook (start-up must refuse it)."""

    params_type = AppendParams


class HeaderSpyHook(Hook):
    """Keeps the headers each request showed the hooks."""

    seen: ClassVar[list[dict[str, str]]] = []

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Remember the headers."""
        type(self).seen.append(dict(call.headers))
        return None
