"""`POST /v1/chat/completions` (and `/v1/completions`) served from the ASGI edge: the hot path.

Everything else goes through Litestar. This one route does not, because per request Litestar's
routing, signature model, dependency injection and exception middleware cost more CPU than the
whole of our serving logic, a sync guard runs in a worker thread (a thread hop, and a GIL
hand-off of up to 5 ms when the loop is busy), and per token its streaming response adds two
async layers, an anyio task group and two `send` wrappers (bench/overhead.py: README,
Performance). What the route needs of Litestar is done here directly, with the same outcome:
the API-key check (`service.auth.check_api`), the body limit (413), the error envelope and
`x-request-id` on every answer, the request context that telemetry reads (t0, handler start).

The SSE body is written by `stream_response`: frames the engine delivers together (ready
without waiting) leave in one `send`, up to `_BATCH_FRAMES` frames or `_BATCH_BYTES` bytes; the
first frame always leaves alone, at once, so TTFT is not traded for throughput. A client that
disconnects cancels the stream (a listener task per request, not per token) and the run is
closed whatever happened.

Must never: answer without the error envelope and `x-request-id`; read more than the body limit;
keep a run open after the response ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec

from schemas.converter import unstructure
from schemas.errors import ErrorDetail, RequestTooLargeError, WrapperError
from service.aio import resume, shielded
from service.auth import KeyRing, check_api, read_key_raw
from service.completions import CompletionServing
from service.context import STATE_KEY, Exchanges, RequestContext, request_id_from_headers
from service.errors import wrapper_error_payload
from service.logs import request_id_var
from service.serving import ChatServing

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
#: served the same way: `vllm bench serve` and evaluation harnesses drive this route by default
COMPLETIONS_PATH = "/v1/completions"
#: frames joined into one write when the engine hands them over together
_BATCH_FRAMES = 32
_BATCH_BYTES = 64 * 1024
_encode = msgspec.json.encode
_SSE_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)
_JSON_TYPE = (b"content-type", b"application/json")


class ClientGoneError(Exception):
    """The client disconnected before its request body was read."""


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def read_body(headers: list[tuple[bytes, bytes]], receive: Any, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed `limit`."""
    if _declared_length(headers) > limit:
        raise _too_large()
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large()
        if not message.get("more_body"):
            if not parts:  # the usual case: the whole body in one message, no copy
                return chunk
            parts.append(chunk)
            return b"".join(parts)
        parts.append(chunk)


def _too_large() -> RequestTooLargeError:
    return RequestTooLargeError(
        "request body is larger than the configured limit (IW_MAX_BODY_BYTES)"
    )


