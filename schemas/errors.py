"""The one error hierarchy of inference-wrapper, and the OpenAI error envelope it renders to.

Every error a client can cause or see is one of these; the service has one handler for the base
class. Messages are short and safe to show: no paths of ours, no stack traces, no secrets (the
raiser masks engine text through the secret store before it builds one of these).

    WrapperError                          500 server_error
    ├── InvalidRequestError               400 invalid_request_error
    │   ├── UnsupportedParameterError     400   code=unsupported_parameter
    │   ├── ParamsValidationError         422   code=invalid_params
    │   └── RequestTooLargeError          413   code=request_too_large
    ├── AuthenticationError               401 authentication_error  code=invalid_api_key |
    │                                         missing_api_key | malformed_authorization
    ├── PermissionDeniedError             403 permission_error      code=insufficient_permissions
    ├── NotFoundError                     404 not_found_error
    ├── ConflictError                     409 conflict_error
    ├── RateLimitError                    429 rate_limit_error
    ├── ServiceUnavailableError           503 service_unavailable   (Retry-After)
    │   └── InsufficientMemoryError       503   code=insufficient_memory
    ├── EngineError                       500 server_error          code=engine_error
    ├── UpstreamError                     502 upstream_error
    └── UpstreamTimeoutError              504 upstream_error        code=upstream_timeout
"""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import frozen


@frozen
class ErrorDetail:
    """The body of an OpenAI error: what clients (and the `openai` SDK) read."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


@frozen
class ErrorResponse:
    """`{"error": {...}}`, the envelope every failing response carries."""

    error: ErrorDetail


class WrapperError(Exception):
    """Base of every error the service reports to a client."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}
        # extra machine-readable figures (e.g. memory numbers of a refused load); never secrets
        self.details = details

    def to_response(self) -> ErrorResponse:
        """Render as the OpenAI error envelope."""
        return ErrorResponse(ErrorDetail(self.message, self.error_type, self.param, self.code))


class InvalidRequestError(WrapperError):
    """The request is malformed or names a value we cannot accept."""

    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    """A known parameter that the loaded adapter cannot honour: refused, never ignored."""

    default_code = "unsupported_parameter"


class ParamsValidationError(InvalidRequestError):
    """Engine params or a load request failed their schema."""

    status_code = 422
    default_code = "invalid_params"


class RequestTooLargeError(InvalidRequestError):
    """The body is larger than the configured limit."""

    status_code = 413
    default_code = "request_too_large"


class AuthenticationError(WrapperError):
    """No key (`missing_api_key`), a malformed header, or a key that matches none configured."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(WrapperError):
    """A valid key that does not grant this route."""

    status_code = 403
    error_type = "permission_error"
    default_code = "insufficient_permissions"


class NotFoundError(WrapperError):
    """An unknown route, backend, preset or model name."""

    status_code = 404
    error_type = "not_found_error"


class ConflictError(WrapperError):
    """The lifecycle state forbids this call now (a load/unload is running, a model is loaded)."""

    status_code = 409
    error_type = "conflict_error"


class RateLimitError(WrapperError):
    """Every generation slot and queue place is taken."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class ServiceUnavailableError(WrapperError):
    """No model is ready to serve (or the process is under memory pressure)."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_not_ready"


class InsufficientMemoryError(ServiceUnavailableError):
    """The watchdog estimates that the load would not fit in free memory."""

    default_code = "insufficient_memory"


class EngineError(WrapperError):
    """The engine failed: a load that raised, a generation that died."""

    default_code = "engine_error"


class UpstreamError(WrapperError):
    """An upstream OpenAI-compatible server failed or could not be reached."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    """An upstream server did not answer in time."""

    status_code = 504
    default_code = "upstream_timeout"
