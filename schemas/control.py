"""Control-plane request and response classes: load, unload, validate, status.

Must never: hold an env value or a key; responses carry env key names only, and engine params
after the secret store has masked them.
"""

from __future__ import annotations

from typing import Any, Literal

from attrs import field, frozen

from schemas.errors import ErrorDetail
from schemas.validators import in_range, max_length

ModelStateName = Literal["empty", "loading", "ready", "unloading"]


@frozen
class LoadRequest:
    """`POST /v1/model/load` and `/v1/model/validate` body."""

    backend: str | None = None
    """Backend name from adapters.yaml (or an entry point); give this or `preset`."""
    preset: str | None = None
    """Preset alias from adapters.yaml `models:`; give this or `backend`."""
    model: str | None = None
    """`bundled:NAME`, a folder under the model roots, or a hub id; required with `backend`."""
    engine_params: dict[str, Any] = field(factory=dict)
    """Adapter params, merged over the adapters.yaml defaults (and the preset's params)."""
    env: dict[str, str] = field(factory=dict)
    """Environment for the engine (e.g. HF_TOKEN); keys from the backend's allowlist; secret."""
    served_model_name: str | None = field(default=None, validator=max_length(256))
    """Name clients send as `model`; defaults to the preset alias or the model reference."""
    replace: bool = False
    """Swap out a loaded model instead of answering 409: alongside when memory allows, else
    unload then load; a failed load restores the previous model (`rolled_back: true`)."""
    drain_timeout_s: float | None = field(default=None, validator=in_range(0, 3600))
    """With `replace`: how long in-flight requests may finish before they are aborted."""
    reasoning_parser: str | None = field(default=None, validator=max_length(64))
    """Split `<think>…</think>` into `reasoning_content` by parser name (deepseek_r1, think;
    `none` turns off the preset's or the backend's), over any backend; listed by
    `GET /v1/adapters`."""


@frozen
class UnloadRequest:
    """`POST /v1/model/unload` body (optional)."""

    drain_timeout_s: float | None = field(default=None, validator=in_range(0, 3600))
    """How long in-flight requests may finish before they are aborted (default from settings)."""


@frozen
class LoadTimings:
    """Where the load time went."""

    import_s: float
    init_s: float
    warmup_s: float
    total_s: float


@frozen
class MemoryChange:
    """Memory before and after a load or unload; MiB. `method` says how each was measured."""

    rss_before_mib: float
    rss_after_mib: float
    rss_delta_mib: float
    device_before_mib: float | None = None
    device_after_mib: float | None = None
    device_delta_mib: float | None = None
    method: str = "psutil process-tree RSS"


@frozen
class LoadPlanView:
    """What a load would do (validate) or did (load): never includes env values."""

    backend: str
    model: str
    served_model_name: str
    preset: str | None
    engine_params: dict[str, Any]
    env_keys: list[str]
    sampling_defaults: dict[str, Any] = field(factory=dict)
    """The preset's sampling for fields a request leaves unset."""
    reasoning_parser: str | None = None
    """The reasoning parser on the output (request's, preset's or backend's), or null."""


@frozen
class ValidateResponse:
    """`POST /v1/model/validate`: the load request is acceptable; nothing was loaded."""

    valid: bool
    plan: LoadPlanView


@frozen
class LoadResponse:
    """`POST /v1/model/load` result.

    After a failed `replace` the previous model is serving again: `status` is `rolled_back`,
    `error` says why the requested load failed (the HTTP status is that failure's), and the rest
    describes the model that is serving.
    """

    status: Literal["loaded", "rolled_back"]
    plan: LoadPlanView
    timings: LoadTimings
    memory: MemoryChange
    device: str
    max_context: int | None
    details: dict[str, Any]
    rolled_back: bool = False
    """True when the requested load failed and the previous model serves again."""
    swap: Literal["alongside", "unload_first"] | None = None
    """How a `replace` went: the new engine loaded beside the old one (no outage), or the old
    one was unloaded first because the memory estimate did not allow both (requests waited)."""
    error: ErrorDetail | None = None
    """With `rolled_back`: the failure of the requested load (also in `last_error`)."""


@frozen
class UnloadResponse:
    """`POST /v1/model/unload` result."""

    status: Literal["unloaded", "empty"]
    model: str | None = None
    drained: int = 0
    """Requests that finished during the drain."""
    aborted: int = 0
    """Requests still running at the drain timeout, ended with a terminal error."""
    drain_s: float = 0.0
    unload_s: float = 0.0
    memory: MemoryChange | None = None
    memory_settled: bool | None = None
    """Whether two memory readings agreed (within 2 MiB) before the settle timeout."""
    memory_compared: Literal["device", "rss"] | None = None
    """What the figures below compare: device memory (GPU) or the process tree's RSS."""
    memory_vs_first_baseline_mib: float | None = None
    """Memory now minus the backend's first baseline: memory after its first unload in this
    process (the one-time costs of importing and warming the engine are paid by then)."""
    memory_vs_previous_unload_mib: float | None = None
    """Memory now minus memory after the previous unload of the same backend (null on the first)."""
    memory_vs_pre_load_mib: float | None = None
    """Memory now minus memory just before this model's load (includes one-time costs)."""
    memory_returned: bool | None = None
    """Always the same test: `memory_vs_first_baseline_mib` within the tolerance. False means
    memory creeps up over load/unload cycles: a leak to report. Null only for the old model of a
    swap done alongside, whose figures include the new model still loaded."""
    memory_tolerance_mib: float | None = None
    """The tolerance `memory_returned` uses."""


@frozen
class ModelStatus:
    """`GET /v1/model/status`."""

    state: ModelStateName
    in_flight: int = 0
    plan: LoadPlanView | None = None
    load: LoadResponse | None = None
    last_error: str | None = None
    """Why the last load failed (the engine's own root cause, secrets masked), or null."""
    last_unload: UnloadResponse | None = None
    pending: LoadPlanView | None = None
    """The model being loaded by a `replace` while `plan` still serves (or is being swapped)."""
    state_since: float = 0.0
    """Unix time of the last state change."""
    engine: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None
    """What the loaded adapter honours (features, sampling fields, max_n, max_top_logprobs) and
    the sampling unset fields get: `effective` (the preset's over the model's), then the engine's
    neutral default for what neither sets."""
