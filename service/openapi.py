"""The OpenAPI 3.1 description of the HTTP API, built from the app's routes and the attrs schemas.

The handlers parse raw bodies with the one cattrs converter and answer with msgspec-encoded attrs
instances, so Litestar's own generator (which reads handler signatures) would describe `Any` and
`bytes`. The document is built instead from the two things the handlers really use: the routes
Litestar registered (path, method, operation id, tags, docstring, guard) and the attrs classes
they structure and unstructure (`schemas.jsonschema`). Every route must have an entry in
`OPERATIONS`; a route without one makes `build_openapi` raise, so the document cannot fall
behind the handlers silently.

Must never: describe a route that does not exist or hide one that does; carry a key or any
setting's value.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

from attrs import frozen
from litestar import Controller, Litestar, Request, Response, get
from litestar.routes import HTTPRoute

from schemas.control import (
    LoadRequest,
    LoadResponse,
    ModelStatus,
    UnloadRequest,
    UnloadResponse,
    ValidateResponse,
)
from schemas.errors import ErrorResponse
from schemas.jsonschema import attrs_json_schema
from schemas.openai import ChatCompletion, ChatCompletionRequest, ModelList
from service.errors import json_response
from service.version import package_version

__all__ = ["OPENAPI_PATH", "OPERATIONS", "OpenAPIController", "Operation", "build_openapi"]

OPENAPI_PATH = "/schema/openapi.json"

Security = Literal["admin", "api", "ops", "metrics", "none"]

#: what each status means across the API (the envelope is the same for all)
_STATUS_TEXT: Mapping[int, str] = {
    400: "Bad request: malformed JSON, an unsupported parameter (named in `param`), a bad query",
    401: "No key, or a key that is not configured",
    403: "An API key on a control-plane route",
    404: "Unknown model, backend or preset",
    409: "A load or unload is under way, or a model is loaded and `replace` is false",
    413: "The request body is larger than IW_MAX_BODY_BYTES",
    422: "The body does not fit the schema; `param` is the JSON path of the first bad field",
    429: "The admission queue is full",
    431: "Request headers too large",
    500: "The engine failed; the message is sanitised and the state is clean",
    502: "The upstream OpenAI-compatible server answered with an error",
    503: "No model ready, a swap under way, memory pressure or shutting down (see Retry-After)",
    504: "The upstream server did not answer in time",
}

_COMMON = (400, 431)
_BODY = (413, 422)
_GUARDED = (401,)


@frozen
class Operation:
    """What one route takes and gives, beyond what Litestar knows."""

    response: Mapping[str, Any]
    """JSON Schema of the 200 body (application/json)."""
    security: Security
    errors: tuple[int, ...] = ()
    """Statuses the route itself can answer besides 200 and the common ones."""
    request: type | None = None
    """attrs class of the JSON body."""
    request_required: bool = True
    stream: bool = False
    """The 200 may instead be `text/event-stream` (`stream: true`)."""
    parameters: tuple[Mapping[str, Any], ...] = ()


def _object(required: tuple[str, ...], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


_NUMBER_OR_NULL: dict[str, Any] = {"type": ["number", "null"]}

OPERATIONS: Mapping[str, Operation] = {
    "loadModel": Operation(
        {"$ref": "#/components/schemas/LoadResponse"},
        "admin",
        (403, 404, 409, 500, 502, 503, 504),
        LoadRequest,
    ),
    "unloadModel": Operation(
        {"$ref": "#/components/schemas/UnloadResponse"},
        "admin",
        (403, 409, 500),
        UnloadRequest,
        request_required=False,
    ),
    "validateLoad": Operation(
        {"$ref": "#/components/schemas/ValidateResponse"},
        "admin",
        (403, 404),
        LoadRequest,
    ),
    "modelStatus": Operation({"$ref": "#/components/schemas/ModelStatus"}, "admin", (403,)),
    "listAdapters": Operation(
        _object(
            ("object", "data", "presets"),
            object={"const": "list"},
            data={"type": "array", "items": {"type": "object"}},
            presets={"type": "object", "additionalProperties": {"type": "object"}},
        ),
        "admin",
        (403,),
    ),
    "createChatCompletion": Operation(
        {"$ref": "#/components/schemas/ChatCompletion"},
        "api",
        (404, 429, 500, 502, 503, 504),
        ChatCompletionRequest,
        stream=True,
    ),
    "listModels": Operation({"$ref": "#/components/schemas/ModelList"}, "api"),
    "health": Operation(_object(("status",), status={"const": "ok"}), "none"),
    "ready": Operation(
        _object(("status", "model"), status={"const": "ready"}, model={"type": "string"}),
        "none",
        (503,),
    ),
    "metrics": Operation({"type": "string"}, "metrics"),
    "telemetry": Operation(
        _object(
            ("records", "summary", "lifecycle"),
            records={"type": "array", "items": {"type": "object"}},
            summary={"type": "object"},
            lifecycle={"type": "array", "items": {"type": "object"}},
        ),
        "ops",
        parameters=(
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "How many recent request records to return",
                "schema": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 50},
            },
            {
                "name": "window_s",
                "in": "query",
                "required": False,
                "description": "Percentiles over the last window_s seconds (default: all kept)",
                "schema": {"type": "number", "exclusiveMinimum": 0},
            },
        ),
    ),
    "resources": Operation(
        _object(
            ("interval_s", "nvml_available", "under_pressure", "cost_cpu_fraction", "samples"),
            interval_s={"type": "number"},
            nvml_available={"type": "boolean"},
            under_pressure={"type": "boolean"},
            cost_cpu_fraction={"type": "number"},
            samples={"type": "array", "items": {"type": "object"}},
        ),
        "ops",
        parameters=(
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "How many recent watchdog samples to return",
                "schema": {"type": "integer", "minimum": 0, "maximum": 100_000, "default": 60},
            },
        ),
    ),
    "openapi": Operation({"type": "object"}, "none"),
}

_SCHEMAS: tuple[type, ...] = (
    LoadRequest,
    UnloadRequest,
    LoadResponse,
    UnloadResponse,
    ValidateResponse,
    ModelStatus,
    ChatCompletionRequest,
    ChatCompletion,
    ModelList,
    ErrorResponse,
)

_KEYS: list[dict[str, list[str]]] = [{"ApiKeyHeader": []}, {"BearerAuth": []}]
_SECURITY: Mapping[Security, list[dict[str, list[str]]]] = {
    "admin": _KEYS,
    "ops": _KEYS,
    # open when IW_API_KEY (resp. IW_METRICS_OPEN) says so: `{}` marks the key as optional
    "api": [*_KEYS, {}],
    "metrics": [*_KEYS, {}],
    "none": [],
}

_REQUEST_ID = {
    "x-request-id": {
        "description": "The request's id (the client's own when it sent a safe one)",
        "schema": {"type": "string"},
    }
}


def _error_response(status: int) -> dict[str, Any]:
    headers: dict[str, Any] = dict(_REQUEST_ID)
    if status in (429, 503):
        headers["Retry-After"] = {
            "description": "Seconds to wait before trying again",
            "schema": {"type": "string"},
        }
    return {
        "description": _STATUS_TEXT[status],
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _operation(op_id: str, summary: str, doc: str, tags: list[str]) -> dict[str, Any]:
    spec = OPERATIONS[op_id]
    content: dict[str, Any] = (
        {"text/plain": {"schema": spec.response}}
        if op_id == "metrics"
        else {"application/json": {"schema": spec.response}}
    )
    if spec.stream:
        # OpenAPI 3.1 has no word for a stream's items; schemathesis (and OpenAPI 3.2's
        # `itemSchema`) read this schema as the schema of one parsed event
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "description": "One server-sent event: `data: <chat.completion.chunk JSON>`, an"
                ' error event `data: {"error": {...}}`, and last `data: [DONE]`',
                "required": ["data"],
                "properties": {
                    "data": {"type": "string"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
            }
        }
    statuses = set(_COMMON) | set(spec.errors)
    if spec.security != "none":
        statuses |= set(_GUARDED)
    if spec.request is not None:
        statuses |= set(_BODY)
    out: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "description": doc,
        "tags": tags,
        "security": _SECURITY[spec.security],
        "responses": {
            "200": {"description": "Success", "headers": dict(_REQUEST_ID), "content": content},
            **{str(s): _error_response(s) for s in sorted(statuses)},
        },
    }
    if spec.parameters:
        out["parameters"] = [dict(p) for p in spec.parameters]
    if spec.request is not None:
        name = spec.request.__name__
        out["requestBody"] = {
            "required": spec.request_required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    return out


def build_openapi(app: Litestar, *, version: str) -> dict[str, Any]:
    """The whole document for `app`; raises `KeyError` naming a route `OPERATIONS` lacks."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if handler.http_methods <= {"HEAD", "OPTIONS"}:
                continue  # Litestar's automatic OPTIONS (CORS preflight) handler
            op_id = handler.operation_id
            if not isinstance(op_id, str):
                raise KeyError(f"route {route.path} has no string operation_id")
            if op_id not in OPERATIONS:
                raise KeyError(f"route {route.path} ({op_id}) is not described in OPERATIONS")
            doc = inspect.cleandoc(handler.fn.__doc__ or op_id)
            summary, _, rest = doc.partition("\n")
            for method in sorted(handler.http_methods):
                if method in ("HEAD", "OPTIONS"):
                    continue
                paths.setdefault(route.path, {})[method.lower()] = _operation(
                    op_id,
                    summary,
                    rest.strip() or summary,
                    list(handler.resolve_tags()),
                )
    schemas = {cls.__name__: attrs_json_schema(cls) for cls in _SCHEMAS}
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "inference-wrapper",
            "version": version,
            "description": (
                "One OpenAI-compatible, measured, secure face over LLM engines. Errors are "
                'always `{"error": {"message", "type", "param", "code"}}`; every response '
                "carries `x-request-id`."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "BearerAuth": {"type": "http", "scheme": "bearer"},
            },
        },
        "tags": [
            {"name": "control plane", "description": "Load, unload and inspect the model (admin)"},
            {"name": "data plane", "description": "OpenAI-compatible inference"},
            {"name": "ops", "description": "Probes, metrics, telemetry and this document"},
        ],
    }


class OpenAPIController(Controller):
    """`/schema/openapi.json`: the API description (no key: it holds no secret and no setting)."""

    path = OPENAPI_PATH
    tags = ["ops"]  # noqa: RUF012

    @get("/", operation_id="openapi", name="ops:openapi")
    async def openapi(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """This OpenAPI 3.1 document (built once from the routes and the attrs schemas)."""
        state = request.app.state
        document = state.get("openapi_document")
        if document is None:
            document = build_openapi(request.app, version=package_version())
            state.openapi_document = document
        return json_response(document)
