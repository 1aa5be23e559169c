"""Audit log of control-plane calls: who (a key id), what, with which params, result, how long.

One JSON object per call, written to the `inference_wrapper.audit` logger (so it lands in the
service log, masked like every line) and, when `IW_AUDIT_LOG` names a file, appended to that file
too (created with mode 0600). `audit_middleware` wraps the control-plane controllers only, outside
their guards, so refused calls (401, 403) are recorded as well as accepted ones.

Fields: `ts`, `request_id`, `key_id` (the first 12 hex digits of the key's SHA-256, or null when
no key was sent), `client`, `method`, `path`, `action` (load, unload, validate, status,
adapters), `backend`, `preset`, `model`, `params` (engine params, served name, replace, drain
timeout, and env key *names*), `status` and `duration_ms`.

Must never: write a key, an env value or any registered secret (every line goes through the
secret store's `mask()` before it is written); block the event loop on anything but a short
append.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from registry.secrets import SecretStore
from service.context import context_of

__all__ = ["AUDIT_STATE_KEY", "AuditLog", "audit_middleware", "key_id", "note_request"]

logger = logging.getLogger("inference_wrapper.audit")

#: where the control-plane handler leaves the parsed request body for the audit line
AUDIT_STATE_KEY = "iw_audit_body"
_ACTIONS = {
    "/v1/model/load": "load",
    "/v1/model/unload": "unload",
    "/v1/model/validate": "validate",
    "/v1/model/status": "status",
    "/v1/adapters": "adapters",
}
_PARAM_FIELDS = ("engine_params", "served_model_name", "replace", "drain_timeout_s")


def key_id(headers: dict[str, str]) -> str | None:
    """A short, stable, non-reversible id of the key a request sent (never the key)."""
    key = headers.get("x-api-key")
    if not key:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.strip().partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else ""
    if not key:
        return None
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def note_request(scope: Scope, payload: Any) -> None:
    """Called by the control-plane handlers with the decoded body, for the audit line."""
    scope.setdefault("state", {})[AUDIT_STATE_KEY] = payload


def _summary(payload: Any) -> dict[str, Any]:
    """backend, preset, model and params of a body; env as key names only."""
    if not isinstance(payload, dict):
        return {}
    out: dict[str, Any] = {
        name: payload.get(name)
        for name in ("backend", "preset", "model")
        if isinstance(payload.get(name), str)
    }
    params = {name: payload[name] for name in _PARAM_FIELDS if name in payload}
    env = payload.get("env")
    if isinstance(env, dict):
        params["env_keys"] = sorted(str(k) for k in env)
    if params:
        out["params"] = params
    return out


class AuditLog:
    """Writes audit lines to the logger and, optionally, appends them to a 0600 file."""

    def __init__(self, secrets: SecretStore, path: Path | None = None) -> None:
        self.secrets = secrets
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            # 0600 at creation: the file names key ids and models, which are the operator's
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: dict[str, Any]) -> None:
        """Mask, then log and append one line."""
        line = self.secrets.mask(msgspec.json.encode(record).decode())
        logger.info(line)
        if self._fd is not None:
            with self._lock:
                os.write(self._fd, line.encode() + b"\n")

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _audit_log(scope: Scope) -> AuditLog:
    """The app's AuditLog, made on first use from its settings and secret store."""
    state = scope["app"].state
    audit: AuditLog | None = state.get("audit")
    if audit is None:
        audit = AuditLog(state.secrets, state.settings.audit_log)
        state.audit = audit
    return audit


def audit_middleware(app: ASGIApp) -> ASGIApp:
    """Litestar middleware for the control-plane controllers: one audit line per call."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500  # what the client sees if the app dies before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            path = scope["path"].rstrip("/") or "/"
            client = scope.get("client")
            record: dict[str, Any] = {
                "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "request_id": context_of(scope).request_id,
                "key_id": key_id(headers),
                "client": client[0] if client else None,
                "method": scope.get("method"),
                "path": path,
                "action": _ACTIONS.get(path, "other"),
                **_summary(scope.get("state", {}).get(AUDIT_STATE_KEY)),
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1e3, 2),
            }
            _audit_log(scope).write(record)

    return middleware
