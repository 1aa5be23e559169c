"""Engine params as an allowlist, recursively: the one checker every adapter's `extra` goes through.

An engine takes hundreds of arguments, and some of them import code (`worker_cls`,
`reasoning_parser_plugin`), read files or folders (`download_dir`, `speculative_config.model`) or
reach hosts (`kv_transfer_config`). A denylist of top-level keys misses the nested ones and every
key a new engine release adds, so this module inverts it: an adapter declares a `ParamSpec` tree
(`Obj` of typed fields, nested `Obj`s for dict-valued args) and `ParamPolicy.check()` accepts a
payload only when every key path in it is declared there and every value fits its declared type.

- `Refused(reason)` marks a key the engine knows but this service does not pass on: one that
  names a module, class, file, folder, URL or plugin. The operator may opt in per backend with
  `extra_allow: [key]` (or a dotted path, `compilation_config.backend`) in adapters.yaml; an
  opted-in value is still bounded (`AnyJson`).
- `Reserved(reason)` marks a key that is set elsewhere (a typed param, the adapter itself) and can
  never be opted into.
- Anything else is unknown: 422 `unknown_param`, with the closest declared name as a hint.
- Before any schema is looked at, the whole payload is walked once, iteratively, against
  `Limits` (depth, string length, items per list/object, nodes in all): a 400-deep value is a 422
  here and never reaches a recursive function elsewhere (masking, unstructuring, the engine).
- A string where an `Obj(json_string=True)` is declared is parsed as JSON (engines parse such
  strings themselves) and checked with the same schema; the parsed value is what is passed on.

Must never: let a value through that no spec declared (no `dict[str, Any]` reaches an engine
unchecked); recurse deeper than `Limits.max_depth`; echo a value in an error (values can be
secrets; keys and paths are shown).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from attrs import frozen

from schemas.errors import ParamsValidationError

__all__ = [
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
    "valid_allow_entry",
]

#: error codes a client can act on (the message says which key and why)
REFUSED = "param_refused"
UNKNOWN = "unknown_param"
LIMIT = "param_limit"
_ALLOW_ENTRY = re.compile(r"^[a-z_][a-z0-9_]{0,63}(\.[a-z_][a-z0-9_]{0,63}){0,7}$")


@frozen
class Limits:
    """Bounds every nested value of an engine-params payload obeys, declared or not."""

    max_depth: int = 8
    """Containers (objects/lists) nested inside the payload's top level."""
    max_string: int = 4096
    """Characters in one string (a JSON-string arg counts as one string before parsing)."""
    max_items: int = 256
    """Entries in one object or list."""
    max_nodes: int = 4096
    """Values in the whole payload."""
    max_key: int = 128
    """Characters in one object key."""


DEFAULT_LIMITS = Limits()


def _refuse(message: str, path: str, code: str | None = None) -> ParamsValidationError:
    return ParamsValidationError(message, param=path, code=code)


def _kind(value: Any) -> str:
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        ((list, tuple), "an array"),
        (Mapping, "an object"),
    )
    if value is None:
        return "null"
    return next((name for t, name in kinds if isinstance(value, t)), "an unsupported value")


