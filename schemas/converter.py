"""The one cattrs converter of the project, and the error walker that names the failing field.

Strict by design: JSON `"5"` is not an int, `true` is not an int, `1.5` is not an int, unknown keys
are refused. cattrs' stock hooks coerce (`int("5")`, `int(1.9) == 1`), which would let a typo load
an engine with a silently different value. Every failure comes back as `FieldError`s that carry a
path (`$.engine_params.max_model_len`, or `messages[0].role` for the data plane) and a reason a
user can act on; a validator's own reason survives (less a leading repeat of its field's name).

Field errors are rendered in one place, `FieldError.render()`: `<field>: <reason>`, the field
named once (the path without its `$.` root: `engine_params.max_model_len: must be at least 1`,
`max_tokens: must be at least 1`), and the path itself goes to the error's `param`. An unknown
key is reported at its own path with the closest known name (`schemas.suggest`).

Must never: import anything from `service`, `registry` or `adapters`.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn
from cattrs.preconf.json import make_converter

from schemas.generation import Message
from schemas.suggest import NAME_LIMIT, closest, hint, shown

T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_VERBS = ("must ", "needs ", "is ", "accepts ", "cannot ", "should ")

__all__ = ["FieldError", "StructureError", "converter", "structure", "unstructure"]


@attrs.frozen
class FieldError:
    """One reason a value did not fit its schema: where (`path`) and why (`message`).

    `message` is the reason alone (`must be at least 1`); `render()` names the field.
    """

    path: str
    message: str

    @property
    def param(self) -> str | None:
        """The OpenAI error's `param`: the path, or None for the body as a whole."""
        return None if self.path in ("", "$") else self.path

    def render(self) -> str:
        """`<field>: <reason>`, the field named once; the reason alone for the whole body."""
        param = self.param
        if param is None:
            return f"request body: {self.message}"
        return f"{param.removeprefix('$.')}: {self.message}"


class StructureError(ValueError):
    """A payload did not fit its attrs class; `errors` says where and why, first error first."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(e.render() for e in errors))

    @property
    def first(self) -> FieldError:
        """The error a response reports (one field at a time, as OpenAI does)."""
        return self.errors[0]


def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {_json_kind(value)}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {_json_kind(value)}")
    return float(value)


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_kind(value)}")
    return value


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        ((list, tuple), "an array"),
        (Mapping, "an object"),
    ]
    if value is None:
        return "null"
    for tp, name in kinds:
        if isinstance(value, tp):
            return name
    return type(value).__name__


def _is_literal(tp: Any) -> bool:
    return get_origin(tp) is Literal


def _structure_literal(value: Any, tp: Any) -> Any:
    allowed = get_args(tp)
    # `True == 1` in Python: compare types too so a JSON true never passes for a literal 1
    for option in allowed:
        if value == option and type(value) is type(option):
            return option
    raise ValueError("must be one of " + ", ".join(repr(a) for a in allowed))


def _is_optional_primitive_union(tp: Any) -> bool:
    """`X | None` where X is not an attrs class: cattrs handles those, but with its own message."""
    if get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    args = get_args(tp)
    return len(args) == 2 and type(None) in args


def _make_optional_hook(conv: cattrs.Converter) -> Any:
    def hook(value: Any, tp: Any) -> Any:
        if value is None:
            return None
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return conv.structure(value, inner)

    return hook


def _is_array_type(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is list:
        return True
    args = get_args(tp)
    return origin is tuple and len(args) == 2 and args[1] is Ellipsis


def _array_factory(conv: cattrs.Converter) -> Any:
    """Cattrs iterates whatever it gets, so "abc" would become ['a', 'b', 'c']: refuse first."""

    def factory(tp: Any) -> Any:
        base = (
            list_structure_factory(tp, conv)
            if get_origin(tp) is list
            else homogenous_tuple_structure_factory(tp, conv)
        )

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected an array, got {_json_kind(value)}")
            return base(value, tp)

        return hook

    return factory


def _object_factory(conv: cattrs.Converter) -> Any:
    """A nested attrs class given a non-object gets our message, not Python's."""

    def factory(cls: Any) -> Any:
        base = make_dict_structure_fn(cls, conv)

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, Mapping):
                raise TypeError(f"expected an object, got {_json_kind(value)}")
            return base(value, cls)

        return hook

    return factory


