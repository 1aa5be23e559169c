"""The process-wide store of secret values, and the masking every outward text goes through.

API keys, operator-configured secrets and the `env` values of accepted loads are registered here.
Log handlers, error builders and status renderers call `mask()` on their final text; the match
covers the raw value and the forms it takes once JSON- or URL-encoded, so a secret inside a JSON
log line or a URL is caught too.

Cost, because `mask()` runs on every log line, on the event loop and in worker threads: the store
keeps an index from the first `MIN_SECRET_LEN` characters of every form to the forms that start
with them. Masking a line takes its set of `MIN_SECRET_LEN`-character windows (built in C by
`map`/`set`), intersects it with the index (C again) and only looks closer at the windows that
hit: the work per line grows with the line, not with the number of secrets. Registering a value
touches only that value's own forms, so adding never rebuilds anything that grows with the store.
A small store (up to `_REGEX_FORMS` forms, the usual case: a couple of keys and a token) is
faster still as one compiled alternation, whose size that bound also caps.

The store is bounded (`max_secrets`, `IW_MAX_SECRETS`): request-driven registrations past the
bound are refused with a 422 naming the setting, so that reaching it can never mean that a value
goes unmasked. Operator-configured values (`add`) are always taken.

Must never: log, return or store anything but the secrets themselves; keep a short value (under
`MIN_SECRET_LEN` characters) as a pattern, because masking "1" would destroy every log line while
protecting nothing a guesser could not find; stop masking a value once registered.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from schemas.errors import ParamsValidationError

__all__ = ["MASK", "MIN_SECRET_LEN", "SecretStore", "SecretStoreFullError"]

MASK = "***"
MIN_SECRET_LEN = 4
#: up to this many forms one compiled alternation is cheaper per line than the window index
_REGEX_FORMS = 120


class SecretStoreFullError(ParamsValidationError):
    """A load would register more secrets than `IW_MAX_SECRETS` allows."""

    default_code = "too_many_secrets"


def _forms(value: str) -> set[str]:
    """Every form the value takes in our outputs.

    Raw, JSON (ASCII-escaped as the stdlib writes it, raw UTF-8 as msgspec does), Python's
    `repr` and `ascii` escapes (error messages quote a field's value with `!r`), and the URL
    encodings clients and libraries use.
    """
    return {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        ascii(value)[1:-1],
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
    }


class SecretStore:
    """Thread-safe, bounded set of secret strings with masking whose cost does not grow with it."""

    def __init__(self, max_secrets: int = 1000, *, regex_forms: int = _REGEX_FORMS) -> None:
        self.max_secrets = max_secrets
        self.regex_forms = regex_forms
        """Up to this many forms, one compiled alternation masks (0: always the window index)."""
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._forms: set[str] = set()
        # window → forms starting with it, longest first; lists are replaced, never mutated, so
        # a reader in another thread always sees a consistent one
        self._index: dict[str, tuple[str, ...]] = {}
        # the index's keys as a set: intersecting with a set walks the smaller side
        self._windows: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        """Register an operator-configured secret (an API key, a server env value); no bound."""
        self._register([value], bounded=False)

    def add_many(self, values: Iterable[str]) -> None:
        """Register request-supplied values at once; past `max_secrets`, register none and 422."""
        self._register(list(values), bounded=True)

    def _register(self, values: list[str], *, bounded: bool) -> None:
        with self._lock:
            fresh = {
                v for v in values if len(v) >= MIN_SECRET_LEN and v not in self._values
            }  # short values are ignored (see module docstring)
            if not fresh:
                return
            if bounded and len(self._values) + len(fresh) > self.max_secrets:
                raise SecretStoreFullError(
                    f"this load would hold more than {self.max_secrets} secret values; raise "
                    "IW_MAX_SECRETS or restart the service to clear old ones",
                    param="$.env",
                )
            changed: dict[str, set[str]] = {}
            for value in fresh:
                self._values.add(value)
                for form in _forms(value) - self._forms:
                    self._forms.add(form)
                    changed.setdefault(form[:MIN_SECRET_LEN], set()).add(form)
            for window, forms in changed.items():
                merged = {*self._index.get(window, ()), *forms}
                self._index[window] = tuple(sorted(merged, key=len, reverse=True))
                self._windows.add(window)
            if len(self._forms) <= self.regex_forms:
                # longest first so a secret that contains another is masked whole
                ordered = sorted(self._forms, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(f) for f in ordered))
            else:
                self._pattern = None

    def __contains__(self, value: object) -> bool:
        return value in self._values

    @property
    def count(self) -> int:
        """How many secrets are registered (no `__len__`: an empty store must stay truthy)."""
        return len(self._values)

    def mask(self, text: str) -> str:
        """Return `text` with every registered secret replaced by `***`."""
        if not text or not self._forms:
            return text
        pattern = self._pattern
        if pattern is not None:
            return pattern.sub(MASK, text)
        return self._mask_indexed(text)

    def _mask_indexed(self, text: str) -> str:
        index = self._index
        n = MIN_SECRET_LEN
        if len(text) < n:
            return text
        # all n-character windows of the line; most lines share none with the index, and a
        # set intersection walks the smaller of the two sets (the line's, for a big store)
        hits = {text[i : i + n] for i in range(len(text) - n + 1)} & self._windows
        if not hits:
            return text
        starts: list[int] = []
        for window in hits:
            at = text.find(window)
            while at >= 0:
                starts.append(at)
                at = text.find(window, at + 1)
        starts.sort()
        out: list[str] = []
        cursor = 0
        for at in starts:
            if at < cursor:
                continue  # inside a secret already masked (leftmost wins, as a regex would)
            for form in index[text[at : at + n]]:  # longest first
                if text.startswith(form, at):
                    out.append(text[cursor:at])
                    out.append(MASK)
                    cursor = at + len(form)
                    break
        if not out:
            return text
        out.append(text[cursor:])
        return "".join(out)
