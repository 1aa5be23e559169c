"""OpenAI-compatible upstream: any `/v1/chat/completions` server behind our control plane.

Raw prompts (`/v1/completions`) go to the upstream's own `/v1/completions`.

DeepSeek's API, another vLLM, another inference-wrapper: the load names a base URL (whose host
must be on the backend's `allowed_hosts` in adapters.yaml, so a request cannot point us at an
internal service) and the remote model; the key travels as an env secret named by
`api_key_env` (e.g. `DEEPSEEK_API_KEY`), injected by the load's `env` and masked everywhere.
Streams are passed through chunk by chunk, so our TTFT/TPOT measure what our clients see.

Token counts: the upstream's final usage chunk (we always ask for `include_usage`) is exact and is
what we report. An upstream that ignores `stream_options` gets one token counted per content
chunk, which is exact for vLLM and OpenAI and an approximation elsewhere.

Must never: read a key from the server's environment (only from the load's own `env`); send the
key anywhere but the allowed host's Authorization header; put upstream
response text in an error without masking (the manager and service mask again); follow
redirects (they could leave the allowlist).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import msgspec
from attrs import field, frozen

from adapters.base import BaseAdapter, Capabilities, EngineStats, LoadInfo
from adapters.kit import clean_error_text, no_mask
from adapters.kit.sampling import OPENAI_FIELDS, VLLM_EXTENSION_FIELDS
from schemas.errors import (
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
    WrapperError,
)
from schemas.generation import FinishReason, GenerationRequest, TokenDelta
from schemas.validators import in_range, max_length

_OPENAI_SAMPLING = OPENAI_FIELDS
_VLLM_SAMPLING = VLLM_EXTENSION_FIELDS


@frozen
class OpenAIUpstreamParams:
    """Engine params of the OpenAI-compatible upstream backend."""

    base_url: str = field(validator=max_length(2048))
    """Upstream API root, e.g. `https://api.deepseek.com/v1`; its host must be allowed."""
    api_key_env: str | None = field(default=None, validator=max_length(128))
    """Key of this load's own `env` holding the upstream key (never the server's environment:
    a name the load's `env` does not set is refused); none: no key."""
    timeout_s: float = field(default=120.0, validator=in_range(0.1, 3600))
    """Longest wait for the upstream's next byte (first token included)."""
    connect_timeout_s: float = field(default=10.0, validator=in_range(0.1, 300))
    """Longest wait to connect."""
    max_connections: int = field(default=256, validator=in_range(1, 10_000))
    """Connection pool size (concurrent upstream requests)."""
    vllm_extensions: bool = False
    """Upstream accepts vLLM's sampling extensions (top_k, min_p, ignore_eos, ...)."""
    max_n: int = field(default=1, validator=in_range(1, 128))
    """Largest `n` to pass through."""
    max_context: int | None = field(default=None, validator=in_range(1))
    """Context length to advertise (the upstream's /models is asked when unset)."""


