"""The hook contract: custom request/response logic an operator adds in adapters.yaml.

A hook is a class with a frozen attrs `params_type` (validated at start-up, shown in
`GET /v1/adapters`) and up to three points, called by `hooks.chain.HookChain`:

- `before_request` (async, once per request, before admission): may return an amended
  `GenerationRequest` (messages, sampling) or refuse the request by raising one of the client
  errors of `schemas.errors` whose status is 400, 403, 422 or 429 (`REFUSAL_STATUSES`).
- `on_chunk` (sync, per delta of text, streamed or not): may rewrite the text; `on_chunk_end`
  flushes what it held back when a choice ends. It runs on the per-token path: keep it cheap.
- `after_response` (async, once per request, after the response is complete, from a bounded
  background queue): sees the whole exchange, metrics included; it cannot change what was sent.

This package sits beside `adapters/` (DESIGN.md's layering): it imports `schemas` only, so that
the registry can import and validate hook classes at start-up without importing the service, and
a hook package never needs Litestar. What a hook receives is engine-neutral (`GenerationRequest`,
`Message`, text deltas): it never sees HTTP objects, the engine, the service's keys or env.

Must never: import `service`, `registry` or an engine; hand a hook a secret (auth headers are
removed from `HookCall.headers`) or anything it could use to change the wire format.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from attrs import field, frozen

from schemas.errors import ErrorDetail, WrapperError
from schemas.generation import GenerationRequest, Message

#: statuses a hook may refuse a request with; anything else a hook raises is a hook failure
REFUSAL_STATUSES = frozenset({400, 403, 422, 429})
#: headers a hook never sees (credentials); the names are compared lowercased
HIDDEN_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "cookie", "set-cookie"}
)
#: tags a request may carry, and their shape, whatever hooks set (they become metric labels)
MAX_TAGS = 8
MAX_TAG_VALUE = 64

ChunkKind = Literal["content", "reasoning"]
TokenCounter = Callable[[Sequence[Message]], Awaitable[int | None]]


class HookFailedError(WrapperError):
    """A hook raised, returned something unusable or ran past its timeout: 500 for that request.

    The message names the hook, never the exception's text (that goes to the masked log).
    """

    default_code = "hook_failed"


@frozen
class NoParams:
    """This hook takes no params."""


@frozen
class HookSetup:
    """What a hook instance gets at start-up besides its params."""

    name: str
    """The hook's name in adapters.yaml (labels its metrics and log lines)."""
    mask: Callable[[str], str] = str
    """The service's secret masking (`SecretStore.mask`): apply it to anything a hook writes."""


class HookCall:
    """One request as the hooks of its chain see it; created once per request with hooks.

    `headers` are the request's headers, lowercased, credentials removed. `tags` are labels a
    hook may set (bounded by the service: `MAX_TAGS` tags, values of `MAX_TAG_VALUE` chars) that
    go into the telemetry record and the `iw_request_tags_total` series.
    """

    __slots__ = (
        "_counter",
        "_state",
        "backend",
        "headers",
        "hooks_s",
        "model",
        "over_budget",
        "preset",
        "request_id",
        "stream",
        "tags",
    )

    def __init__(
        self,
        *,
        request_id: str,
        backend: str,
        model: str,
        preset: str | None,
        stream: bool,
        headers: Mapping[str, str],
        counter: TokenCounter | None = None,
    ) -> None:
        self.request_id = request_id
        self.backend = backend
        self.model = model
        self.preset = preset
        self.stream = stream
        self.headers = headers
        self.tags: dict[str, str] = {}
        self.hooks_s = 0.0
        """Seconds spent in this request's hooks on its own path (not `after_response`)."""
        self.over_budget: set[tuple[str, str]] = set()
        self._counter = counter
        self._state: dict[int, Any] = {}

    async def count_prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        """Prompt tokens of `messages` by the loaded model's tokenizer, or None when it has none."""
        if self._counter is None:
            return None
        return await self._counter(messages)

    def state(self, hook: Hook, factory: Callable[[], Any]) -> Any:
        """Per-request scratch of one hook (e.g. text held back across chunks)."""
        key = id(hook)
        value = self._state.get(key)
        if value is None:
            value = self._state[key] = factory()
        return value


@frozen
class Exchange:
    """A finished request as `after_response` sees it (what was sent; read-only)."""

    request_id: str
    backend: str
    model: str
    preset: str | None
    stream: bool
    status: str
    """ok | error | cancelled | aborted, as in the telemetry record."""
    request: GenerationRequest
    """The request as the engine got it (after `before_request` hooks)."""
    completions: tuple[str, ...]
    """The text sent to the client, per choice (after `on_chunk` hooks)."""
    finish_reasons: tuple[str | None, ...]
    usage: Mapping[str, int]
    metrics: Mapping[str, Any]
    tags: Mapping[str, str] = field(factory=dict)
    error: ErrorDetail | None = None


class Hook:
    """Base class of every hook; override the points you need (the others cost nothing)."""

    params_type: ClassVar[type[Any]] = NoParams
    description: ClassVar[str] = ""
    """One line for `GET /v1/adapters` (the class docstring's first line when empty)."""

    def __init__(self, params: Any, setup: HookSetup) -> None:
        self.params = params
        self.setup = setup

    @property
    def name(self) -> str:
        """The hook's name in adapters.yaml."""
        return self.setup.name

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Return an amended request, None to leave it, or raise a 400/403/422/429 error."""
        return None

    def on_chunk(self, call: HookCall, index: int, kind: ChunkKind, text: str) -> str:
        """Text of one delta of choice `index` (may hold some back, returned later)."""
        return text

    def on_chunk_end(self, call: HookCall, index: int, kind: ChunkKind) -> str:
        """Choice `index` ended: return whatever text was held back."""
        return ""

    async def after_response(self, exchange: Exchange) -> None:
        """The exchange is over and sent; log it, count it. Runs in the background."""

    async def close(self) -> None:
        """Release what the hook holds (files, threads); called once at shutdown."""


POINTS = ("before_request", "on_chunk", "after_response")


def points_of(cls: type[Hook]) -> tuple[str, ...]:
    """The points a hook class overrides (only those run)."""
    out = [p for p in POINTS if getattr(cls, p) is not getattr(Hook, p)]
    if "on_chunk" not in out and cls.on_chunk_end is not Hook.on_chunk_end:
        out.insert(1 if "before_request" in out else 0, "on_chunk")
    return tuple(out)


__all__ = [
    "HIDDEN_HEADERS",
    "MAX_TAGS",
    "MAX_TAG_VALUE",
    "REFUSAL_STATUSES",
    "ChunkKind",
    "Exchange",
    "Hook",
    "HookCall",
    "HookFailedError",
    "HookSetup",
    "NoParams",
    "points_of",
]
