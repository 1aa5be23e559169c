"""Fake `sglang.srt.server_args.ServerArgs`: the real field names and defaults, as msgspec does.

Real 0.5.23 (server_args.py, end of the `ServerArgs` section): `ServerArgs = msgspec.defstruct(
"ServerArgs", [(name, annotation, default) ...], namespace=..., dict=True)` over the fields that
`collect_input_fields` gathers from `arg_groups/fields/*`. The names and defaults here come from
`server_args_0_5_23.json`, dumped from the wheel with `msgspec.structs.fields(ServerArgs)`; like
the real Struct, an unknown keyword raises `TypeError` and `model_path` is required.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

PINNED = json.loads((Path(__file__).parent / "server_args_0_5_23.json").read_text("utf-8"))


def _copy_of(value: list[Any]) -> Any:
    return lambda: list(value)


def _field(spec: dict[str, Any]) -> tuple[str, Any] | tuple[str, Any, Any]:
    if spec["kind"] == "required":
        return (spec["name"], Any)
    default = spec["default"]
    if spec["kind"] == "factory":
        # msgspec refuses mutable defaults; the real field uses default_factory too
        return (spec["name"], Any, msgspec.field(default_factory=_copy_of(default)))
    return (spec["name"], Any, default)


ServerArgs: Any = msgspec.defstruct(
    "ServerArgs", [_field(spec) for spec in PINNED["fields"]], dict=True
)
