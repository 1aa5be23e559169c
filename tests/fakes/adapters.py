"""Fake adapters for failure paths the echo backend cannot take.

`CrashingAdapter` fails its load with an engine-style exception whose text quotes the injected
HF_TOKEN (the way a real HTTP client error quotes a URL with a token in it), so tests can prove
the text is masked everywhere and the manager cleans up. `ReasoningEchoAdapter` is echo with
reasoning on, for the `reasoning_content` rules. `ConstrainedEchoAdapter`
declares the structured-output features, for the service's checks of them. `EnvSeeingAdapter`
records the environment its dry run saw, for the planner's env scope.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

import attrs
from attrs import frozen

from adapters.base import BaseAdapter, Capabilities, LoadInfo
from adapters.echo import EchoAdapter
from adapters.tool_parsing import ToolCallParser
from schemas.features import FORCED_TOOLS, STRUCTURED_OUTPUT
from schemas.generation import GenerationRequest, TokenDelta


@frozen
class CrashingParams:
    """Params of the crashing adapter."""

    crash: bool = True
    """Whether load() raises."""


class CrashingAdapter(BaseAdapter[CrashingParams]):
    """Raises RuntimeError in load() with the injected token in its message."""

    params_type = CrashingParams
    unloads = 0

    @property
    def capabilities(self) -> Capabilities:
        """Nothing beyond max_tokens."""
        return Capabilities()

    def check(self, model: str, params: CrashingParams) -> None:
        """Any model name."""

    async def load(self, model: str, params: CrashingParams) -> LoadInfo:
        """Fail like an engine whose hub request was refused."""
        if params.crash:
            token = os.environ.get("HF_TOKEN", "<none>")
            msg = f"401 Client Error for url https://hub/api?token={token} (token {token})"
            raise RuntimeError(msg)
        return LoadInfo()

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
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

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """One reasoning delta (no token counted), then what echo yields."""
        yield TokenDelta("", 0, 0, reasoning=self.REASONING)
        async for delta in super().generate(req):
            yield delta


class EnvSeeingAdapter(CrashingAdapter):
    """Records what its dry-run `check()` saw of `HF_TOKEN` in the process environment."""

    seen: ClassVar[list[str | None]] = []

    def check(self, model: str, params: CrashingParams) -> None:
        """Note the token the environment holds now (a hub reachability check reads it)."""
        type(self).seen.append(os.environ.get("HF_TOKEN"))


class NoisyAdapter(CrashingAdapter):
    """Loads like an engine that writes to stdout/stderr behind logging's back.

    print(), a raw write to fd 2 (C code), a warning, a tqdm-style bar redrawn with carriage
    returns, and a subprocess writing to the stderr it inherited (an engine core process).
    """

    async def load(self, model: str, params: Any) -> LoadInfo:
        """Make every kind of noise, then succeed."""
        print("engine banner on stdout")  # noqa: T201
        print("engine note on stderr", file=sys.stderr)  # noqa: T201
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, b"raw C-level line on fd 2\n")
        warnings.warn("an engine future warning", FutureWarning, stacklevel=1)
        sys.stderr.write("Loading:  10%|#  |\rLoading:  50%|## |\rLoading: 100%|###|\n")
        sys.stderr.flush()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stderr.write('engine subprocess line\\n')"
        )
        await asyncio.wait_for(child.wait(), 30)
        return LoadInfo()


class ConstrainedEchoAdapter(EchoAdapter):
    """Echo that declares the structured-output and forced-tool features, for the service's checks.

    It does not constrain anything (echo has no sampler): it keeps the last request's
    `structured` so a test can see what the service built from the request's fields.
    """

    last: ClassVar[list[GenerationRequest]] = []

    @property
    def capabilities(self) -> Capabilities:
        """Echo's, plus the structured-output features."""
        return attrs.evolve(
            super().capabilities,
            features=STRUCTURED_OUTPUT | FORCED_TOOLS,
        )

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Echo, after noting the request."""
        type(self).last[:] = [req]
        async for delta in super().generate(req):
            yield delta


class SamplingEchoAdapter(EchoAdapter):
    """Echo that answers with the sampling it was given, and a model generation_config of its own.

    Its `details["sampling_defaults"]` plays the model's generation_config.json (top_k 40,
    top_p 0.5), so the preset-over-model rule of `schemas.sampling` can be seen end to end.
    """

    MODEL_DEFAULTS: ClassVar[dict[str, float | int]] = {"top_k": 40, "top_p": 0.5}

    @property
    def capabilities(self) -> Capabilities:
        """Echo's, plus top_k."""
        caps = super().capabilities
        return attrs.evolve(caps, sampling=caps.sampling | {"top_k"})

    async def load(self, model: str, params: Any) -> LoadInfo:
        """Echo's load, reporting the model's sampling defaults as the real adapters do."""
        info = await super().load(model, params)
        return attrs.evolve(
            info, details={**info.details, "sampling_defaults": self.MODEL_DEFAULTS}
        )

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """One delta: the sampling as `name=value` pairs, the model's defaults filled in."""
        s = req.sampling
        top_k = s.top_k if s.top_k is not None else self.MODEL_DEFAULTS["top_k"]
        top_p = s.top_p if s.top_p is not None else self.MODEL_DEFAULTS["top_p"]
        yield TokenDelta(
            f"temperature={s.temperature} top_p={top_p} top_k={top_k}", 1, 0, "stop", 1
        )


class ImageEchoAdapter(EchoAdapter):
    """Echo that declares `image_url`, as vLLM does for a multimodal model.

    It answers with the last message's parts, `text:...` / `image_url:<scheme>`, to show what
    reached the adapter.
    """

    declared_features: ClassVar[frozenset[str]] = frozenset({"image_url"})

    @property
    def capabilities(self) -> Capabilities:
        """Echo's, plus image parts."""
        return attrs.evolve(super().capabilities, features=frozenset({"image_url"}))

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """One delta naming the parts of the last message."""
        parts = req.messages[-1].parts
        text = " ".join(
            f"{kind}:{value.partition(':')[0] if kind == 'image_url' else value}"
            for kind, value in parts
        )
        yield TokenDelta(text, 1, 0, "stop", 1)


class ToolAutoEchoAdapter(EchoAdapter):
    """Echo with vLLM's Hermes tool parser: the user's text is the 'model output' parsed.

    A user message holding `<tool_call>{...}</tool_call>` comes back as the answer, so the
    service's `tool_choice: "auto"` path (parse, content, finish reason, streaming hold-back)
    runs on text a test chooses. The tokenizer is a stand-in: Hermes only checks it is set.
    """

    @property
    def capabilities(self) -> Capabilities:
        """Echo's, plus tools with `auto`."""
        caps = super().capabilities
        return attrs.evolve(caps, features=caps.features | FORCED_TOOLS | {"tool_choice.auto"})

    last: ClassVar[list[GenerationRequest]] = []

    def tool_parser(self) -> ToolCallParser | None:
        """Hermes, as the smollm2 presets name it."""
        return ToolCallParser("hermes", tokenizer=object())

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Echo, after noting the request."""
        type(self).last[:] = [req]
        async for delta in super().generate(req):
            yield delta
