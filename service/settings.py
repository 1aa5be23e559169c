"""Service settings: one frozen attrs class, read from `IW_*` environment variables.

Must never: log or render a key; `__repr__` hides them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from attrs import field, frozen

from adapters.bundled import default_cache_dir

__all__ = ["Settings", "SettingsError"]


class SettingsError(Exception):
    """An `IW_*` variable has a value the service cannot use."""


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@frozen
class Settings:
    """Everything an operator can set; defaults are safe for a laptop."""

    host: str = "127.0.0.1"
    """Interface to bind (`IW_HOST`)."""
    port: int = 8000
    """TCP port (`IW_PORT`)."""
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    """Keys for the control plane (`IW_ADMIN_KEY`, comma-separated)."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Keys for the data plane (`IW_API_KEY`, comma-separated); none = open data plane."""
    registry_path: Path = Path("adapters.yaml")
    """adapters.yaml location (`IW_REGISTRY`)."""
    model_roots: tuple[Path, ...] = ()
    """Folders local model paths must lie under (`IW_MODEL_ROOTS`, comma-separated)."""
    cache_dir: Path = field(factory=default_cache_dir)
    """Where bundled models are converted to (`IW_CACHE_DIR`)."""
    log_format: Literal["json", "text"] = "json"
    """`IW_LOG_FORMAT`: one JSON object per line, or plain text."""
    log_level: str = "INFO"
    """`IW_LOG_LEVEL`."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body (`IW_MAX_BODY_BYTES`); larger gets 413."""
    max_concurrency: int = 64
    """Generations running at once (`IW_MAX_CONCURRENCY`); more wait in the queue."""
    max_queue: int = 256
    """Requests waiting for a slot (`IW_MAX_QUEUE`); beyond that, 429."""
    max_tokens_cap: int = 32_768
    """Largest `max_tokens` a request may ask for (`IW_MAX_TOKENS`)."""
    max_messages: int = 1024
    """Largest number of messages in one request (`IW_MAX_MESSAGES`)."""
    drain_timeout_s: float = 20.0
    """Time unload and SIGTERM give in-flight requests (`IW_DRAIN_TIMEOUT_S`); below
    Kubernetes' 30 s grace period so that the unload after it still fits."""
    health_port: int | None = None
    """Also answer `GET /health` on this port from a thread of its own (`IW_HEALTH_PORT`), so
    that liveness stays fast when the event loop is busy with many streams."""
    stream_stall_s: float = 30.0
    """A response whose client accepts no bytes for this long is cut (`IW_STREAM_STALL_S`)."""
    metrics_open: bool = False
    """Serve `/metrics` without a key, for in-pod Prometheus scrapers (`IW_METRICS_OPEN`)."""
    watchdog_interval_s: float = 1.0
    """ResourceWatchdog sampling period (`IW_WATCHDOG_INTERVAL_S`)."""
    min_available_mib: float = 512.0
    """Available host RAM below this, sustained, makes /ready 503 (`IW_MIN_AVAILABLE_MIB`)."""
    telemetry_records: int = 1000
    """Per-request records kept for `GET /v1/telemetry` (`IW_TELEMETRY_RECORDS`)."""
    preload: str | None = None
    """Preset loaded at start-up (`IW_PRELOAD`)."""
    max_header_bytes: int = 64 * 1024
    """Largest request header block, request line included (`IW_MAX_HEADER_BYTES`); 431."""
    max_headers: int = 100
    """Most header fields in one request (`IW_MAX_HEADERS`); more gets 431."""
    header_timeout_s: float = 10.0
    """Time a client has to send a whole header block (`IW_HEADER_TIMEOUT_S`); then 408."""
    body_timeout_s: float = 60.0
    """Time a client has to send a whole body after its headers (`IW_BODY_TIMEOUT_S`); 408."""
    keepalive_s: float = 5.0
    """An idle keep-alive connection is closed after this (`IW_KEEPALIVE_S`)."""
    max_connections: int = 1024
    """Open connections at most (`IW_MAX_CONNECTIONS`); the next one gets 503 and is closed."""
    max_secrets: int = 1000
    """Secret values the masking store holds at most (`IW_MAX_SECRETS`); a load that would pass
    it is refused (422) rather than left unmasked."""
    audit_log: Path | None = None
    """File control-plane audit lines are appended to (`IW_AUDIT_LOG`, created 0600)."""

    @classmethod
    def from_env(  # noqa: C901  (one flat pass over the variables)
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Read `IW_*` variables; `overrides` (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def number(name: str, kind: type[int | float]) -> int | float | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return None
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name} must be a number, got {raw!r}") from None
            if not value > 0:  # also refuses NaN
                raise SettingsError(f"{name} must be positive")
            return value

        if "IW_HOST" in env:
            values["host"] = env["IW_HOST"]
        for attr, name, kind in [
            ("port", "IW_PORT", int),
            ("health_port", "IW_HEALTH_PORT", int),
            ("max_body_bytes", "IW_MAX_BODY_BYTES", int),
            ("max_concurrency", "IW_MAX_CONCURRENCY", int),
            ("max_queue", "IW_MAX_QUEUE", int),
            ("max_tokens_cap", "IW_MAX_TOKENS", int),
            ("max_messages", "IW_MAX_MESSAGES", int),
            ("telemetry_records", "IW_TELEMETRY_RECORDS", int),
            ("drain_timeout_s", "IW_DRAIN_TIMEOUT_S", float),
            ("stream_stall_s", "IW_STREAM_STALL_S", float),
            ("watchdog_interval_s", "IW_WATCHDOG_INTERVAL_S", float),
            ("min_available_mib", "IW_MIN_AVAILABLE_MIB", float),
            ("max_header_bytes", "IW_MAX_HEADER_BYTES", int),
            ("max_headers", "IW_MAX_HEADERS", int),
            ("header_timeout_s", "IW_HEADER_TIMEOUT_S", float),
            ("body_timeout_s", "IW_BODY_TIMEOUT_S", float),
            ("keepalive_s", "IW_KEEPALIVE_S", float),
            ("max_connections", "IW_MAX_CONNECTIONS", int),
            ("max_secrets", "IW_MAX_SECRETS", int),
        ]:
            parsed = number(name, kind)
            if parsed is not None:
                values[attr] = parsed
        values["admin_keys"] = _split(env.get("IW_ADMIN_KEY", ""))
        values["api_keys"] = _split(env.get("IW_API_KEY", ""))
        if env.get("IW_REGISTRY"):
            values["registry_path"] = Path(env["IW_REGISTRY"])
        values["model_roots"] = tuple(Path(p) for p in _split(env.get("IW_MODEL_ROOTS", "")))
        if env.get("IW_CACHE_DIR"):
            values["cache_dir"] = Path(env["IW_CACHE_DIR"]).expanduser()
        fmt = env.get("IW_LOG_FORMAT", "json").lower()
        if fmt not in ("json", "text"):
            raise SettingsError(f"IW_LOG_FORMAT must be json or text, got {fmt!r}")
        values["log_format"] = fmt
        values["log_level"] = env.get("IW_LOG_LEVEL", "INFO").upper()
        values["metrics_open"] = env.get("IW_METRICS_OPEN", "").lower() in ("1", "true", "yes")
        if env.get("IW_AUDIT_LOG"):
            values["audit_log"] = Path(env["IW_AUDIT_LOG"]).expanduser()
        if env.get("IW_PRELOAD"):
            values["preload"] = env["IW_PRELOAD"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not 0 < values.get("port", 8000) < 65536:
            raise SettingsError("IW_PORT must be between 1 and 65535")
        if not 0 < values.get("health_port", 1) < 65536:
            raise SettingsError("IW_HEALTH_PORT must be between 1 and 65535")
        if values.get("health_port") == values.get("port", 8000):
            raise SettingsError("IW_HEALTH_PORT must differ from IW_PORT")
        return cls(**values)
