"""Checks of vLLM's chat-template extensions before they reach a template: bounded plain JSON.

`chat_template_kwargs` become keyword arguments of `apply_chat_template` (transformers, and vLLM's
renderer, which passes them on). A key that names one of that call's own parameters would change
what the call does (`tokenize`, `return_tensors`) or what it renders (`messages`, `tools`), so
such keys are refused by name; the rest are bounded in count, depth and size. The allowlist is
the model's own template: the adapters pass on only the names it reads (transformers through
`adapters.kit.tokens.template_variables`, vLLM through its renderer's same rule), so no other
keyword reaches the tokenizer call whatever it accepts.

Must never: let a kwarg replace the conversation, the tools or the template; pass a non-JSON
value to a template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from schemas.errors import InvalidRequestError

#: most kwargs one request may give, and the JSON size of all of them together
MAX_TEMPLATE_KWARGS = 16
MAX_TEMPLATE_KWARGS_BYTES = 16_384
MAX_DEPTH = 4
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: names `apply_chat_template` (or vLLM's renderer) takes itself, or that have their own field
RESERVED = frozenset(
    {
        "messages", "conversation", "tools", "documents", "chat_template", "tokenize",
        "add_generation_prompt", "continue_final_message", "return_tensors", "return_dict",
        "padding", "truncation", "max_length", "tokenizer_kwargs", "processor_kwargs",
        "return_assistant_tokens_mask", "raise_exception", "strftime_now", "mm_processor_kwargs",
    }
)  # fmt: skip


def _plain(value: Any, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def check_template_kwargs(value: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """`chat_template_kwargs` as (name, value) pairs; 400 naming the field when refused."""
    if not value:
        return ()
    param = "chat_template_kwargs"
    if len(value) > MAX_TEMPLATE_KWARGS:
        raise InvalidRequestError(f"{param}: at most {MAX_TEMPLATE_KWARGS} keys", param=param)
    for key, item in value.items():
        if not _NAME.fullmatch(key):
            raise InvalidRequestError(
                f"{param}: keys must be identifiers (letters, digits, _)", param=param
            )
        if key in RESERVED:
            raise InvalidRequestError(
                f"{param}: {key!r} is not a template variable a request may set", param=param
            )
        if not _plain(item, 1):
            raise InvalidRequestError(
                f"{param}: values must be plain JSON nested at most {MAX_DEPTH} deep", param=param
            )
    if len(json.dumps(value)) > MAX_TEMPLATE_KWARGS_BYTES:
        raise InvalidRequestError(
            f"{param}: at most {MAX_TEMPLATE_KWARGS_BYTES} bytes of JSON", param=param
        )
    return tuple(value.items())
