"""The adapter contract every engine module implements, and the small shared pieces they use.

An adapter turns one engine's API into four calls: `load`, `generate` (an async stream of
`TokenDelta`s), `unload` and `stats`. It knows nothing of HTTP, auth or OpenAI ids. It imports its
engine inside `load()` so that importing an adapter module stays cheap (the registry imports
every module named in adapters.yaml at start-up to validate defaults).

Must never: import torch/vllm/sglang/transformers at module level; import `service` or `registry`;
write to `os.environ` (the registry's env scope owns that).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from attrs import field, frozen

from adapters.kit.errors import no_mask
from adapters.kit.sampling import SAMPLING_FIELDS as SAMPLING_FIELDS  # noqa: PLC0414 (re-export)
from adapters.kit.tokens import TokenOps
from adapters.tool_parsing import ToolCallParser
from schemas.errors import ParamsValidationError
from schemas.generation import GenerationRequest, Message, TokenDelta

ParamsT = TypeVar("ParamsT")
ParamsT_contra = TypeVar("ParamsT_contra", contravariant=True)
#: an adapter's params class (a frozen attrs class the registry structures loads into)
P = TypeVar("P")


@frozen
class Capabilities:
    """What an adapter can honour; the service refuses (400) what is not listed."""

    sampling: frozenset[str] = frozenset()
    """`SamplingOptions` fields the engine applies (max_tokens is always honoured)."""
    max_n: int = 1
    """Largest `n` (choices per request)."""
    max_top_logprobs: int = 0
    """Largest `top_logprobs`; 0 means logprobs are not available."""
    reasoning: bool = False
    """Whether deltas may carry `reasoning` text (DeepSeek-style `reasoning_content`)."""
    max_context: int | None = None
    """Prompt + completion tokens the loaded model accepts, when known."""
    features: frozenset[str] = frozenset()
    """Catalogued routes and request fields honoured (`schemas.features`); others are refused."""


@frozen
class AdapterContext:
    """What the operator decided for this backend (adapters.yaml and settings)."""

    name: str
    trust_remote_code_allowed: bool = False
    allowed_hosts: tuple[str, ...] = ()
    model_roots: tuple[Path, ...] = ()
    cache_dir: Path = Path(".cache")
    extra_allow: tuple[str, ...] = ()
    """`extra` keys (or dotted key paths) the operator opted in to, past the engine's allowlist."""
    mask: Callable[[str], str] = field(default=no_mask, eq=False)
    """The secret store's mask: engine text is masked with it before it is cut short."""
    load_env: Mapping[str, str] = field(factory=dict, eq=False)
    """This load's own `env` (already allowlisted): the only place an adapter takes a secret
    from; never `os.environ`, which holds the server's own secrets."""


@frozen
class LoadInfo:
    """What the adapter reports about a finished load."""

    import_s: float = 0.0
    """Seconds spent importing the engine package."""
    init_s: float = 0.0
    """Seconds spent building the engine (weights, KV cache, processes)."""
    warmup_s: float = 0.0
    """Seconds spent on a first generation that primes caches."""
    device: str = "cpu"
    max_context: int | None = None
    engine_pids: tuple[int, ...] = ()
    """Processes the engine runs apart from ours (their memory is counted with ours)."""
    details: dict[str, Any] = field(factory=dict)
    """Resolved facts worth showing in status (dtype chosen, model source); never secrets."""


@frozen
class MemoryEstimate:
    """What a load is expected to need, MiB; `None` where the adapter cannot say."""

    host_mib: float | None = None
    device_mib: float | None = None
    basis: str = ""
    """How the figure was reached (e.g. "weights on disk x2 for float32 + 200 MiB")."""


@frozen
class EngineStats:
    """Engine-side figures for telemetry; `None` where the engine does not say."""

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    """Fraction of the KV cache in use, 0..1."""
    extra: dict[str, float] = field(factory=dict)


@runtime_checkable
class Adapter(Protocol[ParamsT_contra]):
    """One engine behind the uniform interface (see DESIGN.md, "Adapter contract")."""

    # not a ClassVar: `BaseAdapter[P]` declares it `type[P]`, which a ClassVar cannot be
    params_type: type[Any]
    context: AdapterContext

    def __init__(self, context: AdapterContext) -> None: ...

    @property
    def capabilities(self) -> Capabilities:
        """What this adapter honours now (may depend on the loaded model)."""
        ...

    def check(self, model: str, params: ParamsT_contra) -> None:
        """Refuse a load that cannot work, without loading anything (dry run for validate)."""
        ...

    async def load(self, model: str, params: ParamsT_contra) -> LoadInfo:
        """Build the engine; on failure raise (the manager calls `unload()` to clean up)."""
        ...

    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream deltas; on `aclose()`/cancellation stop the engine's work for this request."""
        ...

    async def unload(self) -> None:
        """Abort what is in flight, free engine memory. Idempotent, safe after a failed load."""
        ...

    def stats(self) -> EngineStats:
        """Engine-side figures (cheap; called on every telemetry sample)."""
        ...

    def estimate_memory(self, model: str, params: ParamsT_contra) -> MemoryEstimate | None:
        """Memory the load will need, for the watchdog's admission check (None: unknown)."""
        ...

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        """Prompt tokens by the loaded model's tokenizer; None when it has none at hand."""
        ...

    def token_ops(self) -> TokenOps | None:
        """The loaded tokenizer for `/tokenize` and `/detokenize`; None when there is none."""
        ...


