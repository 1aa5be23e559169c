"""Control-plane request and response classes: load, unload, validate, status.

Must never: hold an env value or a key; responses carry env key names only, and engine params
after the secret store has masked them.
"""

from __future__ import annotations

from typing import Any, Literal

from attrs import field, frozen

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
    """Drain and unload a loaded model first instead of answering 409."""
    drain_timeout_s: float | None = field(default=None, validator=in_range(0, 3600))
    """With `replace`: how long in-flight requests may finish before they are aborted."""


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


@frozen
class ValidateResponse:
    """`POST /v1/model/validate`: the load request is acceptable; nothing was loaded."""

    valid: bool
    plan: LoadPlanView


@frozen
class LoadResponse:
    """`POST /v1/model/load` result."""

    status: Literal["loaded"]
    plan: LoadPlanView
    timings: LoadTimings
    memory: MemoryChange
    device: str
    max_context: int | None
    details: dict[str, Any]


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
    """Whether memory came back to the pre-load baseline (within tolerance) before the timeout."""
    memory_not_returned_mib: float | None = None
    """RSS (or device memory, on GPU) above the pre-load baseline after settling."""
    memory_returned: bool | None = None
    """False when `memory_not_returned_mib` exceeds the tolerance: a leak to look at. Null on the
    first unload of a backend in this process, whose baseline (pre-load) cannot separate a leak
    from one-time costs (engine libraries imported, CUDA context)."""
    memory_baseline: str | None = None
    """What `memory_not_returned_mib` is measured against."""


@frozen
class ModelStatus:
    """`GET /v1/model/status`."""

    state: ModelStateName
    in_flight: int = 0
    plan: LoadPlanView | None = None
    load: LoadResponse | None = None
    last_error: str | None = None
    last_unload: UnloadResponse | None = None
    state_since: float = 0.0
    """Unix time of the last state change."""
    engine: dict[str, Any] | None = None
