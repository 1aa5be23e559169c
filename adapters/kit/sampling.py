"""The one list of sampling fields: what an adapter may declare in `Capabilities.sampling`.

Each name is a `SamplingOptions` field (schemas/generation.py) and a request field of the same
name. `SAMPLING_FIELDS` is everything an adapter may honour; `GATED_FIELDS` is the subset the chat
serving checks by "set to a non-default value and not declared → 400" (`n`, `logprobs` and
`top_logprobs` have bounds of their own: `max_n`, `max_top_logprobs`). `OPENAI_FIELDS` are
OpenAI's own; `VLLM_EXTENSION_FIELDS` are the extensions vLLM's server accepts.

Must never: name a field `SamplingOptions` lacks (a test checks); import an engine.
"""

from __future__ import annotations

__all__ = ["GATED_FIELDS", "OPENAI_FIELDS", "SAMPLING_FIELDS", "VLLM_EXTENSION_FIELDS"]

#: checked against `Capabilities.sampling` in this order (the first one refused is named)
GATED_FIELDS: tuple[str, ...] = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
)  # fmt: skip

#: every field an adapter may declare it honours
SAMPLING_FIELDS: frozenset[str] = frozenset(GATED_FIELDS) | {"n", "logprobs", "top_logprobs"}

#: OpenAI's own sampling parameters
OPENAI_FIELDS: frozenset[str] = frozenset(
    {"temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "n"}
)

#: vLLM's sampling extensions to the OpenAI request
VLLM_EXTENSION_FIELDS: frozenset[str] = frozenset(
    {"top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids"}
)
