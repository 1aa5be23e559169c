"""Control plane: load, unload, validate and status of the one model, plus the adapter registry.

Thin handlers: parse the body into attrs classes (422 naming the field), call the ModelManager
(validate: the registry's `plan_load`, which a load runs first too), render. Env values are
registered as secrets once the plan has accepted their keys (a refused key's value is never
stored: the store is bounded); errors name env keys, never values.

Must never: echo an env value; accept a module path from a request.
"""

from __future__ import annotations

from typing import Any, TypeVar

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency

from adapters.reasoning import PARSERS
from registry.manager import ModelManager, ReplaceRolledBackError
from registry.planning import plan_load
from registry.registry import AdapterRegistry
from registry.secrets import SecretStore
from schemas.control import LoadRequest, UnloadRequest, ValidateResponse
from schemas.converter import StructureError, structure
from schemas.errors import InvalidRequestError, ParamsValidationError
from service.audit import audit_middleware, note_request
from service.auth import require_admin
from service.errors import decode_json, json_response, require_json_body

T = TypeVar("T")


async def parse_body(request: Request[Any, Any, Any], cls: type[T], *, allow_empty: bool) -> T:
    """Body → attrs instance; 400 for bad JSON, 422 naming the field for a bad shape."""
    raw = await request.body()
    require_json_body(request.headers.get("content-type"), raw)
    if not raw.strip():
        if allow_empty:
            return cls()
        raise InvalidRequestError("request body is required (JSON object)")
    payload = decode_json(raw)
    note_request(request.scope, payload)
    try:
        return structure(payload, cls, path="$")
    except StructureError as exc:
        first = exc.first
        raise ParamsValidationError(first.render(), param=first.param or "$") from None


class ModelController(Controller):
    """`/v1/model/*`: the lifecycle of the served model (admin key)."""

    path = "/v1/model"
    guards = [require_admin]  # noqa: RUF012
    tags = ["control plane"]  # noqa: RUF012
    middleware = [audit_middleware]  # noqa: RUF012  (outside the guard: refusals are audited)

    @post("/load", operation_id="loadModel", name="model:load", status_code=200)
    async def load(
        self, request: Request[Any, Any, Any], manager: NamedDependency[ModelManager]
    ) -> Response[bytes]:
        """Load a model on a named backend (or preset); 409 while busy or when one is loaded.

        Returns the effective params (secrets masked), the load time split and the memory the
        load took. On engine failure the state is clean (`empty`) and `last_error` says why;
        when the failed load was a `replace`, the previous model serves again and the answer
        (with the failure's status) is its load report with `rolled_back: true` and `error`.
        """
        req = await parse_body(request, LoadRequest, allow_empty=False)
        try:
            return json_response(await manager.load(req))
        except ReplaceRolledBackError as exc:
            return json_response(exc.response, exc.status_code, exc.headers or None)

    @post("/unload", operation_id="unloadModel", name="model:unload", status_code=200)
    async def unload(
        self, request: Request[Any, Any, Any], manager: NamedDependency[ModelManager]
    ) -> Response[bytes]:
        """Drain in-flight requests (then abort the rest), unload, report memory freed.

        Idempotent: with nothing loaded it answers `status: empty`.
        """
        req = await parse_body(request, UnloadRequest, allow_empty=True)
        return json_response(await manager.unload(req.drain_timeout_s))

    @post("/validate", operation_id="validateLoad", name="model:validate", status_code=200)
    async def validate(
        self,
        request: Request[Any, Any, Any],
        registry: NamedDependency[AdapterRegistry],
        secrets: NamedDependency[SecretStore],
    ) -> Response[bytes]:
        """Dry run of a load: registry lookup, params over defaults, env and model path checks.

        Nothing is imported or loaded; the answer shows what a load would use.
        """
        req = await parse_body(request, LoadRequest, allow_empty=False)
        plan = plan_load(registry, req, secrets)
        # the dry run registers what a load would: values of the env keys it accepted
        secrets.add_many(req.env.values())
        return json_response(ValidateResponse(valid=True, plan=plan.view(secrets)))

    @get("/status", operation_id="modelStatus", name="model:status")
    async def status(self, manager: NamedDependency[ModelManager]) -> Response[bytes]:
        """State, model, backend, effective params (masked), load report, in-flight count."""
        return json_response(manager.status())


class AdapterController(Controller):
    """`/v1/adapters`: what the registry offers (admin key)."""

    path = "/v1/adapters"
    guards = [require_admin]  # noqa: RUF012
    tags = ["control plane"]  # noqa: RUF012
    middleware = [audit_middleware]  # noqa: RUF012  (outside the guard: refusals are audited)

    @get("/", operation_id="listAdapters", name="adapters:list")
    async def list_adapters(self, registry: NamedDependency[AdapterRegistry]) -> Response[bytes]:
        """Each backend with its defaults and params JSON Schema; the presets; the hooks.

        Hooks appear where they are configured (top-level `hooks`, each backend's and each
        preset's `hooks`) with their params and the JSON Schema of their params.
        """
        presets = {
            alias: {
                "backend": p.backend,
                "model": p.model,
                "description": p.description,
                "hooks": registry.describe_hooks(f"models.{alias}.hooks"),
                "sampling_defaults": p.sampling_defaults,
                "reasoning_parser": p.reasoning_parser,
            }
            for alias, p in registry.presets.items()
        }
        data = [registry.describe(name) for name in registry.names]
        hooks = registry.describe_hooks("hooks")
        parsers = {p.name: p.summary for p in PARSERS.values()}
        return json_response(
            {
                "object": "list",
                "data": data,
                "presets": presets,
                "hooks": hooks,
                "reasoning_parsers": parsers,
            }
        )