def check_bounds(value: Any, path: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Walk `value` once, iteratively, and refuse anything over `limits` or not plain JSON."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    nodes = 0
    while stack:
        item, where, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise _refuse(f"too many values (at most {limits.max_nodes} in all)", path, LIMIT)
        if isinstance(item, Mapping | list | tuple):
            stack.extend(_children(item, where, depth, limits))
        else:
            _check_leaf(item, where, limits)


def _children(
    item: Mapping[Any, Any] | list[Any] | tuple[Any, ...], where: str, depth: int, limits: Limits
) -> list[tuple[Any, str, int]]:
    if depth >= limits.max_depth:
        raise _refuse(f"nested deeper than {limits.max_depth} levels", where, LIMIT)
    if len(item) > limits.max_items:
        raise _refuse(f"more than {limits.max_items} entries", where, LIMIT)
    if not isinstance(item, Mapping):
        return [(sub, f"{where}[{i}]", depth + 1) for i, sub in enumerate(item)]
    out = []
    for key, sub in item.items():
        if not isinstance(key, str) or len(key) > limits.max_key:
            raise _refuse(
                f"object keys must be strings of at most {limits.max_key} characters",
                where,
                LIMIT,
            )
        out.append((sub, f"{where}.{key}", depth + 1))
    return out


def _check_leaf(item: Any, where: str, limits: Limits) -> None:
    if isinstance(item, str):
        if len(item) > limits.max_string:
            raise _refuse(f"string longer than {limits.max_string} characters", where, LIMIT)
    elif item is not None and not isinstance(item, bool | int | float):
        raise _refuse(f"expected a JSON value, got {_kind(item)}", where)
    elif isinstance(item, float) and not math.isfinite(item):
        raise _refuse("numbers must be finite", where)


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    return f"at least {lo:g}" if lo is not None else f"at most {hi:g}"


@frozen
class _Ctx:
    """What a check needs besides the value: the opted-in paths and the limits."""

    allow: frozenset[str]
    limits: Limits


class ParamSpec:
    """One declared value; `check` returns the value to pass on or raises a 422."""

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """Check `value` at `path` (`rel`: its dotted path inside the payload, for opt-ins)."""
        raise NotImplementedError


@frozen
class Int(ParamSpec):
    """An integer in `[lo, hi]`."""

    lo: int | None = None
    hi: int | None = None

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """An int (not a bool) within the bounds."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(f"expected an integer, got {_kind(value)}", path)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise _refuse(f"must be {_bounds(self.lo, self.hi)}", path)
        return value


@frozen
class Float(ParamSpec):
    """A finite number in `[lo, hi]`."""

    lo: float | None = None
    hi: float | None = None

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """An int or float (not a bool) within the bounds."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(f"expected a number, got {_kind(value)}", path)
        if not math.isfinite(value) or (
            (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi)
        ):
            raise _refuse(f"must be {_bounds(self.lo, self.hi)}", path)
        return value


@frozen
class Bool(ParamSpec):
    """`true` or `false`."""

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """A JSON boolean, nothing truthy."""
        if not isinstance(value, bool):
            raise _refuse(f"expected a boolean, got {_kind(value)}", path)
        return value


@frozen
class OneOf(ParamSpec):
    """One of a fixed set of strings (or ints): an engine's choice list."""

    choices: frozenset[str | int]

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """A member of `choices` (the message lists them; they are not secrets)."""
        # only strings and ints can be members (a dict is unhashable, a bool would equal 0/1)
        if isinstance(value, bool) or not isinstance(value, str | int) or value not in self.choices:
            shown = ", ".join(sorted(str(c) for c in self.choices))
            raise _refuse(f"must be one of: {shown}", path)
        return value


@frozen
class Name(ParamSpec):
    """A short identifier-like string (an op or layer name), never a path, module or URL."""

    pattern: str = r"[A-Za-z0-9_+\-]{1,64}"

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """A string matching `pattern` in full."""
        if not isinstance(value, str) or not re.fullmatch(self.pattern, value):
            raise _refuse("expected a short name (letters, digits, _, +, -)", path)
        return value


@frozen
class Nullable(ParamSpec):
    """`null` or the inner spec."""

    inner: ParamSpec

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """None passes; anything else is the inner spec's."""
        return None if value is None else self.inner.check(value, path, rel, ctx)


@frozen
class ListOf(ParamSpec):
    """A list whose every item fits `item`."""

    item: ParamSpec
    max_items: int = 256

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """A JSON array of at most `max_items` checked items."""
        if not isinstance(value, list | tuple):
            raise _refuse(f"expected an array, got {_kind(value)}", path)
        if len(value) > self.max_items:
            raise _refuse(f"at most {self.max_items} items", path, LIMIT)
        return [self.item.check(v, f"{path}[{i}]", rel, ctx) for i, v in enumerate(value)]


@frozen
class AnyJson(ParamSpec):
    """Any JSON value within the limits: only for keys the operator opted in to."""

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """Bounded already by `check_bounds`; passed on as given."""
        return value


@frozen
class Refused(ParamSpec):
    """A key that names code, a file, a folder, a host or a plugin: refused unless opted in."""

    reason: str
    opt_in: ParamSpec = AnyJson()
    """What the value is checked as once the operator allowed the key."""

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """Refused (422 `param_refused`) unless `rel` (or a parent) is in the backend's allow."""
        if _allowed(rel, ctx.allow):
            return self.opt_in.check(value, path, rel, ctx)
        raise _refuse(
            f"{rel} is not allowed: it {self.reason} (an operator can allow it with "
            "extra_allow in adapters.yaml)",
            path,
            REFUSED,
        )


@frozen
class Reserved(ParamSpec):
    """A key set elsewhere (a typed param, the adapter); no opt-in."""

    reason: str

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """Always refused."""
        raise _refuse(f"{rel} cannot be set here: {self.reason}", path, REFUSED)


def _allowed(rel: str, allow: Collection[str]) -> bool:
    parts = rel.split(".")
    return any(".".join(parts[: i + 1]) in allow for i in range(len(parts)))


@frozen
class Obj(ParamSpec):
    """An object with declared keys only; `json_string`: a JSON string of it is parsed first."""

    fields: Mapping[str, ParamSpec]
    json_string: bool = False

    def check(self, value: Any, path: str, rel: str, ctx: _Ctx) -> Any:
        """Every key declared (or opted in), every value checked; returns the checked copy."""
        if isinstance(value, str) and self.json_string:
            value = _parse_json(value, path, ctx.limits)
        if not isinstance(value, Mapping):
            raise _refuse(f"expected an object, got {_kind(value)}", path)
        out: dict[str, Any] = {}
        for key, sub in value.items():
            sub_rel = f"{rel}.{key}" if rel else key
            sub_path = f"{path}.{key}"
            spec = self.fields.get(key)
            if spec is None:
                close = difflib.get_close_matches(key, sorted(self.fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise _refuse(
                    f"'{sub_rel}' is not an allowed engine argument{hint}", sub_path, UNKNOWN
                )
            out[key] = spec.check(sub, sub_path, sub_rel, ctx)
        return out


def _parse_json(text: str, path: str, limits: Limits) -> Any:
    """A JSON-string arg, parsed the way the engine would, then bounded like any value."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise _refuse("not a valid JSON object", path) from None
    check_bounds(parsed, path, limits)
    return parsed


@frozen
class ParamPolicy:
    """One engine's allowlist: the `Obj` of its `extra` and the limits; see the module doc."""

    engine: str
    spec: Obj
    limits: Limits = DEFAULT_LIMITS

    def check(
        self,
        extra: Mapping[str, Any],
        *,
        allow: Collection[str] = (),
        path: str = "$.engine_params.extra",
    ) -> dict[str, Any]:
        """Bound, then check `extra` against the spec; return what may be passed to the engine.

        Raises `ParamsValidationError` (422) naming the key path: `param_refused` for a key
        that is refused or reserved, `unknown_param` for one not declared, `param_limit` for a
        value over the limits.
        """
        check_bounds(extra, path, self.limits)
        checked: dict[str, Any] = self.spec.check(
            extra, path, "", _Ctx(frozenset(allow), self.limits)
        )
        return checked

    def check_allow_entry(self, entry: str) -> None:
        """Raise `ValueError` unless `entry` (an `extra_allow` item) opts in to a refused key.

        Run at start-up, so a typo in adapters.yaml stops the service instead of silently
        allowing nothing; keys that are allowed already or reserved are refused too.
        """
        if not valid_allow_entry(entry):
            raise ValueError(f"{entry!r} is not an engine argument name or dotted path")
        spec: ParamSpec = self.spec
        parts = entry.split(".")
        for depth, part in enumerate(parts):
            fields = spec.fields if isinstance(spec, Obj) else {}
            if part not in fields:
                close = difflib.get_close_matches(part, sorted(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                where = ".".join(parts[: depth + 1])
                raise ValueError(f"{self.engine} has no refused argument {where!r}{hint}")
            spec = fields[part]
            if isinstance(spec, Refused):
                return
            reserved = spec.reason if isinstance(spec, Reserved) else None
            if reserved is not None:
                raise ValueError(f"{entry!r} cannot be allowed: {reserved}")
        raise ValueError(f"{entry!r} is allowed already; extra_allow is for refused keys only")


def valid_allow_entry(entry: str) -> bool:
    """Whether `entry` is a well-formed `extra_allow` item (a key or dotted key path)."""
    return bool(_ALLOW_ENTRY.fullmatch(entry))
