"""Tokenizer operations behind `/tokenize`, `/detokenize` and echo of token-id prompts.

Adapters whose engine hands us a Hugging Face tokenizer (transformers, vLLM: its tokenizer keeps
HF's `encode`/`decode`/`apply_chat_template`/`convert_ids_to_tokens`) return a `TokenOps` over
it from `BaseAdapter.token_ops()`. The service bounds the input sizes before calling; this module
checks what only the tokenizer knows (ids within the vocabulary, templates that refuse).

Must never: import an engine; let a template's traceback out (its first line only, as a 400).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.errors import InvalidRequestError
from schemas.generation import Message


class TokenOps:
    """Tokenize/detokenize with one loaded model's tokenizer (blocking: call in a thread)."""

    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int,
        template_errors: tuple[type[BaseException], ...] = (ValueError, TypeError),
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.template_errors = template_errors
        self.vocab_size = len(tokenizer)

    def encode_prompt(self, text: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
        """Token ids of `text`, as vLLM's completions and tokenize routes make them."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return tuple(int(i) for i in ids)

    def render_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text the chat template makes of `messages`; 400 when the template refuses."""
        conversation = [
            # templates know system/user/assistant/tool; OpenAI's developer role is a system turn
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
            )
        except self.template_errors as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise InvalidRequestError(
                f"the model's chat template refused the messages: {detail}", param="messages"
            ) from None
        return str(text)

    def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
    ) -> tuple[int, ...]:
        """Token ids of the templated conversation (vLLM's tokenize defaults)."""
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        return self.encode_prompt(text, add_special_tokens=add_special_tokens)

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        """400 naming `param` when an id lies outside the vocabulary."""
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})",
                param=param,
                code="invalid_token_id",
            )

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens kept, as vLLM's detokenize does)."""
        self.check_ids(ids, "tokens")
        return str(self.tokenizer.decode(list(ids)))

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """Each id as the tokenizer spells it (`convert_ids_to_tokens`)."""
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(ids))]


__all__ = ["TokenOps", "template_variables"]


def template_variables(template: Any) -> frozenset[str]:
    """The variables a chat template reads (vLLM's `_resolve_chat_template_kwargs` rule).

    Only these names of a request's `chat_template_kwargs` are passed to the template: an
    allowlist the model's own template defines, so no other keyword reaches the tokenizer call
    (a kwarg the template does not read would change nothing in the text anyway).
    """
    import jinja2.meta  # noqa: PLC0415  (with the engine: transformers depends on jinja2)
    import jinja2.sandbox  # noqa: PLC0415

    sources = template.values() if isinstance(template, dict) else [template]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    names: set[str] = set()
    for source in sources:
        if isinstance(source, str):
            try:
                names |= jinja2.meta.find_undeclared_variables(env.parse(source))
            except jinja2.TemplateSyntaxError:
                continue  # applying it fails later with the template's own message
    return frozenset(names)