def _build() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Any, lambda v, _: v)
    conv.register_structure_hook_func(_is_literal, _structure_literal)
    conv.register_structure_hook_func(_is_optional_primitive_union, _make_optional_hook(conv))
    conv.register_structure_hook_factory(_is_array_type, _array_factory(conv))
    conv.register_structure_hook_factory(attrs.has, _object_factory(conv))
    return conv


converter: cattrs.Converter = _build()


def _unstructure_message(message: Message) -> dict[str, Any]:
    # a plain turn reads as it always did (logs, hooks): no empty tool or image keys
    out: dict[str, Any] = {"role": message.role, "content": message.content, "name": message.name}
    if message.tool_calls:
        out["tool_calls"] = [attrs.asdict(c) for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.parts:
        out["parts"] = [list(p) for p in message.parts]
    return out


converter.register_unstructure_hook(Message, _unstructure_message)


def _format(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, AttributeError) and str(exc).endswith("has no attribute 'items'"):
        return "expected an object"
    # our hooks and attrs validators raise ValueError/TypeError with a message meant for users
    text = str(exc).strip()
    return text or f"invalid value ({type(exc).__name__})"


def _field_error(path: str, exc: BaseException) -> FieldError:
    """The error at `path`; a reason that starts by naming the field loses that repeat."""
    path = path or "$"
    reason = _format(exc)
    # validators (ours before, third-party adapters' still) write "device must be ...": the
    # rendered message names the field already, so "device: device must be ..." would say it twice
    # (only before a verb: "content part type 'x' is not supported" keeps its subject)
    name = re.split(r"[.\[]", path)[-1]
    rest = reason[len(name) + 1 :]
    if name and reason.startswith(name + " ") and rest.startswith(_VERBS):
        reason = rest
    return FieldError(path, reason)


def _unknown_keys(exc: ForbiddenExtraKeysError, path: str, out: list[FieldError]) -> None:
    """One error per unknown key, at the key's own path, with the closest known field."""
    known = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
    for key in sorted(exc.extra_fields, key=str):
        name = str(key)
        # the known list only when nothing is close: a suggestion alone reads best
        more = hint(name, known, list_known=closest(name, known) is None)
        reason = "unknown field" + (f"; {more}" if more else "")
        # a key too long to be a field name is not echoed whole, in the path either
        where = _index(path, name) if len(name) <= NAME_LIMIT else _join(path, shown(name))
        out.append(FieldError(where, reason))


def _walk(exc: BaseException, path: str, out: list[FieldError]) -> None:
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            _walk(sub, _join(path, note.name), out)
        for sub in without:
            if isinstance(sub, ForbiddenExtraKeysError):
                _unknown_keys(sub, path, out)
                continue
            # validators run in __init__, after cattrs lost track of fields: ours name theirs
            field = getattr(sub, "field", None)
            out.append(_field_error(_join(path, field) if field else path, sub))
    elif isinstance(exc, IterableValidationError):
        with_notes_i, without_i = exc.group_exceptions()
        for sub, note_i in with_notes_i:
            _walk(sub, _index(path, note_i.index), out)
        out.extend(_field_error(path, sub) for sub in without_i)
    elif isinstance(exc, ExceptionGroup):
        for sub in exc.exceptions:
            _walk(sub, path, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        _unknown_keys(exc, path, out)
    else:
        out.append(_field_error(path, exc))


def _index(path: str, index: Any) -> str:
    """`[0]` for positions; `.key` for mapping keys that read as names, else `['key']`."""
    if isinstance(index, str) and _NAME.fullmatch(index):
        return _join(path, index)
    return f"{path}[{index!r}]"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def structure(data: Any, cls: type[T], *, path: str = "$") -> T:
    """Structure `data` into `cls` or raise `StructureError` naming every failing field.

    `path` is the root the field paths hang from: `"$.engine_params"` for the control plane,
    `""` for OpenAI requests (whose `param` is a bare field name).
    """
    if attrs.has(cls) and not isinstance(data, Mapping):
        raise StructureError(
            [FieldError(path or "$", f"expected an object, got {_json_kind(data)}")]
        )
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        errors: list[FieldError] = []
        _walk(exc, path, errors)
        raise StructureError(errors) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # a hook on the root itself failed (e.g. the payload is not an object)
        raise StructureError([_field_error(path, exc)]) from None


def unstructure(obj: Any) -> Any:
    """Turn attrs instances into JSON-ready builtins with the one converter."""
    return converter.unstructure(obj)
