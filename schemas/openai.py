"""OpenAI chat-completions wire classes: the request we accept and the responses we send.

The request class lists every field OpenAI documents for `/v1/chat/completions` plus vLLM's
sampling extensions that benchmark clients send (`ignore_eos`, `min_tokens`, `top_k`, ...). Fields
we do not implement are still declared so that the service can refuse them by name (400 with
`param`) instead of failing on an unknown key or ignoring them; `check_chat_request` holds the
rules that depend on the request alone (those that depend on the loaded adapter are the
service's). Streaming chunks are not built from these classes: `service.sse` renders them from
byte templates because they sit on the per-token path.

Must never: import the service or an adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

import attrs
from attrs import field, frozen
from cattrs.gen import make_dict_unstructure_fn, override

from schemas.converter import converter
from schemas.errors import InvalidRequestError, UnsupportedParameterError
from schemas.features import set_value
from schemas.generation import PromptPosition
from schemas.validators import FieldValueError, in_range, min_items

ROLES = ("system", "developer", "user", "assistant", "tool")


@frozen
class TextPart:
    """A `{"type": "text", "text": ...}` content part."""

    type: Literal["text"]
    text: str


@frozen
class ImageURL:
    """The `image_url` object of an image part."""

    url: str
    """`data:image/<type>;base64,...` or an http(s) URL (never a file path)."""
    detail: Literal["auto", "low", "high"] | None = None


@frozen
class ImagePart:
    """A `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` content part.

    Parsed (bounded, `data:` or http(s) URLs only, never a file path) so that a backend without
    images can refuse it by name, and a multimodal one can pass it on.
    """

    type: Literal["image_url"]
    image_url: ImageURL


#: most image parts one message may hold, and the longest URL (a data: URL holds the image)
MAX_IMAGES = 8
MAX_HTTP_URL_CHARS = 2048
MAX_DATA_URL_CHARS = 20 * 2**20
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]{1,32};base64,[A-Za-z0-9+/=\s]+")
_HTTP_URL = re.compile(r"https?://[^\s/?#]+[^\s]*")


def _structure_image(part: dict[str, Any]) -> ImagePart:
    inner = part.get("image_url")
    if set(part) - {"type", "image_url"} or not isinstance(inner, dict):
        raise ValueError("an image part is {'type': 'image_url', 'image_url': {'url': ...}}")
    url, detail = inner.get("url"), inner.get("detail")
    if set(inner) - {"url", "detail"} or not isinstance(url, str):
        raise ValueError("image_url is {'url': <string>, 'detail': 'auto' | 'low' | 'high'}")
    if detail not in (None, "auto", "low", "high"):
        raise ValueError("image_url.detail must be 'auto', 'low' or 'high'")
    if url.startswith("data:"):
        if len(url) > MAX_DATA_URL_CHARS or not _DATA_URL.fullmatch(url):
            raise ValueError(
                f"image data URLs must be data:image/<type>;base64,... of at most "
                f"{MAX_DATA_URL_CHARS} characters"
            )
    elif len(url) > MAX_HTTP_URL_CHARS or not _HTTP_URL.fullmatch(url):
        raise ValueError(
            f"image URLs must be http(s) URLs of at most {MAX_HTTP_URL_CHARS} characters "
            "or data: URLs (never file paths)"
        )
    return ImagePart("image_url", ImageURL(url, detail))


MessageContent = str | tuple[TextPart | ImagePart, ...] | None


def _structure_content(value: Any, _: Any) -> MessageContent:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise TypeError("content must be a string, an array of content parts, or null")
    parts: list[TextPart | ImagePart] = []
    images = 0
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            images += 1
            if images > MAX_IMAGES:
                raise ValueError(f"at most {MAX_IMAGES} image parts per message")
            parts.append(_structure_image(part))
            continue
        if kind != "text":
            raise ValueError(f"content part type {kind!r} is not supported (text, image_url)")
        text = part.get("text")
        if not isinstance(text, str) or set(part) - {"type", "text"}:
            raise ValueError("a text content part is {'type': 'text', 'text': <string>}")
        parts.append(TextPart("text", text))
    return tuple(parts)


converter.register_structure_hook_func(lambda t: t == MessageContent, _structure_content)


@frozen
class ChatMessageIn:
    """One message of the request's conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        """Content flattened to text (parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_images(self) -> bool:
        """Whether the content holds an image part."""
        return isinstance(self.content, tuple) and any(
            isinstance(p, ImagePart) for p in self.content
        )


