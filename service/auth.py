"""API-key guards: admin keys for the control plane, API keys for the data plane.

Deny by default: every route has a guard except `/health` and `/ready`. A key is read from
`X-API-Key` or `Authorization: Bearer`, and compared with `hmac.compare_digest` against every
configured key (no early exit, so timing does not reveal which key or how much of it matched).
Admin keys also open the data plane and ops routes; API keys open the data plane and ops routes.
With no API key configured the data plane is open (the CLI says so loudly at start).

A refusal says which of four it is, by `code`: `missing_api_key` (no key in either header),
`malformed_authorization` (an Authorization header that is not `Bearer <key>`, e.g. the key
alone), `invalid_api_key` (401, a key that matches none) and `insufficient_permissions` (403, a
data-plane key on the control plane).

Guards are `async def`: Litestar runs a sync guard in a worker thread, a thread hop per request
(and a GIL hand-off of up to 5 ms when the event loop is busy). `service.datapath` checks the
chat route's key itself, from the raw ASGI headers, with the same `check_api`.

Must never: echo a presented key; log a header.
"""

from __future__ import annotations

import enum
import hmac

from attrs import frozen
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from schemas.errors import AuthenticationError, PermissionDeniedError

# the codes tell a program which refusal it got; the messages tell a person what to send
_HOW = "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
MALFORMED = "Authorization must be 'Bearer <key>' (or send the key alone in X-API-Key)"


class _NoKey(enum.Enum):
    """Why no key could be read: none sent, or an Authorization header not `Bearer <key>`."""

    MISSING = "missing"
    MALFORMED = "malformed"


@frozen
class KeyRing:
    """Configured keys, as bytes for `compare_digest`."""

    admin: tuple[bytes, ...]
    api: tuple[bytes, ...]
    metrics_open: bool = False

    @classmethod
    def from_keys(
        cls, admin: tuple[str, ...], api: tuple[str, ...], *, metrics_open: bool = False
    ) -> KeyRing:
        """Build from the settings' string keys."""
        return cls(tuple(k.encode() for k in admin), tuple(k.encode() for k in api), metrics_open)

    @property
    def data_plane_open(self) -> bool:
        """True when no API key is configured."""
        return not self.api


def _matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def presented_key(connection: ASGIConnection) -> bytes | None:  # type: ignore[type-arg]
    """The key a client sent, if any (None for a missing or malformed header)."""
    found = _read_key(connection)
    return found if isinstance(found, bytes) else None


def _read_key(connection: ASGIConnection) -> bytes | _NoKey:  # type: ignore[type-arg]
    return _key_from(connection.headers.get("x-api-key"), connection.headers.get("authorization"))


def read_key_raw(headers: list[tuple[bytes, bytes]]) -> bytes | _NoKey:
    """The key a client sent, from ASGI headers (lower-case names; the first of each counts)."""
    x_api_key = authorization = None
    for name, value in headers:
        if name == b"x-api-key" and x_api_key is None:
            x_api_key = value.decode("latin-1")
        elif name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    return _key_from(x_api_key, authorization)


def _key_from(x_api_key: str | None, auth: str | None) -> bytes | _NoKey:
    if x_api_key:
        return x_api_key.encode("latin-1")
    if auth is None or not auth.strip():
        return _NoKey.MISSING
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("latin-1")
    return _NoKey.MALFORMED


def _require_key(connection: ASGIConnection, kind: str) -> bytes:  # type: ignore[type-arg]
    return _checked(_read_key(connection), kind)


def _checked(found: bytes | _NoKey, kind: str) -> bytes:
    """The presented key, or 401 saying whether it is missing or the header is malformed."""
    if found is _NoKey.MISSING:
        raise AuthenticationError(f"no {kind}: {_HOW}", code="missing_api_key")
    if found is _NoKey.MALFORMED:
        raise AuthenticationError(MALFORMED, code="malformed_authorization")
    assert isinstance(found, bytes)  # noqa: S101  (narrowing for mypy)
    return found


def _ring(connection: ASGIConnection) -> KeyRing:  # type: ignore[type-arg]
    ring: KeyRing = connection.app.state.keyring
    return ring


async def require_admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Control plane: an admin key."""
    ring = _ring(connection)
    key = _require_key(connection, "admin key")
    if _matches(key, ring.admin):
        return
    if _matches(key, ring.api):
        raise PermissionDeniedError(
            "this key does not grant the control plane: use an admin key (IW_ADMIN_KEY)",
            code="insufficient_permissions",
        )
    raise AuthenticationError("invalid admin key: it matches no key in IW_ADMIN_KEY")


def check_api(ring: KeyRing, found: bytes | _NoKey) -> None:
    """Data plane: an API key or an admin key; open when no API key is configured."""
    if ring.data_plane_open:
        return
    key = _checked(found, "API key")
    # evaluate both so the time taken does not say which kind of key it was
    ok = _matches(key, ring.api) | _matches(key, ring.admin)
    if not ok:
        raise AuthenticationError(
            "invalid API key: it matches no key in IW_API_KEY (or IW_ADMIN_KEY)"
        )


async def require_api(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Data plane guard (`check_api`)."""
    ring = _ring(connection)
    if not ring.data_plane_open:
        check_api(ring, _read_key(connection))


async def require_ops(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Telemetry routes: any configured key (admin or API)."""
    ring = _ring(connection)
    key = _require_key(connection, "key")
    if not (_matches(key, ring.api) | _matches(key, ring.admin)):
        raise AuthenticationError("invalid key: it matches no key in IW_API_KEY or IW_ADMIN_KEY")


async def require_metrics(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """`/metrics`: open when IW_METRICS_OPEN is set, else like the other ops routes."""
    if _ring(connection).metrics_open:
        return
    await require_ops(connection, handler)
