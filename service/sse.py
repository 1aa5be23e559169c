r"""Server-sent events for chat streams: OpenAI chunk framing and a response that always cleans up.

Chunks are rendered from byte templates made once per stream: the per-token work is one msgspec
string encode and a few concatenations. Framing is `data: <json>\\n\\n` (LF only; Litestar's
`ServerSentEvent` would use CRLF and treat dicts as SSE fields, which OpenAI clients do not expect).

`SSEStream` is Litestar's `Stream` whose ASGI response runs a close callback however the response
ends (finished, client gone, send failed), because an async generator that was never started does
not run its `finally`, and the in-flight ticket and queue slot must come back regardless.

Must never: put anything but `data: ` lines in the stream; send `usage` on chunks unless the
client asked for it; let the role delta travel ahead of the first token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import msgspec
from litestar import Request
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from schemas.errors import ErrorDetail

_encode = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """Renders the `chat.completion.chunk` events of one stream."""

    __slots__ = ("_head", "_role", "_tail", "_text_heads", "_text_tail")

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
        role: str = "assistant",
    ) -> None:
        # vLLM's rule: the answer's role is "assistant", or the last message's role when the
        # request asked for no generation prompt (the model continues that turn)
        self._role = b'"role":' + _encode(role)
        self._head = (
            b'data: {"id":'
            + _encode(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + _encode(model)
        )
        self._tail = (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self._text_heads: dict[int, bytes] = {}
        self._text_tail = b'},"logprobs":null,"finish_reason":null}]' + self._tail

    def text(self, index: int, content: str) -> bytes:
        """`delta(index, content)` for the common frame, text only, in one concatenation."""
        head = self._text_heads.get(index)
        if head is None:
            head = self._text_heads[index] = (
                self._head
                + b',"choices":[{"index":'
                + str(index).encode()
                + b',"delta":{"content":'
            )
        return head + _encode(content) + self._text_tail

    def delta(
        self,
        index: int,
        content: str | None,
        *,
        role: bool = False,
        reasoning: str | None = None,
        logprobs: dict[str, Any] | None = None,
        token_ids: tuple[int, ...] | None = None,
    ) -> bytes:
        """A chunk carrying generated text for choice `index` (role on the first one).

        `token_ids`: vLLM's `return_token_ids`, this chunk's token ids on the choice.
        """
        parts = []
        if role:
            parts.append(self._role)
        if reasoning:
            parts.append(b'"reasoning_content":' + _encode(reasoning))
        if content is not None:
            parts.append(b'"content":' + _encode(content))
        delta = b"{" + b",".join(parts) + b"}"
        lp = _encode(logprobs) if logprobs is not None else b"null"
        return (
            self._head
            + b',"choices":[{"index":'
            + str(index).encode()
            + b',"delta":'
            + delta
            + b',"logprobs":'
            + lp
            + b',"finish_reason":null'
            + (b',"token_ids":' + _encode(token_ids) if token_ids is not None else b"")
            + b"}]"
            + self._tail
        )

    def tool_calls(self, index: int, calls: list[dict[str, Any]], *, role: bool = False) -> bytes:
        """A chunk carrying `tool_calls` deltas (off the text path: tool answers only)."""
        delta = (
            (b"{" + self._role + b"," if role else b"{") + b'"tool_calls":' + _encode(calls) + b"}"
        )
        return (
            self._head
            + b',"choices":[{"index":'
            + str(index).encode()
            + b',"delta":'
            + delta
            + b',"logprobs":null,"finish_reason":null}]'
            + self._tail
        )

    def with_prompt_token_ids(self, chunk: bytes, ids: tuple[int, ...]) -> bytes:
        """`chunk` with vLLM's top-level `prompt_token_ids` (the stream's first token chunk)."""
        return chunk[: -len(self._tail)] + b',"prompt_token_ids":' + _encode(ids) + self._tail

    def finish(
        self,
        index: int,
        reason: str,
        *,
        role: bool = False,
        metrics: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> bytes:
        """The chunk that ends choice `index` (empty delta; role + empty content if none sent).

        `stop_reason` is sent on it as vLLM does (null, the stop string or the stop token id).
        """
        delta = b"{" + self._role + b',"content":""}' if role else b"{}"
        extra = b',"metrics":' + _encode(metrics) if metrics is not None else b""
        return (
            self._head
            + b',"choices":[{"index":'
            + str(index).encode()
            + b',"delta":'
            + delta
            + b',"logprobs":null,"finish_reason":'
            + _encode(reason)
            + b',"stop_reason":'
            + _encode(stop_reason)
            + b"}]"
            + extra
            + self._tail
        )

    def with_usage(self, chunk: bytes, usage: dict[str, int]) -> bytes:
        """`chunk` (text, delta or finish) with `usage` in place of `"usage":null`.

        vLLM's `stream_options.continuous_usage_stats`: the counts so far on every chunk.
        """
        return chunk[: -len(self._tail)] + b',"usage":' + _encode(usage) + b"}\n\n"

    def usage(self, usage: dict[str, int], metrics: dict[str, Any] | None) -> bytes:
        """The last chunk with `include_usage`: no choices, the usage, and our metrics."""
        extra = b',"metrics":' + _encode(metrics) if metrics is not None else b""
        return self._head + b',"choices":[],"usage":' + _encode(usage) + extra + b"}\n\n"


def error_event(detail: ErrorDetail) -> bytes:
    """A terminal error event, as vLLM and OpenAI send when a stream fails after it started."""
    body = {"error": {"message": detail.message, "type": detail.type, "param": detail.param,
                      "code": detail.code}}  # fmt: skip
    return b"data: " + _encode(body) + b"\n\n"


class _ClosingResponse:
    """Runs Litestar's streaming response, then `on_close`, whatever happened in between."""

    __slots__ = ("_inner", "_on_close")

    def __init__(self, inner: ASGIResponse, on_close: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            # shielded: a cancelled response (client gone) must still release its slot
            with anyio.CancelScope(shield=True):
                await self._on_close()


class SSEStream(Stream):
    """`text/event-stream` response with a close callback (see module docstring)."""

    def __init__(
        self, content: Any, *, on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, media_type="text/event-stream", status_code=200, **kwargs)
        self.headers.setdefault("Cache-Control", "no-cache")
        self.headers.setdefault("X-Accel-Buffering", "no")
        self._on_close = on_close

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], **kwargs: Any
    ) -> ASGIResponse:
        """Litestar's streaming response, wrapped so that `on_close` always runs."""
        # the handler's default media type (JSON) would otherwise win over ours
        kwargs["media_type"] = "text/event-stream"
        inner = super().to_asgi_response(app, request, **kwargs)
        # Litestar only calls the result as an ASGI app, which the wrapper is
        return cast("ASGIResponse", _ClosingResponse(inner, self._on_close))
