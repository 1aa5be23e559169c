"""Wire classes of the legacy completions route and vLLM's tokenize/detokenize routes.

`CompletionRequest` follows vLLM's `CompletionRequest` (vllm/entrypoints/openai/completion/
protocol.py) for the fields it takes: OpenAI's documented ones plus the sampling extensions the
chat request also takes. `suffix` and `best_of` are declared so that the service can refuse them
by name; anything not declared is refused as an unknown parameter, as chat does. One prompt per
request: a string, a list of one string, token ids, or a list of one list of token ids (a batch of
several prompts is refused by name rather than run as one).

Must never: import the service or an adapter; accept a prompt it has not bounded.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import field, frozen
from cattrs.gen import make_dict_unstructure_fn, override

from schemas.converter import converter
from schemas.errors import UnsupportedParameterError
from schemas.openai import (
    PromptLogprobs,
    StopField,
    StreamOptions,
    _check_seed,
    check_min_tokens,
    check_stream_options,
)
from schemas.validators import in_range

#: most token ids one prompt (completions, detokenize) may carry: above any context we serve
MAX_PROMPT_TOKENS = 262_144
#: longest prompt text, in characters (the body limit bounds it too; this names the field)
MAX_PROMPT_CHARS = 4 * 1024 * 1024
#: largest `logprobs` (vLLM's default `max_logprobs`; OpenAI allows 5)
MAX_LOGPROBS = 20

PromptInput = str | tuple[int, ...]


def token_ids(value: list[Any]) -> tuple[int, ...]:
    """`value` as token ids, or `ValueError` (too many, negative, not integers)."""
    if len(value) > MAX_PROMPT_TOKENS:
        raise ValueError(f"at most {MAX_PROMPT_TOKENS} token ids")
    # bool is an int to Python but not to a JSON client
    if not all(type(t) is int and t >= 0 for t in value):
        raise ValueError("token ids must be non-negative integers")
    return tuple(value)


def structure_prompt(value: Any, _: Any = None) -> PromptInput:
    """One prompt: text or token ids (lists of one are unwrapped, as OpenAI's batch form)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    elif isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        raise ValueError("one prompt per request: a batch of several prompts is not supported")
    if isinstance(value, str):
        if not value:
            raise ValueError("the prompt is empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("the prompt is empty")
        return token_ids(value)
    raise TypeError("prompt must be a string, an array of token ids, or an array of one of those")


converter.register_structure_hook_func(lambda t: t == PromptInput, structure_prompt)


@frozen
class CompletionRequest:
    """`POST /v1/completions` body."""

    model: str
    prompt: PromptInput
    """Text, token ids, or a list of one of those."""
    max_tokens: int = field(default=16, validator=in_range(1))
    """OpenAI's default is 16 tokens."""
    temperature: float | None = field(default=None, validator=in_range(0, 2))
    top_p: float | None = field(default=None, validator=in_range(0, 1))
    n: int = field(default=1, validator=in_range(1, 128))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = field(default=None, validator=_check_seed)
    presence_penalty: float | None = field(default=None, validator=in_range(-2, 2))
    frequency_penalty: float | None = field(default=None, validator=in_range(-2, 2))
    logprobs: int | None = field(default=None, validator=in_range(0, MAX_LOGPROBS))
    """Log-probabilities of the sampled token and this many alternatives per position."""
    echo: bool = False
    """Prepend the prompt to the completion's text."""
    user: str | None = None
    # declared so they can be refused by name when set
    suffix: str | None = None
    best_of: int | None = field(default=None, validator=in_range(1, 128))
    logit_bias: dict[str, float] | None = None
    # vLLM sampling extensions
    top_k: int | None = None
    min_p: float | None = field(default=None, validator=in_range(0, 1))
    repetition_penalty: float | None = field(default=None, validator=in_range(0, 10))
    ignore_eos: bool = False
    min_tokens: int = field(default=0, validator=in_range(0))
    stop_token_ids: list[int] | None = None
    # vLLM extensions, honoured per adapter (schemas.features; refused by name elsewhere)
    prompt_logprobs: int | None = field(default=None, validator=in_range(0, MAX_LOGPROBS))
    """Log-probabilities of each prompt token and this many alternatives (whole answers only)."""
    return_token_ids: bool | None = None
    """The choice's `token_ids` and the prompt's `prompt_token_ids` (streamed: first chunk's)."""


COMPLETION_REQUEST_FIELDS = frozenset(a.name for a in attrs.fields(CompletionRequest))


def check_completion_request(req: CompletionRequest) -> None:
    """The completions rules that hold whatever is loaded: 400 naming the field that breaks one.

    Called once, right after parsing, as `schemas.openai.check_chat_request` is for chat. `suffix`
    and `echo` with `logprobs` stay with the service's capability checks: their refusals name the
    backend, or follow the refusal of `logprobs` itself where a backend has none.
    """
    if req.best_of is not None and req.best_of != req.n:
        raise UnsupportedParameterError(
            "best_of is not supported (only best_of equal to n)", param="best_of"
        )
    check_stream_options(req.stream, req.stream_options)
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        # the completions stream sends its usage once, at the end, whatever the backend
        raise UnsupportedParameterError(
            "stream_options.continuous_usage_stats is not supported",
            param="stream_options.continuous_usage_stats",
        )
    check_min_tokens(req.min_tokens, req.max_tokens)


@frozen
class CompletionLogprobs:
    """OpenAI's completions logprobs: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@frozen
class CompletionChoice:
    """One choice of a non-streaming completion.

    vLLM's extension keys (`token_ids`, `prompt_token_ids`, `prompt_logprobs`) are sent only when
    the request asked for them, on the choice as vLLM's `CompletionResponseChoice` has them.
    """

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """Per prompt position null (the first) or {token id: {logprob, rank, decoded_token}}."""
    prompt_token_ids: list[int] | None = None


converter.register_unstructure_hook(
    CompletionChoice,
    make_dict_unstructure_fn(
        CompletionChoice,
        converter,
        token_ids=override(omit_if_default=True),
        prompt_logprobs=override(omit_if_default=True),
        prompt_token_ids=override(omit_if_default=True),
    ),
)


@frozen
class CompletionUsage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@frozen
class Completion:
    """Non-streaming `text_completion`; `metrics` is this wrapper's per-request telemetry."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    metrics: dict[str, Any] | None = None
    system_fingerprint: str | None = None


@frozen
class TokenizeRequest:
    """`POST /tokenize`: vLLM's shape, either `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    """Text to tokenize (exclusive with `messages`)."""
    messages: list[Any] | None = None
    """A chat conversation, tokenized through the model's chat template."""
    add_special_tokens: bool | None = None
    """Add BOS and the like: default true for `prompt`, false for `messages` (as vLLM)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    """Also return each token as the tokenizer spells it."""


@frozen
class TokenizeResponse:
    """`POST /tokenize` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


@frozen
class DetokenizeRequest:
    """`POST /detokenize`: vLLM's shape."""

    tokens: list[int]
    """Token ids (at most `MAX_PROMPT_TOKENS`, each within the vocabulary)."""
    model: str | None = None


@frozen
class DetokenizeResponse:
    """`POST /detokenize` answer."""

    prompt: str


@frozen
class VersionResponse:
    """`GET /version`."""

    version: str