def _check_url(base_url: str, allowed: tuple[str, ...]) -> httpx.URL:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ParamsValidationError(
            "base_url must be an http(s) URL", param="$.engine_params.base_url"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ParamsValidationError(
            "base_url must not carry credentials, a query or a fragment",
            param="$.engine_params.base_url",
        )
    host = parts.hostname.lower()
    port = parts.port
    allowed_lower = {a.lower() for a in allowed}
    if host not in allowed_lower and (port is None or f"{host}:{port}" not in allowed_lower):
        where = ", ".join(sorted(allowed_lower)) or "none"
        raise ParamsValidationError(
            f"upstream host {host!r} is not on this backend's allowed_hosts ({where})",
            param="$.engine_params.base_url",
            code="host_not_allowed",
        )
    return httpx.URL(base_url.rstrip("/") + "/")


class OpenAIUpstreamAdapter(BaseAdapter[OpenAIUpstreamParams]):
    """Forwards chat completions to an allowed OpenAI-compatible server."""

    params_type = OpenAIUpstreamParams
    #: completions go to the upstream's own /v1/completions
    declared_features: ClassVar[frozenset[str]] = frozenset({"/v1/completions"})

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._client: httpx.AsyncClient | None = None
        self._params: OpenAIUpstreamParams | None = None
        self._model = ""
        self._max_context: int | None = None
        self._running = 0

    @property
    def capabilities(self) -> Capabilities:
        """OpenAI's sampling params, plus vLLM's when the upstream takes them."""
        params = self._params
        sampling = _OPENAI_SAMPLING | (
            _VLLM_SAMPLING if params and params.vllm_extensions else set()
        )
        return Capabilities(
            sampling=frozenset(sampling),
            max_n=params.max_n if params else 1,
            reasoning=True,
            max_context=self._max_context,
            features=self.declared_features,
        )

    def check(self, model: str, params: OpenAIUpstreamParams) -> None:
        """The host must be allowed; the model is the upstream's name for it."""
        if not model.strip():
            raise ParamsValidationError(
                "model (the upstream's model name) is empty", param="$.model"
            )
        _check_url(params.base_url, self.context.allowed_hosts)
        self._api_key(params)

    def _api_key(self, params: OpenAIUpstreamParams) -> str | None:
        """The key named by `api_key_env`, from this load's own `env` only.

        Never from `os.environ`: that holds the server's own secrets (`IW_ADMIN_KEY`, cloud
        credentials), and a request naming one would have it sent to the upstream host.
        """
        name = params.api_key_env
        if name is None:
            return None
        key = self.context.load_env.get(name)
        if not key:
            raise ParamsValidationError(
                "api_key_env must name a key of this load's own env (set it in the load's env)",
                param="$.engine_params.api_key_env",
                code="param_refused",
            )
        return key

    async def load(self, model: str, params: OpenAIUpstreamParams) -> LoadInfo:
        """Open a pooled client and ask the upstream's /models (connectivity and key check)."""
        started = time.perf_counter()
        base = _check_url(params.base_url, self.context.allowed_hosts)
        headers = {"Accept": "application/json"}
        key = self._api_key(params)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(params.timeout_s, connect=params.connect_timeout_s),
            limits=httpx.Limits(max_connections=params.max_connections),
            follow_redirects=False,
        )
        self._params = params
        self._model = model
        init_s = time.perf_counter() - started
        started = time.perf_counter()
        listed = await self._models()
        if listed is not None and model not in listed:
            raise EngineError(f"upstream does not serve model {model!r} (it lists {len(listed)})")
        self._max_context = params.max_context
        return LoadInfo(
            init_s=init_s,
            warmup_s=time.perf_counter() - started,
            device="remote",
            max_context=self._max_context,
            details={"upstream_host": base.host, "upstream_model": model},
        )

    async def _models(self) -> set[str] | None:
        """Model ids the upstream lists, or None when it has no /models."""
        assert self._client is not None  # noqa: S101
        try:
            r = await self._client.get("models")
        except httpx.TimeoutException:
            raise UpstreamTimeoutError("upstream did not answer /models in time") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"cannot reach upstream ({type(exc).__name__})") from None
        if r.status_code == 404:
            return None
        if r.status_code >= 400:
            raise _status_error(r.status_code, r.content, self.context.mask)
        data = msgspec.json.decode(r.content).get("data", [])
        return {str(m.get("id")) for m in data if isinstance(m, dict)}

    def _body(self, req: GenerationRequest) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {"model": self._model}
        if req.prompt is not None:
            # the upstream's own /v1/completions takes text or token ids as they are
            body["prompt"] = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        else:
            body["messages"] = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in req.messages
            ]
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if not s.max_tokens_default:
            body["max_tokens"] = s.max_tokens
        optional = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "stop": list(s.stop) or None,
            "n": s.n if s.n != 1 else None,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty,
            "ignore_eos": s.ignore_eos or None,
            "min_tokens": s.min_tokens or None,
            "stop_token_ids": list(s.stop_token_ids) or None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """POST a streaming request and translate its chunks into deltas."""
        client = self._client
        if client is None:
            raise EngineError("upstream adapter is not loaded")
        state = _StreamState(req.sampling.n, self.context.mask)
        # W3C trace context of the current request span, when tracing is on (service.tracing)
        headers = {"x-request-id": req.request_id, **_trace_headers()}
        self._running += 1
        try:
            async with client.stream(
                "POST",
                "chat/completions" if req.prompt is None else "completions",
                json=self._body(req),
                headers=headers,
            ) as r:
                if r.status_code >= 400:
                    raise _status_error(r.status_code, await r.aread(), self.context.mask)
                async for line in r.aiter_lines():
                    payload = line[5:].strip() if line.startswith("data:") else ""
                    if payload == "[DONE]":
                        break
                    if payload:
                        for delta in state.feed(msgspec.json.decode(payload)):
                            yield delta
        except httpx.TimeoutException:
            raise UpstreamTimeoutError("upstream did not answer in time") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream connection failed ({type(exc).__name__})") from None
        finally:
            self._running -= 1
        for delta in state.final():
            yield delta

    async def unload(self) -> None:
        """Close the connection pool (in-flight streams end with a connection error)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def stats(self) -> EngineStats:
        """Requests forwarded now."""
        return EngineStats(running=self._running)


_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}


class _StreamState:
    """Turns upstream chunks into deltas; keeps finish reasons and usage for the end."""

    def __init__(self, n: int, mask: Callable[[str], str] = no_mask) -> None:
        self.mask = mask
        self.finish: list[FinishReason] = ["stop"] * n
        self.text_chunks = [0] * n
        self.usage: dict[str, int] | None = None

    def feed(self, chunk: dict[str, Any]) -> list[TokenDelta]:
        """Deltas carried by one chunk (text counts come at the end)."""
        if "error" in chunk:
            detail = clean_error_text(_message(chunk["error"]), self.mask)
            raise UpstreamError(f"upstream stream error: {detail}")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            delta = choice.get("delta") or {}
            # a completions chunk carries `text` where a chat chunk carries `delta.content`
            text = delta.get("content") or choice.get("text") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if choice.get("finish_reason"):
                self.finish[index] = _FINISH.get(choice["finish_reason"], "stop")
            if text or reasoning:
                self.text_chunks[index] += 1
                out.append(TokenDelta(text, 0, index, reasoning=reasoning))
        return out

    def final(self) -> list[TokenDelta]:
        """One closing delta per choice: exact counts from usage, else one per text chunk."""
        completion = self.usage.get("completion_tokens") if self.usage else None
        prompt = self.usage.get("prompt_tokens", 0) if self.usage else 0
        out = []
        for index, reason in enumerate(self.finish):
            if completion is not None:
                count = completion if index == 0 else 0
            else:
                count = self.text_chunks[index]
            out.append(TokenDelta("", count, index, reason, prompt))
        return out


def _message(error: Any) -> str:
    """The whole message of an upstream error object (cut only after masking)."""
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return str(error)


def _status_error(
    status: int, content: bytes, mask: Callable[[str], str] = no_mask
) -> WrapperError:
    """Map an upstream HTTP error onto our hierarchy; its text masked whole, then cut short."""
    try:
        detail = clean_error_text(_message(msgspec.json.decode(content).get("error", "")), mask)
    except (msgspec.DecodeError, AttributeError):
        detail = ""
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        return UpstreamError(f"upstream refused the credentials ({status})")
    if status == 429:
        return RateLimitError(f"upstream rate limit{suffix}", headers={"Retry-After": "1"})
    if status in (400, 422):
        return InvalidRequestError(f"upstream rejected the request{suffix}")
    if status in (408, 504):
        return UpstreamTimeoutError(f"upstream timed out ({status})")
    return UpstreamError(f"upstream answered {status}{suffix}")


def _trace_headers() -> dict[str, str]:
    """`traceparent`/`tracestate` for the current span; empty without OpenTelemetry or a span."""
    try:
        from opentelemetry.propagate import inject  # noqa: PLC0415  (optional extra "otel")
    except ImportError:
        return {}
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier
