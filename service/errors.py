"""Exception → OpenAI error envelope, one handler per base class; JSON responses.

Every failure leaves as `{"error": {"message", "type", "param", "code"}}` with the right status:
our own `WrapperError`s as they are, Litestar's HTTP exceptions (unknown route, wrong method, body
too large) mapped onto the same envelope, and anything unexpected as a 500 whose message holds
only the request id; the traceback goes to the (masked) log.

Must never: put exception text of an unexpected error, a path or a stack trace into a response.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from registry.secrets import SecretStore
from schemas.converter import unstructure
from schemas.errors import ErrorDetail, ErrorResponse, InvalidRequestError, WrapperError
from service.context import context_of

logger = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", None),
}


def decode_json(raw: bytes) -> Any:
    """Parse a request body; anything that is not JSON is a 400, never a 500.

    msgspec raises more than `DecodeError`: invalid UTF-8 inside a string is a
    `UnicodeDecodeError`, nesting a few thousand levels deep a `RecursionError`.
    """
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("request body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None


def json_response(
    payload: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    """Encode attrs instances (via the converter) or builtins with msgspec."""
    body = msgspec.json.encode(unstructure(payload))
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def error_response(
    detail: ErrorDetail, status_code: int, headers: dict[str, str] | None = None
) -> Response[bytes]:
    """The envelope as a response."""
    return json_response(ErrorResponse(detail), status_code, headers)


def _secrets(request: Request[Any, Any, Any]) -> SecretStore:
    store: SecretStore = request.app.state.secrets
    return store


def handle_wrapper_error(request: Request[Any, Any, Any], exc: WrapperError) -> Response[bytes]:
    """Our own errors: status, type, param and code as raised; message masked once more."""
    mask = _secrets(request).mask
    detail = ErrorDetail(mask(exc.message), exc.error_type, exc.param, exc.code)
    if exc.status_code >= 500 and exc.status_code != 503:  # 503 is routine (loading, not ready)
        logger.warning("request failed: %s (%s)", detail.message, exc.code)
    body: dict[str, Any] = {"error": unstructure(detail)}
    if exc.details:  # figures only (a refused load's memory numbers), never text
        body["error"]["details"] = exc.details
    return json_response(body, exc.status_code, exc.headers or None)


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own exceptions (routing, method, body size) in our envelope."""
    status = exc.status_code
    error_type, code = _HTTP_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    message = {
        404: f"no route for {request.method} {request.url.path}",
        405: f"method {request.method} is not allowed on {request.url.path}",
        413: "request body is larger than the configured limit (IW_MAX_BODY_BYTES)",
    }.get(status, _secrets(request).mask(str(exc.detail)))
    headers = dict(exc.headers) if exc.headers else None
    return error_response(ErrorDetail(message, error_type, None, code), status, headers)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """A bug or an engine failure nobody classified: 500, details only in the log."""
    rid = context_of(request.scope).request_id
    logger.error("unhandled error", exc_info=exc)
    detail = ErrorDetail(
        f"internal error (request id {rid}); see the service log", "server_error", None, None
    )
    return error_response(detail, 500)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    WrapperError: handle_wrapper_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
