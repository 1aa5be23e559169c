"""What crosses the line between the service and an adapter: a generation request and its deltas.

These are engine-neutral: the service turns an OpenAI request into a `GenerationRequest`, the
adapter yields `TokenDelta`s, the service turns those into OpenAI chunks. Adapters never see HTTP
and the service never sees an engine object.

Must never: grow wire concerns (ids, `object` names, SSE) or engine types.
"""

from __future__ import annotations

from typing import Any, Literal

from attrs import field, frozen

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls", "content_filter"]


@frozen
class ToolCall:
    """A function call: from an assistant turn of the history, or parsed from the output."""

    id: str
    name: str
    arguments: str
    """The arguments as JSON text, as OpenAI sends them."""


@frozen
class Tool:
    """A function the model may call (OpenAI's `tools[].function`)."""

    name: str
    description: str | None = None
    parameters: str | None = None
    """Its JSON Schema as JSON text, None when the tool declares none."""


@frozen
class Message:
    """One chat turn, content already flattened to text."""

    role: Role
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls an assistant turn made (chat templates that know tools render them)."""
    tool_call_id: str | None = None
    """The call a `tool` turn answers."""
    parts: tuple[tuple[Literal["text", "image_url"], str], ...] = ()
    """Only for a message with images (backends that declare `image_url`): its parts in order,
    ("text", text) or ("image_url", url); `content` is then its text alone."""


@frozen
class SamplingOptions:
    """Sampling controls, OpenAI's plus vLLM's extensions. `None` means the engine's default."""

    max_tokens: int
    max_tokens_default: bool = False
    """True when the client set no max_tokens: the adapter may lower `max_tokens` to fit the
    context (prompt + max_tokens <= max context) instead of refusing the request."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit), ids checked against the vocabulary by the adapter."""


@frozen
class ChatOptions:
    """vLLM's chat-template and detokenisation extensions (`schemas.features`).

    The defaults change nothing; an adapter sees other values only for features it declares.
    """

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra template variables, checked by `schemas.chat_options` (bounded plain JSON; never a
    name the template call itself takes, such as `messages`, `tools` or `tokenize`)."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_token_ids: bool = False
    """Deltas carry `token_ids` (and the first one `prompt_token_ids`)."""
    prompt_logprobs: int | None = None
    """vLLM's `prompt_logprobs`: alternatives per prompt position (whole responses only)."""
    echo: bool = False
    """The service echoes the last message; vLLM then computes prompt logprobs (its rule)."""


@frozen
class GenerationRequest:
    """A chat generation the adapter must run; `request_id` is unique while it is in flight."""

    request_id: str
    messages: tuple[Message, ...]
    sampling: SamplingOptions
    model: str = ""
    prompt: str | tuple[int, ...] | None = None
    """A raw prompt (`/v1/completions`): text or token ids. When set, the adapter runs it as is,
    without the chat template, and `messages` is empty."""
    structured: StructuredOutput | None = None
    """Constrained decoding (`response_format`, `structured_outputs`, forced tool calls)."""
    tools: tuple[Tool, ...] = ()
    """Functions the chat template is given (`tools=`), for templates that render them."""
    options: ChatOptions = ChatOptions()


@frozen
class TokenLogprob:
    """One sampled token's log-probability and its top alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top: tuple[tuple[str, float], ...] = ()


#: one prompt position of `prompt_logprobs`: None for the first, else (id, logprob, rank, text)s
PromptPosition = tuple[tuple[int, float, int | None, str], ...] | None


@frozen
class TokenDelta:
    """Text the engine produced since the previous delta of the same choice.

    `token_count` is how many tokens this delta adds (engines may batch several into one delta).
    `prompt_tokens` is set on at least one delta of the stream (engines know it early or late).
    `finish_reason` is set on the last delta of a choice. Engine timestamps are
    `time.monotonic()`/`time.perf_counter()` seconds (the same clock on Linux, also across
    processes), where the engine reports them.
    """

    text: str
    token_count: int = 1
    index: int = 0
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    reasoning: str = ""
    logprobs: tuple[TokenLogprob, ...] | None = None
    engine_queued_at: float | None = None
    engine_scheduled_at: float | None = None
    engine_first_token_at: float | None = None
    engine_last_token_at: float | None = None
    stop_reason: str | int | None = field(default=None)
    token_ids: tuple[int, ...] | None = None
    """The ids of this delta's tokens, when the request asked for them (`return_token_ids`)."""
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt's ids, on the first delta, when the request asked for them
    (`options.return_token_ids` or `options.echo`)."""
    prompt_logprobs: tuple[PromptPosition, ...] | None = None
    """Per prompt position (the first has none): (token id, logprob, rank, text) of the prompt
    token and its alternatives, as vLLM reports them; on the first delta, when asked for."""


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@frozen
class StructuredOutput:
    """A constraint on the generated text, enforced by the engine's grammar machinery.

    `spec` is the JSON Schema as JSON text (`json`), the regex, the EBNF grammar, the choices
    (`choice`), or empty (`json_object`: any JSON object). Built and bounded by the service
    (`schemas.structured`); an adapter that declares the matching feature must enforce it.
    """

    kind: StructuredKind
    spec: str | tuple[str, ...] = ""
    param: str = "response_format"
    """The request field the constraint came from: what an engine's refusal names."""
