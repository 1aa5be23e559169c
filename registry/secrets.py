"""The process-wide store of secret values, and the masking every outward text goes through.

API keys and every `env` value of a load are registered here. Log handlers, error builders and
status renderers call `mask()` on their final text; the match covers the raw value and the forms
it takes once JSON- or URL-encoded, so a secret inside a JSON log line or a URL is caught too.

Must never: log, return or store anything but the secrets themselves; keep a short value (under
`MIN_SECRET_LEN` characters) as a pattern, because masking "1" would destroy every log line while
protecting nothing a guesser could not find.
"""

from __future__ import annotations

import json
import re
import threading
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET_LEN = 4


class SecretStore:
    """Thread-safe set of secret strings with a compiled masking pattern."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        """Register a secret; short values are ignored (see module docstring)."""
        if len(value) < MIN_SECRET_LEN:
            return
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            self._pattern = self._compile(self._values)

    def __contains__(self, value: object) -> bool:
        return value in self._values

    @property
    def count(self) -> int:
        """How many secrets are registered (no `__len__`: an empty store must stay truthy)."""
        return len(self._values)

    @staticmethod
    def _compile(values: set[str]) -> re.Pattern[str]:
        forms: set[str] = set()
        for value in values:
            # every form the value takes in our outputs: raw, JSON (ASCII-escaped as the stdlib
            # writes it, raw UTF-8 as msgspec does), and the URL encodings clients and libraries use
            forms.add(value)
            forms.add(json.dumps(value)[1:-1])
            forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
            forms.add(quote(value, safe=""))
            forms.add(quote(value))
            forms.add(quote_plus(value))
        # longest first so a secret that contains another is masked whole
        ordered = sorted(forms, key=len, reverse=True)
        return re.compile("|".join(re.escape(f) for f in ordered))

    def mask(self, text: str) -> str:
        """Return `text` with every registered secret replaced by `***`."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)
