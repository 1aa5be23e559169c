"""Load planning: a load request turned into a validated `LoadPlan`, with nothing loaded.

The registry knows backends and presets; `plan_load` applies one request to them: the preset
looked up, the backend resolved, engine params structured over the yaml defaults, the env
checked against the backend's allowlist, the preset's sampling defaults checked, and the
adapter's own dry-run `check()`. The manager loads a plan; `/v1/model/validate` shows one.

Must never: import an engine or load anything; leave a request's env applied after `check()`;
show an env value or an unmasked secret in a plan's view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic

from attrs import evolve, field, frozen

from adapters.base import Adapter, AdapterContext, LoadInfo, MemoryEstimate, P
from registry.env import EnvScope, check_env
from registry.registry import (
    AdapterRegistry,
    RegisteredAdapter,
    SomeParams,
    deep_merge,
    make_adapter,
)
from registry.secrets import SecretStore
from schemas.control import LoadPlanView, LoadRequest
from schemas.converter import unstructure
from schemas.errors import ParamsValidationError
from schemas.sampling import check_sampling_defaults

#: nesting `mask_tree` walks before it cuts a value short
_MASK_DEPTH = 32


@frozen
class LoadPlan(Generic[P]):
    """A validated load request: everything `load()` needs, nothing loaded yet.

    Generic over the backend's params class, so that the adapter and its params travel
    together: the calls that take both (`check`, `load`, `estimate_memory`) are made here.
    """

    backend: RegisteredAdapter[P]
    adapter: Adapter[P]  # checked but not loaded
    model: str
    served_model_name: str
    preset: str | None
    params: P
    env: EnvScope
    sampling_defaults: Mapping[str, float | int] = field(factory=dict)
    """The preset's sampling for fields a request leaves unset (`schemas.sampling`)."""
    reasoning_parser: str | None = None
    """The parser `adapter` splits reasoning with (`AdapterRegistry.reasoning_parser`)."""

    def view(self, secrets: SecretStore) -> LoadPlanView:
        """What status and responses may show: params masked, env key names only."""
        params = mask_tree(unstructure(self.params), secrets)
        return LoadPlanView(
            backend=self.backend.name,
            model=secrets.mask(self.model),
            served_model_name=secrets.mask(self.served_model_name),
            preset=self.preset,
            engine_params=params,
            env_keys=list(self.env.keys),
            sampling_defaults=dict(self.sampling_defaults),
            reasoning_parser=self.reasoning_parser,
        )

    def serves(self, name: str) -> bool:
        """Whether a data-plane request for `name` is for this model."""
        return name in (self.served_model_name, self.model)

    def estimate_memory(self) -> MemoryEstimate | None:
        """The adapter's estimate of what this load needs (None: unknown)."""
        return self.adapter.estimate_memory(self.model, self.params)

    async def load(self) -> LoadInfo:
        """Build the engine (the caller applies the env scope and cleans up on failure)."""
        return await self.adapter.load(self.model, self.params)

    def again(self) -> LoadPlan[P]:
        """The same plan with a fresh adapter instance, for loading it a second time.

        The context (mask, the load's own env) is the one this plan's adapter was made with; a
        used instance may hold state of its engine to the end.
        """
        return evolve(
            self, adapter=make_adapter(self.backend, self.adapter.context, self.reasoning_parser)
        )


def plan_load(
    registry: AdapterRegistry, req: LoadRequest, secrets: SecretStore
) -> LoadPlan[SomeParams]:
    """Validate a load request without loading anything (the load and `/v1/model/validate`).

    The adapter's `check()` runs with the request's env applied for its duration (a hub token
    decides whether a gated model is reachable), and restored right after.
    """
    preset_name = req.preset
    if (req.backend is None) == (req.preset is None):
        raise ParamsValidationError("give exactly one of 'backend' or 'preset'", param="$")
    if preset_name is not None:
        preset = registry.preset(preset_name)
        if req.backend is not None and req.backend != preset.backend:
            raise ParamsValidationError("backend contradicts the preset", param="$.backend")
        backend_name = preset.backend
        model = req.model or preset.model
        overrides = deep_merge(preset.engine_params, req.engine_params)
        served = req.served_model_name or preset.served_model_name or preset_name
        sampling_defaults = check_sampling_defaults(preset.sampling_defaults)
    else:
        backend_name = req.backend or ""
        registry.resolve(backend_name)  # an unknown backend is the first thing to fix: its 404
        if req.model is None:
            raise ParamsValidationError("'model' is required with 'backend'", param="$.model")
        model = req.model
        overrides = dict(req.engine_params)
        served = req.served_model_name or model
        sampling_defaults = {}
    backend = registry.resolve(backend_name)
    return _plan_for(
        backend,
        registry.context,
        req,
        secrets,
        model=model,
        served=served,
        overrides=overrides,
        sampling_defaults=sampling_defaults,
        parser=registry.reasoning_parser(backend_name, preset_name, req.reasoning_parser),
    )


def _plan_for(
    backend: RegisteredAdapter[P],
    context_of: Callable[[str], AdapterContext],
    req: LoadRequest,
    secrets: SecretStore,
    *,
    model: str,
    served: str,
    overrides: Mapping[str, Any],
    sampling_defaults: Mapping[str, float | int],
    parser: str | None,
) -> LoadPlan[P]:
    """The plan for one backend: generic, so mypy checks its adapter and params pair up."""
    params = backend.build_params(overrides)
    check_env(req.env, backend.entry.env_allow, backend.name)
    env = EnvScope({**backend.entry.env, **req.env})
    # the adapter masks engine text with the store, and takes secrets from this load's env
    context = evolve(context_of(backend.name), mask=secrets.mask, load_env=dict(req.env))
    adapter = make_adapter(backend, context, parser)
    # the reachability check reads the load's env (HF_TOKEN, HF_HUB_OFFLINE), never ours
    probe_env = EnvScope({**backend.entry.env, **req.env})
    probe_env.apply()
    try:
        adapter.check(model, params)
    finally:
        probe_env.restore()
    return LoadPlan(
        backend=backend,
        adapter=adapter,
        model=model,
        served_model_name=served,
        preset=req.preset,
        params=params,
        env=env,
        sampling_defaults=sampling_defaults,
        reasoning_parser=parser,
    )


def mask_tree(value: Any, secrets: SecretStore, depth: int = 0) -> Any:
    """`value` (unstructured JSON) with every string masked by the secret store."""
    # capped: params are bounded at depth 8 before they get here; a deeper value is cut, not
    # walked (a RecursionError here once turned a bad load request into a 500)
    if depth > _MASK_DEPTH:
        return "…"
    if isinstance(value, str):
        return secrets.mask(value)
    if isinstance(value, dict):
        return {k: mask_tree(v, secrets, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_tree(v, secrets, depth + 1) for v in value]
    return value


__all__: Sequence[str] = ["LoadPlan", "mask_tree", "plan_load"]