class ChatRoute:
    """The ASGI handler of `POST /v1/chat/completions` (state read from the app at call time).

    `serving` names the state attribute that opens runs: `serving` (chat, `ChatServing`) or
    `completions` (`service.completions.CompletionServing`, the same `open_run` contract).
    """

    __slots__ = ("_exchanges", "_serving", "_state")

    def __init__(self, state: Any, exchanges: Exchanges, serving: str = "serving") -> None:
        self._state = state
        self._exchanges = exchanges
        self._serving = serving

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one chat request; see the module docstring."""
        t0 = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        rid = request_id_from_headers(headers)
        ctx = RequestContext(rid, t0)
        scope.setdefault("state", {})[STATE_KEY] = ctx
        # the stall watch (service.context) cuts a connection whose client stops reading; it
        # needs the transport and the time the pending send began, as the edge records them
        ctx.transport = getattr(getattr(send, "__self__", None), "transport", None)
        rid_header = (b"x-request-id", rid.encode())
        token = request_id_var.set(rid)
        live = self._exchanges.live
        live.add(ctx)
        try:
            await self._serve(scope, headers, receive, _stamped(send, ctx), ctx, rid_header)
        finally:
            request_id_var.reset(token)
            live.discard(ctx)

    async def _serve(
        self,
        scope: Any,
        headers: list[tuple[bytes, bytes]],
        receive: Any,
        send: Any,
        ctx: RequestContext,
        rid_header: tuple[bytes, bytes],
    ) -> None:
        state = self._state
        serving: ChatServing | CompletionServing = getattr(state, self._serving)
        try:
            ring: KeyRing = state.keyring
            check_api(ring, read_key_raw(headers))
            serving.admission.check_open()  # stopping: refuse before reading the body
            ctx.handler_at = time.perf_counter()
            body = await read_body(headers, receive, state.settings.max_body_bytes)
            content_type = next((v for k, v in headers if k == b"content-type"), None)
            run = await serving.open_run(
                body,
                None if content_type is None else content_type.decode("latin-1"),
                ctx,
                headers,
            )
        except ClientGoneError:
            return
        except WrapperError as exc:
            await _send_error(send, state, exc, rid_header)
            return
        except Exception as exc:
            await _send_unexpected(send, exc, ctx, rid_header)
            return
        if run.req.stream:
            frames = run.frames()
            run.attach(frames)

            def refusal() -> WrapperError | None:
                return run.failure

            async def refuse(exc: WrapperError) -> None:
                await _send_error(send, state, exc, rid_header)

            await stream_response(
                frames, run.close, receive, send, rid_header, refusal=refusal, refuse=refuse
            )
            return
        try:
            try:
                result = await run.complete(receive)
            finally:
                await run.close()
        except WrapperError as exc:
            await _send_error(send, state, exc, rid_header)
            return
        except Exception as exc:
            await _send_unexpected(send, exc, ctx, rid_header)
            return
        payload = _encode(unstructure(result))
        await _send_whole(send, 200, payload, [_JSON_TYPE, rid_header])


def _stamped(send: Any, ctx: RequestContext) -> Any:
    """`send` that marks when it is blocked (one clock read each side, per write not frame)."""
    clock = time.perf_counter

    async def stamped(message: Any) -> None:
        ctx.sending_since = clock()
        await send(message)
        ctx.sending_since = 0.0

    return stamped


async def _send_whole(send: Any, status: int, body: bytes, headers: list[Any]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Any, state: Any, exc: WrapperError, rid: tuple[bytes, bytes]) -> None:
    status, payload, extra = wrapper_error_payload(state.secrets.mask, exc)
    headers = [_JSON_TYPE, rid]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await _send_whole(send, status, _encode(payload), headers)


async def _send_unexpected(
    send: Any, exc: Exception, ctx: RequestContext, rid: tuple[bytes, bytes]
) -> None:
    logger.error("unhandled error", exc_info=exc)
    detail = ErrorDetail(
        f"internal error (request id {ctx.request_id}); see the service log",
        "server_error",
        None,
        None,
    )
    await _send_whole(send, 500, _encode({"error": unstructure(detail)}), [_JSON_TYPE, rid])


# --- streaming ------------------------------------------------------------------------------------


async def _pump(frames: AsyncIterator[bytes], send: Any, *, first: bool = True) -> None:
    """Write `frames` to the client, joining those that are ready together (module docstring).

    `first=False`: the first frame was sent already (batching starts at once).
    """
    anext_ = frames.__anext__
    batch: list[bytes] = []
    size = 0
    while True:
        step = anext_()
        try:
            yielded = step.send(None)  # type: ignore[attr-defined]
        except StopIteration as ready:  # the next frame was ready without waiting
            frame: bytes = ready.value
        except StopAsyncIteration:
            break
        else:  # the engine has nothing yet: what is ready leaves now, then wait for more
            if batch:
                await send(
                    {"type": "http.response.body", "body": b"".join(batch), "more_body": True}
                )
                batch.clear()
                size = 0
            try:
                frame = await resume(step, yielded)
            except StopAsyncIteration:
                break
        if first:
            first = False
            await send({"type": "http.response.body", "body": frame, "more_body": True})
            continue
        batch.append(frame)
        size += len(frame)
        if len(batch) >= _BATCH_FRAMES or size >= _BATCH_BYTES:
            await send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})
            batch.clear()
            size = 0
    await send({"type": "http.response.body", "body": b"".join(batch), "more_body": False})


async def stream_response(
    frames: AsyncIterator[bytes],
    on_close: Callable[[], Coroutine[Any, Any, None]],
    receive: Any,
    send: Any,
    rid_header: tuple[bytes, bytes],
    *,
    refusal: Callable[[], WrapperError | None] | None = None,
    refuse: Callable[[WrapperError], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Send an SSE response from `frames`; a disconnect cancels it; `on_close` always runs.

    The 200 and its headers wait for the first frame, which follows them at once (TTFT is the
    same): when `refusal()` has an error by then (the engine refused the request before its
    first token: max_tokens above the context, a sampling check), `refuse` answers it instead,
    as a plain JSON error with its status, as vLLM does, never a 200 with an error event.
    """
    task = asyncio.current_task()
    assert task is not None  # noqa: S101  (called from the server's request task)
    gone = False

    async def listen() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    listener = asyncio.get_running_loop().create_task(listen())
    try:
        try:
            head: bytes | None = await frames.__anext__()
        except StopAsyncIteration:
            head = None
        failed = refusal() if refusal is not None else None
        if failed is not None and refuse is not None:
            await refuse(failed)
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, rid_header]}
        )
        if head is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send({"type": "http.response.body", "body": head, "more_body": True})
        await _pump(frames, send, first=False)
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
    finally:
        listener.cancel()
        # shielded: a cancelled response (client gone) must still release its slot
        await shielded(on_close())
