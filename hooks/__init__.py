"""Custom request/response logic configured in adapters.yaml (README, "Custom logic (hooks)").

The public surface a hook package imports: subclass `Hook`, give it a frozen attrs `params_type`,
override the points it needs. `hooks.chain` runs them; `hooks.builtin` holds the built-ins.
"""

from __future__ import annotations

from hooks.base import (
    REFUSAL_STATUSES,
    ChunkKind,
    Exchange,
    Hook,
    HookCall,
    HookFailedError,
    HookSetup,
    NoParams,
)

__all__ = [
    "REFUSAL_STATUSES",
    "ChunkKind",
    "Exchange",
    "Hook",
    "HookCall",
    "HookFailedError",
    "HookSetup",
    "NoParams",
]
