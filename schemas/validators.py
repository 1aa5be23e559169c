"""attrs validators whose failures name their field, so errors point at `$.engine_params.x`.

attrs runs validators inside `__init__`, after cattrs has structured every field, so cattrs cannot
tell which field a validator's `ValueError` belongs to. These raise `FieldValueError`, which
carries the field name; `schemas.converter` turns it into the field's path. Use them (not
`attrs.validators.ge` and friends) on every request and params class. Messages are the reason
alone (`must be at least 1`): the converter's renderer names the field, once.

Must never: put the offending value in the message when it could be a secret (only numbers and
enum members are echoed).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any


class FieldValueError(ValueError):
    """A validator's refusal, tagged with the field it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


Validator = Callable[[Any, Any, Any], None]


def in_range(lo: float | None = None, hi: float | None = None) -> Validator:
    """`lo <= value <= hi` (either bound optional); `None` values pass."""

    def check(_: Any, attribute: Any, value: float | None) -> None:
        if value is None:
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                bounds = f"between {lo:g} and {hi:g}"
            elif lo is not None:
                bounds = f"at least {lo:g}"
            else:
                bounds = f"at most {hi:g}"
            raise FieldValueError(attribute.name, f"must be {bounds}")

    # read by schemas.jsonschema, so /v1/adapters shows the bounds too
    check.json_schema = {  # type: ignore[attr-defined]
        k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None
    }
    return check


def min_items(n: int) -> Validator:
    """At least `n` items."""

    def check(_: Any, attribute: Any, value: Collection[Any]) -> None:
        if len(value) < n:
            raise FieldValueError(
                attribute.name, "must not be empty" if n == 1 else f"must have at least {n} items"
            )

    return check


def max_length(n: int) -> Validator:
    """A string (or `None`) of at most `n` characters."""

    def check(_: Any, attribute: Any, value: str | None) -> None:
        if value is not None and len(value) > n:
            raise FieldValueError(attribute.name, f"must be at most {n} characters long")

    return check
