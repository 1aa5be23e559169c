"""The one context-length rule every adapter applies, with one wording.

A request's prompt plus its completion must fit the model's context (`max_model_len`):

- the prompt alone filling the context is a 400 (`param: messages`);
- `max_tokens` larger than the context is a 400 (`param: max_tokens`);
- prompt + `max_tokens` beyond the context is a 400 when the request set `max_tokens`: the client
  asked for something the model cannot give, and silently giving less would hide it;
- when the request did not set `max_tokens` (`SamplingOptions.max_tokens_default`), the completion
  may use whatever room the prompt leaves: `max_tokens` is lowered to it (finish `length`).

Before this module the transformers adapter clamped in every case and vLLM refused in some, so
the same request had different answers per backend.

Must never: import an engine; say anything but these messages about context length.
"""

from __future__ import annotations

from schemas.errors import InvalidRequestError
from schemas.generation import SamplingOptions

CODE = "context_length_exceeded"


def context_exceeded(
    limit: int, prompt_tokens: int | None, max_tokens: int | None = None
) -> InvalidRequestError:
    """The one error for a request that does not fit.

    `prompt_tokens` is None when nobody counted: the engine refused the text as too long before
    tokenizing all of it.
    """
    if max_tokens is not None and prompt_tokens is not None:
        asked = (
            f"the request asks for {prompt_tokens + max_tokens} ({prompt_tokens} in the "
            f"prompt, max_tokens {max_tokens})"
        )
    elif prompt_tokens is not None:
        asked = f"the prompt takes {prompt_tokens}, which leaves no room for a completion"
    else:
        asked = "the prompt takes more, which leaves no room for a completion"
    return InvalidRequestError(
        f"This model's maximum context length is {limit} tokens; {asked}. "
        "Shorten the prompt or lower max_tokens.",
        param="messages" if max_tokens is None else "max_tokens",
        code=CODE,
    )


def fit_max_tokens(prompt_tokens: int, sampling: SamplingOptions, max_model_len: int) -> int:
    """The `max_tokens` to run with, or a 400 by the module's rule."""
    if prompt_tokens >= max_model_len:
        raise context_exceeded(max_model_len, prompt_tokens)
    requested = sampling.max_tokens
    room = max_model_len - prompt_tokens
    if sampling.max_tokens_default:
        return min(requested, room)
    if requested > room:
        raise context_exceeded(max_model_len, prompt_tokens, requested)
    return requested


__all__ = ["CODE", "context_exceeded", "fit_max_tokens"]
