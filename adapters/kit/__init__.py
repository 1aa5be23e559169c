"""The adapter kit: shared policy every engine adapter uses instead of its own copy.

Modules: `params` (the engine-params allowlist, recursive, with bounds), `errors` (the one
engine-error-text cleaner: mask first, truncate after), `context` (the one context-length check
and `max_tokens` clamp). Adapters import from here; the kit imports only `schemas`.

Must never: import an engine, `service` or `registry`.
"""
