"""JSON Schema for attrs params classes, with field docstrings as descriptions.

`GET /v1/adapters` serves these so an orchestrator (or a person) can see what each backend takes
without reading Python. Field docstrings (a string literal right under the field) are read from
the class source with `ast`, the convention pydantic's `use_attribute_docstrings` also follows.

Must never: import an engine; execute anything from the class source.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

import attrs

_PRIMITIVES: dict[Any, dict[str, Any]] = {
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name → docstring written under it in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    klass = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if klass is None:
        return {}
    docs: dict[str, str] = {}
    body = klass.body
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def type_schema(tp: Any) -> dict[str, Any]:  # noqa: PLR0911  (one return per kind of type)
    """JSON Schema of a type annotation (the subset our params classes use)."""
    if tp in _PRIMITIVES:
        return dict(_PRIMITIVES[tp])
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_schema(a) for a in args]}
    if origin in (tuple, list, frozenset, set):
        item = args[0] if args else Any
        return {"type": "array", "items": type_schema(item)}
    if origin is dict:
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": type_schema(value)}
    if attrs.has(tp):
        return attrs_json_schema(tp)
    return {}


def attrs_json_schema(cls: type) -> dict[str, Any]:
    """JSON Schema (draft 2020-12 subset) of an attrs class, defaults and docs included."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for a in attrs.fields(cls):
        prop = type_schema(hints.get(a.name, Any))
        prop.update(_validator_schema(a.validator))
        if a.name in docs:
            prop["description"] = docs[a.name]
        if a.default is attrs.NOTHING:
            required.append(a.name)
        elif isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
            prop["default"] = _jsonable(a.default.factory())
        else:
            prop["default"] = _jsonable(a.default)
        properties[a.name] = prop
    schema: dict[str, Any] = {
        "title": cls.__name__,
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if cls.__doc__:
        schema["description"] = inspect.cleandoc(cls.__doc__)
    if required:
        schema["required"] = required
    return schema


def _validator_schema(validator: Any) -> dict[str, Any]:
    """Bounds our validators declare (`schemas.validators.in_range`), including inside `and_`."""
    if validator is None:
        return {}
    out: dict[str, Any] = dict(getattr(validator, "json_schema", {}))
    for inner in getattr(validator, "_validators", ()):
        out.update(_validator_schema(inner))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    return value
