"""API-key guards: admin keys for the control plane, API keys for the data plane.

Deny by default: every route has a guard except `/health` and `/ready`. A key is read from
`X-API-Key` or `Authorization: Bearer`, and compared with `hmac.compare_digest` against every
configured key (no early exit, so timing does not reveal which key or how much of it matched).
Admin keys also open the data plane and ops routes; API keys open the data plane and ops routes.
With no API key configured the data plane is open (the CLI says so loudly at start).

Must never: echo a presented key; log a header.
"""

from __future__ import annotations

import hmac

from attrs import frozen
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from schemas.errors import AuthenticationError, PermissionDeniedError

_AUTH_HINT = "provide a key in the X-API-Key header or as 'Authorization: Bearer <key>'"


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
    """The key a client sent, if any."""
    value = connection.headers.get("x-api-key")
    if value:
        return value.encode("latin-1")
    auth = connection.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("latin-1")
    return None


def _ring(connection: ASGIConnection) -> KeyRing:  # type: ignore[type-arg]
    ring: KeyRing = connection.app.state.keyring
    return ring


def require_admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Control plane: an admin key."""
    ring = _ring(connection)
    key = presented_key(connection)
    if key is None:
        raise AuthenticationError(f"missing admin key: {_AUTH_HINT}")
    if _matches(key, ring.admin):
        return
    if _matches(key, ring.api):
        raise PermissionDeniedError("this key does not grant the control plane")
    raise AuthenticationError("invalid admin key")


def require_api(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Data plane: an API key or an admin key; open when no API key is configured."""
    ring = _ring(connection)
    if ring.data_plane_open:
        return
    key = presented_key(connection)
    if key is None:
        raise AuthenticationError(f"missing API key: {_AUTH_HINT}")
    # evaluate both so the time taken does not say which kind of key it was
    ok = _matches(key, ring.api) | _matches(key, ring.admin)
    if not ok:
        raise AuthenticationError("invalid API key")


def require_ops(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Telemetry routes: any configured key (admin or API)."""
    ring = _ring(connection)
    key = presented_key(connection)
    if key is None:
        raise AuthenticationError(f"missing key: {_AUTH_HINT}")
    if not (_matches(key, ring.api) | _matches(key, ring.admin)):
        raise AuthenticationError("invalid key")


def require_metrics(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """`/metrics`: open when IW_METRICS_OPEN is set, else like the other ops routes."""
    if _ring(connection).metrics_open:
        return
    require_ops(connection, handler)
