"""Checking and scoping the `env` a load request injects into the engine's environment.

Engines read credentials (HF_TOKEN) and tuning knobs (VLLM_*) from the process environment, and
vLLM/SGLang start worker processes that inherit it, so the values must be in `os.environ` while
the engine is built and running. This module decides which keys may be set (the adapter's
allowlist from adapters.yaml, minus an always-refused list of keys that change how code is loaded
or where traffic goes) and puts the environment back exactly as it was at unload.

Must never: log or return an env value; accept a key because a request says so.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping

from schemas.errors import ParamsValidationError

#: keys no adapters.yaml entry can allow: they load code or redirect traffic
ALWAYS_REFUSED: tuple[str, ...] = (
    "LD_*",
    "PYTHON*",
    "PATH",
    "BASH_ENV",
    "ENV",
    "GLIBC_TUNABLES",
    "*_PROXY",
    "HF_ENDPOINT",
    "NODE_OPTIONS",
    "DYLD_*",
    "IW_*",
)

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_VALUE_BYTES = 32 * 1024


def _matches(key: str, patterns: Iterable[str]) -> bool:
    upper = key.upper()
    return any(fnmatch.fnmatchcase(upper, p.upper()) for p in patterns)


def is_refused(key: str) -> bool:
    """Whether `key` is on the always-refused list."""
    return _matches(key, ALWAYS_REFUSED)


def check_env(env: Mapping[str, str], allow: Iterable[str], backend: str) -> None:
    """Refuse any key that is malformed, always refused, or not on the backend's allowlist."""
    allow = tuple(allow)
    for key, value in env.items():
        param = f"$.env.{key}" if _KEY.fullmatch(key) else "$.env"
        if not _KEY.fullmatch(key):
            raise ParamsValidationError("env keys must be letters, digits and _", param=param)
        if _matches(key, ALWAYS_REFUSED):
            raise ParamsValidationError(
                f"env key {key} is never allowed", param=param, code="env_refused"
            )
        if not _matches(key, allow):
            raise ParamsValidationError(
                f"env key {key} is not allowed for backend '{backend}' "
                "(env_allow in adapters.yaml)",
                param=param,
                code="env_refused",
            )
        if "\x00" in value or len(value.encode()) > MAX_VALUE_BYTES:
            raise ParamsValidationError("env value is not acceptable", param=param)


class EnvScope:
    """Sets keys in `os.environ`; `restore()` puts back the whole environment as it was.

    The whole of it, not just our keys: engines write their own keys while they start (vLLM sets
    its worker start method and thread counts), and those must not outlive the engine either.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._saved: dict[str, str] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """Names of the keys this scope sets (names are not secret; values are)."""
        return tuple(sorted(self._env))

    def apply(self) -> None:
        """Set the keys, remembering what was there (a second apply keeps the first memory)."""
        if self._saved is None:
            self._saved = dict(os.environ)
        os.environ.update(self._env)

    def restore(self) -> None:
        """Remove keys added since `apply()`, put back changed ones (idempotent)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value

    def take_over(self, previous: EnvScope) -> None:
        """Inherit what `previous` must put back, after a swap that ran both engines at once.

        The new model's scope was applied over the old one's; once the old engine is gone, its
        own keys are put back and the new scope becomes the one that restores the environment
        from before either model (`previous.restore()` is then a no-op).
        """
        saved, previous._saved = previous._saved, None
        if saved is None:
            return
        for key in previous.keys:
            if key in self._env:
                continue
            if key in saved:
                os.environ[key] = saved[key]
            else:
                os.environ.pop(key, None)
        self._saved = saved
