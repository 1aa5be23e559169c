"""Exception → OpenAI error envelope, one handler per base class; JSON responses.

Every failure leaves as `{"error": {"message", "type", "param", "code"}}` with the right status:
our own `WrapperError`s as they are, Litestar's HTTP exceptions (unknown route, wrong method, body
too large) mapped onto the same envelope, and anything unexpected as a 500 whose message holds
only the request id; the traceback goes to the (masked) log.

Must never: put exception text of an unexpected error, a path or a stack trace into a response.
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Callable
from itertools import accumulate
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
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", None),
}


#: deepest JSON nesting a request body may have; real requests stay under ten
MAX_JSON_DEPTH = 64
#: a JSON string, unrolled so that it matches in one pass without backtracking
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: opening brackets become +1, closing ones -1 (as signed bytes); everything else is deleted
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class UnsupportedMediaTypeError(InvalidRequestError):
    """A POST body that is not declared `application/json`."""

    status_code = 415
    default_code = "unsupported_media_type"


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings skipped, all in C-speed passes.

    A body with fewer brackets than the limit cannot be deeper than it, so most bodies stop at
    the counts.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    steps = array("b", _JSON_STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def require_json_body(content_type: str | None, raw: bytes) -> None:
    """415 unless a body is declared `application/json` (parameters such as charset allowed).

    Browsers send `text/plain` and form bodies cross-origin without a preflight; refusing them
    keeps a web page from driving a wrapper on localhost. An empty body with no type is fine
    (`POST /v1/model/unload` needs none).
    """
    if content_type is None or not content_type.strip():
        if not raw.strip():
            return
        media = ""
    else:
        media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json", param="Content-Type"
        )


def decode_json(raw: bytes) -> Any:
    """Parse a request body; anything that is not JSON is a 400, never a 500.

    Nesting deeper than `MAX_JSON_DEPTH` is refused before decoding: every later step (the
    converter, masking, rendering) walks the value recursively. msgspec raises more than
    `DecodeError`: invalid UTF-8 inside a string is a `UnicodeDecodeError`.
    """
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidRequestError(
            f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        )
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


def wrapper_error_payload(
    mask: Callable[[str], str], exc: WrapperError
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, envelope and headers of one of our errors (message and param masked once more)."""
    # `param` too: a field path quotes the request's own keys (an engine_params key may be one)
    param = mask(exc.param) if exc.param is not None else None
    detail = ErrorDetail(mask(exc.message), exc.error_type, param, exc.code)
    if exc.status_code >= 500 and exc.status_code != 503:  # 503 is routine (loading, not ready)
        logger.warning("request failed: %s (%s)", detail.message, exc.code)
    body: dict[str, Any] = {"error": unstructure(detail)}
    if exc.details:  # figures only (a refused load's memory numbers), never text
        body["error"]["details"] = exc.details
    return exc.status_code, body, exc.headers


def handle_wrapper_error(request: Request[Any, Any, Any], exc: WrapperError) -> Response[bytes]:
    """Our own errors: status, type, param and code as raised; message masked once more."""
    status, body, headers = wrapper_error_payload(_secrets(request).mask, exc)
    return json_response(body, status, headers or None)


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
        415: "Content-Type must be application/json",
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
