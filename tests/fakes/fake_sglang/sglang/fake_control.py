"""The fake's script: what the fake engine "generates" and how it misbehaves. Not a real module.

Tests set `SCRIPT` before `load()`; every `Engine` the fake builds is appended to `ENGINES` so a
test can look at what the adapter passed and did (`server_args`, aborts, shutdown calls).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.entrypoints.engine import Engine

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Script:
    """Deterministic behaviour of the fake engine."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    """Detokenized text of each generated token, in order; then EOS (repeated with ignore_eos)."""
    chat_template: str | None = CHATML
    """The tokenizer's `chat_template` (the fake renders ChatML whatever the string says)."""
    generation_prompt: str = "<|im_start|>assistant\n"
    """What `add_generation_prompt=True` appends (e.g. end it with `<think>\\n`)."""
    context_len: int = 4096
    """`model_config.context_len` when `context_length` is not given."""
    fail_init: str | None = None
    """`Engine.__init__` raises `RuntimeError(fail_init)` after building `ServerArgs`."""
    pause_after: int | None = None
    """The scheduler stops producing tokens for a request after this many, until it is aborted."""
    error_abort: tuple[int, str] | None = None
    """Finish every request at its first step with `FINISH_ABORT(message, status_code)`."""
    eos_token_id: int = 2
    init_gate: threading.Event | None = None
    """When set, `Engine.__init__` blocks (in its worker thread) until the event is set."""
    init_started: threading.Event = field(default_factory=threading.Event)
    """Set when an `Engine.__init__` begins."""
    shut_down: threading.Event = field(default_factory=threading.Event)
    """Set by `Engine.shutdown` (from whichever thread calls it)."""


SCRIPT = Script()
ENGINES: list[Engine] = []


def reset() -> None:
    """Back to the default script; forget built engines."""
    global SCRIPT  # noqa: PLW0603  (the fake's one knob, reset between tests)
    SCRIPT = Script()
    ENGINES.clear()
