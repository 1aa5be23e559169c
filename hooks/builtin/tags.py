"""`header_tags`: label requests by an allowlisted header (a tenant, a client app).

The value becomes a tag in the request's telemetry record and a label of the
`iw_request_tags_total{tag,value}` series, so its cardinality is bounded here: a value outside
the allowlist, one that is not a plain token, or one beyond the first `max_distinct` seen becomes
`other`.

Must never: read a credential header (refused at start-up; the service hides them from hooks
anyway); let a client grow the metric label space.
"""

from __future__ import annotations

import re
import threading
from typing import Any, ClassVar

from attrs import field, frozen

from hooks.base import HIDDEN_HEADERS, MAX_TAGS, Hook, HookCall, HookSetup
from schemas.generation import GenerationRequest
from schemas.validators import FieldValueError, in_range

OTHER = "other"
_HEADER = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_TAG = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")
_VALUE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@frozen
class TagRule:
    """How one header becomes a tag."""

    tag: str | None = None
    """Tag name (default: the header name with - as _)."""
    allow: tuple[str, ...] = ()
    """Values kept as they are; any other is `other`. Empty: the first max_distinct values."""
    max_distinct: int = field(default=16, validator=in_range(1, 1000))
    """With no allowlist, distinct values kept before the rest become `other`."""


def _rules(_: Any, attribute: Any, value: dict[str, TagRule]) -> None:
    if not value:
        raise FieldValueError(attribute.name, "headers needs at least 1 item")
    if len(value) > MAX_TAGS:
        raise FieldValueError(attribute.name, f"headers has more than {MAX_TAGS} items")
    for name, rule in value.items():
        if not _HEADER.fullmatch(name):
            raise FieldValueError(attribute.name, f"header {name!r} must be lowercase")
        if name in HIDDEN_HEADERS:
            raise FieldValueError(attribute.name, f"header {name!r} carries credentials")
        tag = rule.tag or name.replace("-", "_")
        if not _TAG.fullmatch(tag):
            raise FieldValueError(attribute.name, f"tag {tag!r} must be a lowercase identifier")
        for v in rule.allow:
            if not _VALUE.fullmatch(v):
                raise FieldValueError(attribute.name, f"allowed value {v!r} is not a plain token")


@frozen
class HeaderTagsParams:
    """Headers to copy into tags."""

    headers: dict[str, TagRule] = field(validator=_rules)
    """Header name (lowercase) → its rule."""


class HeaderTagsHook(Hook):
    """Copy allowlisted request headers into telemetry tags, with bounded cardinality."""

    params_type: ClassVar[type[Any]] = HeaderTagsParams

    def __init__(self, params: Any, setup: HookSetup) -> None:
        super().__init__(params, setup)
        p: HeaderTagsParams = params
        self.rules = [
            (name, rule.tag or name.replace("-", "_"), frozenset(rule.allow), rule.max_distinct)
            for name, rule in p.headers.items()
        ]
        self._seen: dict[str, set[str]] = {tag: set() for _, tag, _, _ in self.rules}
        self._lock = threading.Lock()

    def value_of(self, tag: str, allow: frozenset[str], limit: int, raw: str) -> str:
        """The label value a raw header value becomes."""
        if allow:
            return raw if raw in allow else OTHER
        if not _VALUE.fullmatch(raw):
            return OTHER
        seen = self._seen[tag]
        if raw in seen:
            return raw
        with self._lock:
            if len(seen) < limit:
                seen.add(raw)
                return raw
        return OTHER

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Tag the request; the request itself is unchanged."""
        for header, tag, allow, limit in self.rules:
            raw = call.headers.get(header)
            if raw is not None:
                call.tags[tag] = self.value_of(tag, allow, limit, raw)
        return None
