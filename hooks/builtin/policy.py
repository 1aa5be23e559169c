"""Policy hooks on the prompt: a prompt-length limit and an operator's system prompt.

Must never: let the count of a limit be bypassed by a tokenizer failure (the approximation is
used instead, and logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import attrs
from attrs import field, frozen

from hooks.base import Hook, HookCall
from schemas.errors import InvalidRequestError
from schemas.generation import GenerationRequest, Message
from schemas.validators import FieldValueError, in_range

logger = logging.getLogger(__name__)

#: tokens a chat template adds around each message, in the approximation (role markers, ends)
_PER_MESSAGE_TOKENS = 4


@frozen
class MaxPromptTokensParams:
    """A prompt length limit below the model's context."""

    max_tokens: int = field(validator=in_range(1, 10_000_000))
    """Largest prompt (all messages, template included) a request may send."""
    use_tokenizer: bool = True
    """Count with the loaded model's tokenizer when its adapter offers one (transformers)."""
    chars_per_token: float = field(default=4.0, validator=in_range(1, 16))
    """The approximation otherwise: ceil(characters / chars_per_token) + 4 per message."""


def approximate_tokens(messages: Sequence[Message], chars_per_token: float) -> int:
    """The documented approximation: ~4 characters per token plus 4 per message for the template."""
    return sum(math.ceil(len(m.content) / chars_per_token) + _PER_MESSAGE_TOKENS for m in messages)


class MaxPromptTokensHook(Hook):
    """Refuse prompts longer than a policy limit (400 prompt_too_long)."""

    params_type: ClassVar[type[Any]] = MaxPromptTokensParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """Count the prompt; refuse it when it is over the limit."""
        p: MaxPromptTokensParams = self.params
        prompt = request.prompt
        if prompt is not None:
            # a raw prompt (/v1/completions): token ids count themselves; text is approximated
            # (the tokenizer counter takes messages)
            raw = (
                len(prompt)
                if isinstance(prompt, tuple)
                else math.ceil(len(prompt) / p.chars_per_token)
            )
            if raw > p.max_tokens:
                raise InvalidRequestError(
                    f"the prompt is {raw} tokens; this service allows at most {p.max_tokens}",
                    param="prompt",
                    code="prompt_too_long",
                )
            return None
        count = None
        if p.use_tokenizer:
            count = await call.count_prompt_tokens(request.messages)
        method = "tokenizer"
        if count is None:
            count = approximate_tokens(request.messages, p.chars_per_token)
            method = "approximation"
        if count > p.max_tokens:
            raise InvalidRequestError(
                f"the prompt is {count} tokens ({method}); this service allows at most "
                f"{p.max_tokens}",
                param="messages",
                code="prompt_too_long",
            )
        return None


def _not_empty(_: Any, attribute: Any, value: str) -> None:
    if not value.strip():
        raise FieldValueError(attribute.name, f"{attribute.name} must not be empty")
    if len(value) > 100_000:
        raise FieldValueError(attribute.name, f"{attribute.name} is longer than 100000")


@frozen
class SystemPromptParams:
    """An operator's system prompt."""

    text: str = field(validator=_not_empty)
    """The system message's content."""
    mode: Literal["prepend", "enforce"] = "prepend"
    """prepend: put it before the client's messages; enforce: also drop the client's own system
    and developer messages."""


class SystemPromptHook(Hook):
    """Prepend (or enforce) a system prompt."""

    params_type: ClassVar[type[Any]] = SystemPromptParams

    async def before_request(
        self, call: HookCall, request: GenerationRequest
    ) -> GenerationRequest | None:
        """The messages with ours first."""
        p: SystemPromptParams = self.params
        if request.prompt is not None:
            # a raw prompt has no turns to put the operator's system message before: refused,
            # never run without it
            raise InvalidRequestError(
                "this service adds a system prompt to every request; a raw prompt "
                "(/v1/completions) cannot carry it: use /v1/chat/completions",
                param="prompt",
                code="system_prompt_required",
            )
        messages = request.messages
        if p.mode == "enforce":
            messages = tuple(m for m in messages if m.role not in ("system", "developer"))
        ours = Message("system", p.text)
        return attrs.evolve(request, messages=(ours, *messages))