@frozen
class StreamOptions:
    """`stream_options`."""

    include_usage: bool = False
    continuous_usage_stats: bool = False
    include_obfuscation: bool = False


StopField = str | list[str] | None
#: most stop strings one request may give (OpenAI allows 4; vLLM takes more, so we allow 16)
MAX_STOPS = 16
#: longest stop string, in characters (matching is linear, but held-back text is up to this)
MAX_STOP_CHARS = 1024
#: `seed` is a signed 64-bit integer, as OpenAI documents it and vLLM checks it
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _structure_stop(value: Any, _: Any) -> StopField:
    if value is None:
        return None
    strings: list[str]
    if isinstance(value, str):
        strings = [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOPS:
            raise ValueError(f"stop accepts at most {MAX_STOPS} strings")
        strings = value
    else:
        raise TypeError("stop must be a string or an array of strings")
    if any(len(s) > MAX_STOP_CHARS for s in strings):
        raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
    return value if isinstance(value, str) else strings


def _check_seed(_: Any, attribute: Any, value: int | None) -> None:
    # bool is an int to Python but not to a JSON client; the converter already refuses it
    if value is not None and not SEED_MIN <= value <= SEED_MAX:
        raise FieldValueError(
            attribute.name, f"must be a signed 64-bit integer ({SEED_MIN} to {SEED_MAX})"
        )


_check_seed.json_schema = {"minimum": SEED_MIN, "maximum": SEED_MAX}  # type: ignore[attr-defined]


converter.register_structure_hook_func(lambda t: t == StopField, _structure_stop)


@frozen
class ChatCompletionRequest:
    """`POST /v1/chat/completions` body."""

    model: str
    messages: list[ChatMessageIn] = field(validator=min_items(1))
    max_tokens: int | None = field(default=None, validator=in_range(1))
    max_completion_tokens: int | None = field(default=None, validator=in_range(1))
    temperature: float | None = field(default=None, validator=in_range(0, 2))
    top_p: float | None = field(default=None, validator=in_range(0, 1))
    n: int = field(default=1, validator=in_range(1, 128))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = field(default=None, validator=_check_seed)
    presence_penalty: float | None = field(default=None, validator=in_range(-2, 2))
    frequency_penalty: float | None = field(default=None, validator=in_range(-2, 2))
    logprobs: bool = False
    top_logprobs: int | None = field(default=None, validator=in_range(0, 20))
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # declared so they can be refused by name when set
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM sampling extensions
    top_k: int | None = None
    min_p: float | None = field(default=None, validator=in_range(0, 1))
    repetition_penalty: float | None = field(default=None, validator=in_range(0, 10))
    ignore_eos: bool = False
    min_tokens: int = field(default=0, validator=in_range(0))
    stop_token_ids: list[int] | None = None
    # vLLM extensions, honoured per adapter (schemas.features; refused by name elsewhere)
    structured_outputs: dict[str, Any] | None = None
    prompt_logprobs: int | None = field(default=None, validator=in_range(0, 20))
    return_token_ids: bool | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


CHAT_REQUEST_FIELDS = frozenset(a.name for a in attrs.fields(ChatCompletionRequest))

#: OpenAI parameters no adapter implements here; refused by name when set (the ones some
#: adapters honour are catalogued in schemas.features and checked against the capabilities)
REFUSED_FIELDS = (
    "functions", "function_call", "audio", "prediction", "web_search_options", "reasoning_effort",
)  # fmt: skip
#: `response_format.type` values OpenAI documents (which of them a backend honours is a feature)
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def check_stream_options(stream: bool, options: StreamOptions | None) -> None:
    """400 naming `stream_options` when it comes without `stream: true` (OpenAI's rule)."""
    if options is not None and not stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def check_chat_request(req: ChatCompletionRequest) -> None:
    """The chat rules that hold whatever is loaded: 400 naming the first field that breaks one.

    Called once, right after parsing and before the request waits for a model, so a request no
    backend could serve is refused at once (OpenAI and vLLM validate a body before they look the
    model up). What depends on the loaded adapter or the server's settings is checked by
    `service.serving.ChatServing.build`; rules that combine a field some backend lacks (prompt
    logprobs with streaming, structured output with a forced tool call) stay there, after the
    capability check, so that such a backend names the field itself first.
    """
    for name in REFUSED_FIELDS:
        if set_value(getattr(req, name)):
            raise UnsupportedParameterError(f"{name} is not supported", param=name)
    if (
        req.response_format is not None
        and req.response_format.get("type") not in RESPONSE_FORMAT_TYPES
    ):
        raise InvalidRequestError(
            "response_format.type must be 'text', 'json_object' or 'json_schema'",
            param="response_format",
        )
    if req.modalities not in (None, ["text"]):
        raise UnsupportedParameterError("only the text modality is supported", param="modalities")
    if req.store:
        raise UnsupportedParameterError("stored completions are not supported", param="store")
    if req.service_tier not in (None, "auto", "default"):
        raise UnsupportedParameterError("service_tier is not supported", param="service_tier")
    check_stream_options(req.stream, req.stream_options)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    check_min_tokens(req.min_tokens, req.max_completion_tokens or req.max_tokens)


def check_min_tokens(min_tokens: int, max_tokens: int | None) -> None:
    """`min_tokens` above a set `max_tokens` can never be met: vLLM's 400 and wording."""
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
            param="min_tokens",
        )


