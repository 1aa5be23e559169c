"""The adapter kit: shared policy every engine adapter uses instead of its own copy.

Modules: `params` (the engine-params allowlist, recursive, with bounds), `errors` (the one
engine-error-text cleaner: mask first, truncate after), `context` (the one context-length check
and `max_tokens` clamp). Adapters import from here; the kit imports only `schemas`.

Must never: import an engine, `service` or `registry`.
"""

from adapters.kit.errors import ERROR_TEXT_LIMIT, clean_error_text, no_mask
from adapters.kit.params import (
    AnyJson,
    Bool,
    Float,
    Int,
    Limits,
    ListOf,
    Name,
    Nullable,
    Obj,
    OneOf,
    ParamPolicy,
    ParamSpec,
    Refused,
    Reserved,
    check_bounds,
    valid_allow_entry,
)

__all__ = [
    "ERROR_TEXT_LIMIT",
    "AnyJson",
    "Bool",
    "Float",
    "Int",
    "Limits",
    "ListOf",
    "Name",
    "Nullable",
    "Obj",
    "OneOf",
    "ParamPolicy",
    "ParamSpec",
    "Refused",
    "Reserved",
    "check_bounds",
    "clean_error_text",
    "no_mask",
    "valid_allow_entry",
]