# --- model references ---------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
BUNDLED_PREFIX = "bundled:"


@frozen
class ModelRef:
    """A model reference after validation: bundled name, local folder under a root, or hub id."""

    kind: str  # "bundled" | "local" | "hub"
    value: str


def parse_model_ref(model: str, context: AdapterContext) -> ModelRef:
    """Classify and check `model` against the operator's model roots; raise 422 when refused."""
    if model.startswith(BUNDLED_PREFIX):
        name = model.removeprefix(BUNDLED_PREFIX)
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
            raise ParamsValidationError("invalid bundled model name", param="$.model")
        return ModelRef("bundled", name)
    if model.startswith(("/", "./", "../", "~")):
        path = Path(model).expanduser().resolve()
        roots = [r.expanduser().resolve() for r in context.model_roots]
        if not any(path.is_relative_to(r) for r in roots):
            where = "IW_MODEL_ROOTS" if roots else "IW_MODEL_ROOTS (none configured)"
            raise ParamsValidationError(
                f"local model paths must lie under {where}", param="$.model", code="model_path"
            )
        if not path.is_dir():
            raise ParamsValidationError("local model folder does not exist", param="$.model")
        return ModelRef("local", str(path))
    if _HUB_ID.fullmatch(model) and ".." not in model:
        if Path(model).exists():
            # engines would read a relative folder of that name first: refuse the ambiguity
            raise ParamsValidationError(
                "model id names a relative path; use ./ for a local folder", param="$.model"
            )
        return ModelRef("hub", model)
    raise ParamsValidationError(
        "model must be 'bundled:NAME', a path under the model roots, or a hub id 'org/name'",
        param="$.model",
    )


def check_trust_remote_code(params: Any, context: AdapterContext) -> None:
    """Refuse `trust_remote_code: true` unless adapters.yaml allows it for this backend."""
    if getattr(params, "trust_remote_code", False) and not context.trust_remote_code_allowed:
        raise ParamsValidationError(
            f"trust_remote_code is not allowed for backend '{context.name}' "
            "(set trust_remote_code_allowed in adapters.yaml)",
            param="$.engine_params.trust_remote_code",
        )


class BaseAdapter(ABC, Generic[P]):
    """The contract as a base class, generic over the params class `P`.

    Subclass it as `class MyAdapter(BaseAdapter[MyParams])` with `params_type = MyParams`: mypy
    then checks `check`/`load`/`estimate_memory` take `MyParams` and that `capabilities`,
    `generate`, `unload` keep the contract's signatures (they are abstract here, so a missing one
    fails at instantiation too). Shared defaults: model-ref and trust_remote_code checks, no
    stats, no memory estimate, no token counting.
    """

    # a ClassVar cannot name a type variable; the registry reads it on the class
    params_type: type[P]
    declared_features: ClassVar[frozenset[str]] = frozenset()
    """Every catalogued feature (`schemas.features`) this adapter can honour, readable without
    loading an engine (the README's table); a loaded model's `capabilities.features` is a
    subset of it."""

    def __init__(self, context: AdapterContext) -> None:
        self.context = context

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this adapter honours now (may depend on the loaded model)."""

    def check(self, model: str, params: P) -> None:
        """Validate the model reference and registry-gated params."""
        parse_model_ref(model, self.context)
        check_trust_remote_code(params, self.context)

    @abstractmethod
    async def load(self, model: str, params: P) -> LoadInfo:
        """Build the engine; on failure raise (the manager calls `unload()` to clean up)."""

    @abstractmethod
    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream deltas; on `aclose()`/cancellation stop the engine's work for this request."""

    @abstractmethod
    async def unload(self) -> None:
        """Abort what is in flight, free engine memory. Idempotent, safe after a failed load."""

    @classmethod
    def check_extra_allow(cls, entries: Sequence[str]) -> None:
        """Refuse (`ValueError`) adapters.yaml `extra_allow` entries this adapter cannot honour.

        Adapters with an `engine_params.extra` declare its allowlist as `extra_policy` (a
        `adapters.kit.ParamPolicy`); the others take no `extra_allow` at all.
        """
        policy = getattr(cls, "extra_policy", None)
        for entry in entries:
            if policy is None:
                raise ValueError(f"this backend has no engine_params.extra to allow {entry!r} in")
            policy.check_allow_entry(entry)

    def stats(self) -> EngineStats:
        """No engine-side figures by default."""
        return EngineStats()

    def estimate_memory(self, model: str, params: P) -> MemoryEstimate | None:
        """Unknown by default: the load is not refused on memory grounds."""
        return None

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        """Prompt tokens of `messages` (chat template included) by the loaded model's tokenizer.

        Optional (hooks such as max_prompt_tokens use it); None when the adapter has no
        tokenizer at hand. May block (the service calls it in a worker thread).
        """
        return None

    def token_ops(self) -> TokenOps | None:
        """The loaded model's tokenizer operations, or None when the adapter has none at hand.

        Used by `/tokenize`, `/detokenize` and the echo of a token-id prompt.
        """
        return None

    def tool_parser(self) -> ToolCallParser | None:
        """The loaded model's tool-call parser (`tool_choice: "auto"`); None when none is set."""
        return None
