"""`regex_redact`: replace bounded patterns in prompts and/or completions, streaming-safe.

Must never: send a completion character a later chunk could make part of a match (see
`hooks.redact`); accept a pattern whose matches are unbounded.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs
from attrs import field, frozen

from hooks.base import ChunkKind, Hook, HookCall, HookSetup
from hooks.redact import PatternError, Redactor, StreamRedactor
from schemas.errors import InvalidRequestError
from schemas.generation import GenerationRequest
from schemas.validators import FieldValueError

Target = Literal["prompt", "completion"]


def _patterns(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    if not value:
        raise FieldValueError(attribute.name, "patterns needs at least 1 item")
    if len(value) > 64:
        raise FieldValueError(attribute.name, "patterns has more than 64 items")
    for i, pattern in enumerate(value):
        try:
            Redactor([pattern], "", ignore_case=instance.ignore_case)
        except PatternError as exc:
            raise FieldValueError(attribute.name, f"patterns[{i}]: {exc}") from None
    try:
        Redactor(value, "", ignore_case=instance.ignore_case)
    except PatternError as exc:
        raise FieldValueError(attribute.name, str(exc)) from None


def _targets(_: Any, attribute: Any, value: tuple[str, ...]) -> None:
    if not value:
        raise FieldValueError(attribute.name, "apply_to needs at least 1 item")


@frozen
class RegexRedactParams:
    """Patterns to replace, and where."""

    patterns: tuple[str, ...] = field(validator=_patterns)
    """Python regular expressions with a bounded match length (at most 256 characters: {m,n},
    not + or *); no anchors, lookarounds or back-references. Applied as one alternation."""
    ignore_case: bool = False
    """Match letters in either case."""
    replacement: str = "[REDACTED]"
    """Literal text each match becomes."""
    apply_to: tuple[Target, ...] = field(default=("prompt", "completion"), validator=_targets)
    """prompt: the request's messages before the engine sees them; completion: the generated
    text (and reasoning) before the client does."""


class RegexRedactHook(Hook):
    """Replace patterns (e-mail addresses, ids) in prompts and completions."""

    params_type: ClassVar[type[Any]] = RegexRedactParams

    def __init__(self, params: Any, setup: HookSetup) -> None:
        super().__init__(params, setup)
        p: RegexRedactParams = params
        self.redactor = Redactor(p.patterns, p.replacement, ignore_case=p.ignore_case)
        self.prompt = "prompt" in p.apply_to
        self.completion = "completion" in p.apply_to

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Redact every message's content."""
        if not self.prompt:
            return None
        redact = self.redactor.redact
        if isinstance(request.prompt, str):
            return attrs.evolve(request, prompt=redact(request.prompt))
        if request.prompt is not None:
            # patterns match text: token ids cannot be redacted, so they are not let through
            raise InvalidRequestError(
                "prompt redaction is on: send the prompt as text, not token ids",
                param="prompt",
                code="redaction_requires_text",
            )
        messages = tuple(attrs.evolve(m, content=redact(m.content)) for m in request.messages)
        return attrs.evolve(request, messages=messages)

    def _streams(self, call: HookCall) -> dict[tuple[int, str], StreamRedactor]:
        streams: dict[tuple[int, str], StreamRedactor] = call.state(self, dict)
        return streams

    def on_chunk(self, call: HookCall, index: int, kind: ChunkKind, text: str) -> str:
        """Redact what is settled; hold back at most the longest match's length."""
        if not self.completion or not text:
            return text
        streams = self._streams(call)
        stream = streams.get((index, kind))
        if stream is None:
            stream = streams[(index, kind)] = self.redactor.stream()
        return stream.feed(text)

    def on_chunk_end(self, call: HookCall, index: int, kind: ChunkKind) -> str:
        """Flush the held-back text of the choice."""
        if not self.completion:
            return ""
        stream = self._streams(call).pop((index, kind), None)
        return stream.end() if stream is not None else ""