@frozen
class PromptLogprob:
    """One token of a prompt position in vLLM's `prompt_logprobs` (a response field only)."""

    logprob: float
    rank: int | None
    decoded_token: str


#: vLLM's `prompt_logprobs`: per prompt position null (the first) or {token id: PromptLogprob}
PromptLogprobs = list[dict[str, PromptLogprob] | None]


def prompt_logprobs_json(positions: Iterable[PromptPosition]) -> PromptLogprobs:
    """The engine's prompt positions as vLLM sends them (logprobs floored at -9999 for JSON)."""
    return [
        None
        if position is None
        else {
            str(token): PromptLogprob(max(lp, -9999.0), rank, text)
            for token, lp, rank, text in position
        }
        for position in positions
    ]


@frozen
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@frozen
class AssistantMessage:
    """The generated message of a non-streaming choice.

    `reasoning_content` is sent only when the backend produces reasoning (`with_reasoning`),
    as vLLM's server sends it only with a reasoning parser on: OpenAI's schema has no such key,
    and a `null` on every message of every backend would only mislead.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    """"assistant", or the last message's role with `add_generation_prompt: false` (vLLM's)."""
    content: str | None
    reasoning_content: str | None = None
    with_reasoning: bool = False
    """The backend produces reasoning: send the key (`null` when there was none this time)."""
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI's `tool_calls`, sent only when the request forced tool calls."""


def _unstructure_message(message: AssistantMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.with_reasoning:
        out["reasoning_content"] = message.reasoning_content
    if message.tool_calls is not None:
        out["tool_calls"] = message.tool_calls
    return out


converter.register_unstructure_hook(AssistantMessage, _unstructure_message)


@frozen
class Choice:
    """One choice of a non-streaming response."""

    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    token_ids: list[int] | None = None
    """vLLM's `return_token_ids`: the choice's token ids (the key is sent only then)."""
    stop_reason: str | int | None = None
    """vLLM's: the stop string or stop token id that ended it; null otherwise (always sent)."""


@frozen
class ChatCompletion:
    """Non-streaming response; `metrics` is this wrapper's per-request telemetry."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    metrics: dict[str, Any] | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None
    """vLLM's `return_token_ids`: the prompt's token ids (the key is sent only then)."""
    prompt_logprobs: PromptLogprobs | None = None
    """vLLM's `prompt_logprobs` (the key is sent only when asked for)."""


# vLLM's extension keys appear only when asked for: a plain response keeps OpenAI's shape
converter.register_unstructure_hook(
    Choice,
    make_dict_unstructure_fn(Choice, converter, token_ids=override(omit_if_default=True)),
)
converter.register_unstructure_hook(
    ChatCompletion,
    make_dict_unstructure_fn(
        ChatCompletion,
        converter,
        prompt_token_ids=override(omit_if_default=True),
        prompt_logprobs=override(omit_if_default=True),
    ),
)


@frozen
class ModelPermission:
    """vLLM's one `permission` entry of a model card (its server's defaults: what it allows)."""

    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = 0
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


@frozen
class ModelCard:
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    max_model_len: int | None = None
    parent: str | None = None
    """vLLM's: the base model of a LoRA adapter; null for a served model (always here)."""
    permission: list[ModelPermission] = field(factory=list)
    """vLLM's card shape: one `ModelPermission` (clients that read `permission[0]` work)."""


@frozen
class ModelList:
    """`GET /v1/models`."""

    object: Literal["list"]
    data: list[ModelCard]
