"""Near-miss suggestions for unknown names: "did you mean 'max_model_len'?", and the known list.

One helper for every place a user can mistype a name (request fields, engine-param keys,
presets, backends), so that they all answer the same way: the closest known name by edit
distance (`difflib`), and the whole list when it is short enough to read.

Must never: echo an unbounded request string (names are cut to `NAME_LIMIT`); spend time on a
huge name (too long to be a typo of a known one, so no suggestion is searched for it).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: longest name we echo or compare; a name longer than this is not a typo of a field name
NAME_LIMIT = 64
#: lists of known names up to this length are shown in full
LIST_LIMIT = 10
_CUTOFF = 0.6  # difflib's default: 'smollm2' → 'smollm2-135m', 'dtyp' → 'dtype'


def shown(name: str) -> str:
    """`name` quoted for a message, cut to `NAME_LIMIT` characters."""
    if len(name) > NAME_LIMIT:
        name = name[: NAME_LIMIT - 1] + "…"
    return repr(name)


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name` (case-insensitive), or None when none is close."""
    if len(name) > NAME_LIMIT:
        return None
    by_lower: dict[str, str] = {}
    for k in known:
        by_lower.setdefault(k.lower(), k)
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=_CUTOFF)
    return by_lower[match[0]] if match else None


def hint(name: str, known: Iterable[str], *, list_known: bool = True) -> str:
    """`"did you mean 'x'?"`, then `"known: a, b"` when the list is short; "" when neither."""
    names = sorted(set(known))
    parts = []
    best = closest(name, names)
    if best is not None:
        parts.append(f"did you mean {best!r}?")
    if list_known and names and len(names) <= LIST_LIMIT:
        parts.append("known: " + ", ".join(names))
    return " ".join(parts)


def unknown(kind: str, name: str, known: Iterable[str], *, listed_by: str | None = None) -> str:
    """The whole message: `unknown preset 'smollm2'; did you mean 'smollm2-135m'? known: …`.

    `listed_by` names where the full list is (a route) when it is too long to show here.
    """
    names = sorted(set(known))
    more = hint(name, names)
    where = f" (all listed by {listed_by})" if listed_by and len(names) > LIST_LIMIT else ""
    return f"unknown {kind} {shown(name)}" + (f"; {more}" if more else "") + where


__all__ = ["LIST_LIMIT", "NAME_LIMIT", "closest", "hint", "shown", "unknown"]
