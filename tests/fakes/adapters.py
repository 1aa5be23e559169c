"""Fake adapters for failure paths the echo backend cannot take.

`CrashingAdapter` fails its load with an engine-style exception whose text quotes the injected
HF_TOKEN (the way a real HTTP client error quotes a URL with a token in it), so tests can prove
the text is masked everywhere and the manager cleans up. `ReasoningEchoAdapter` is echo with
reasoning on, for the `reasoning_content` rules.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import attrs
from attrs import frozen

from adapters.base import BaseAdapter, Capabilities, LoadInfo
from adapters.echo import EchoAdapter
from schemas.generation import GenerationRequest, TokenDelta


@frozen
class CrashingParams:
    """Params of the crashing adapter."""

    crash: bool = True
    """Whether load() raises."""


class CrashingAdapter(BaseAdapter):
    """Raises RuntimeError in load() with the injected token in its message."""

    params_type: ClassVar[type[Any]] = CrashingParams
    unloads = 0

    @property
    def capabilities(self) -> Capabilities:
        """Nothing beyond max_tokens."""
        return Capabilities()

    def check(self, model: str, params: Any) -> None:
        """Any model name."""

    async def load(self, model: str, params: Any) -> LoadInfo:
        """Fail like an engine whose hub request was refused."""
        if params.crash:
            token = os.environ.get("HF_TOKEN", "<none>")
            msg = f"401 Client Error for url https://hub/api?token={token} (token {token})"
            raise RuntimeError(msg)
        return LoadInfo()

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """One fixed token."""
        yield TokenDelta("ok", 1, 0, "stop", 1)

    async def unload(self) -> None:
        """Count cleanups."""
        type(self).unloads += 1


class ReasoningEchoAdapter(EchoAdapter):
    """Echo that declares reasoning: first a reasoning delta (`REASONING`), then the echo."""

    REASONING: ClassVar[str] = "thinking it over"

    @property
    def capabilities(self) -> Capabilities:
        """Echo's, plus reasoning deltas."""
        return attrs.evolve(super().capabilities, reasoning=True)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """One reasoning delta (no token counted), then what echo yields."""
        yield TokenDelta("", 0, 0, reasoning=self.REASONING)
        async for delta in super().generate(req):
            yield delta
