"""Per-request context captured at the ASGI edge: arrival time and request id.

`t0` is taken when the ASGI app receives the request, before body parsing and auth, because that
is where a client's clock starts too (DESIGN.md, metric definitions). The request id is the
client's own `x-request-id` when it is a sane token, else a fresh one; it is echoed on every
response, errors and 404s included.

The edge also keeps the set of exchanges in progress and, for each, since when its current
`send()` has been blocked. A client that stops reading shows up in ASGI only that way: uvicorn's
`send()` waits on transport flow control (`FlowControl.drain()`) once the write buffer is full,
and stays there for as long as the client does not read. `StallWatch` (one task for the whole
process, never one per frame) cuts such an exchange by aborting its transport, which uvicorn
turns into an ordinary client disconnect: the stream's engine request is aborted and its slot and
in-flight ticket come back through the same path as for a client that closed the socket.

Must never: trust a client header as anything but an opaque label; add per-frame work beyond one
clock read and two attribute writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from litestar.types import Message, Receive, Scope, Send

from service.logs import request_id_var

logger = logging.getLogger(__name__)

_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
#: the same rule over raw header bytes (the `/health` fast path does not decode)
SANE_ID_BYTES = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")
STATE_KEY = "iw_context"


class RequestContext:
    """What the edge knows about a request."""

    __slots__ = ("cut", "handler_at", "request_id", "sending_since", "t0", "ticket", "transport")

    def __init__(self, request_id: str, t0: float) -> None:
        self.request_id = request_id
        self.t0 = t0
        self.handler_at: float | None = None
        self.sending_since = 0.0
        """perf_counter() when the pending `send()` began; 0 when none is pending."""
        self.transport: Any = None
        """The server's transport for this exchange, when the server exposes it (uvicorn)."""
        self.ticket: Any = None
        """The in-flight ticket of a chat request (its `aborted` flag speeds up a cut)."""
        self.cut = False
        """Set when the stall watch cut this exchange."""

    def stalled_for(self, now: float) -> float:
        """Seconds the pending `send()` has been blocked (0 when none is pending)."""
        since = self.sending_since
        return now - since if since else 0.0

    def abort_connection(self) -> bool:
        """Drop the connection now (buffered bytes too); False when there is no transport."""
        transport = self.transport
        if transport is None or self.cut:
            return False
        self.cut = True
        transport.abort()
        return True


class Exchanges:
    """The HTTP exchanges in progress (a set: add and discard are O(1) per request)."""

    __slots__ = ("live",)

    def __init__(self) -> None:
        self.live: set[RequestContext] = set()

    def blocked(self, min_s: float) -> list[RequestContext]:
        """Exchanges whose pending `send()` has been blocked for at least `min_s` seconds."""
        now = time.perf_counter()
        return [ctx for ctx in list(self.live) if ctx.stalled_for(now) >= min_s]


class StallWatch:
    """Cuts exchanges whose client accepts no bytes (see the module docstring).

    A send blocked for `stall_s` is cut; once its request was aborted (unload, shutdown) one
    blocked for `aborted_s` is cut too, so that an unload never waits on a client that is gone.
    """

    def __init__(self, exchanges: Exchanges, stall_s: float, *, aborted_s: float = 1.0) -> None:
        self.exchanges = exchanges
        self.stall_s = stall_s
        self.aborted_s = min(aborted_s, stall_s)
        self.period_s = max(0.05, min(1.0, stall_s / 4))
        self.cuts = 0
        self._task: asyncio.Task[None] | None = None

    def sweep(self) -> int:
        """Cut what is stalled now; the number of connections cut."""
        cut = 0
        for ctx in self.exchanges.blocked(self.aborted_s):
            now = time.perf_counter()
            blocked = ctx.stalled_for(now)
            aborted = ctx.ticket is not None and ctx.ticket.aborted
            if (blocked >= self.stall_s or aborted) and ctx.abort_connection():
                cut += 1
                logger.warning(
                    "client accepted no bytes for %.1f s: connection cut (request %s)",
                    blocked,
                    ctx.request_id,
                )
        self.cuts += cut
        return cut

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                self.sweep()
            except Exception:
                logger.exception("stall sweep failed")

    def start(self) -> None:
        """Start the sweeping task (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stall-watch")

    async def stop(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def new_request_id() -> str:
    """A fresh opaque id."""
    return uuid.uuid4().hex


def context_of(scope: Scope | dict[str, Any]) -> RequestContext:
    """The context the edge stored (a fresh one for scopes that bypassed it, e.g. tests)."""
    state = scope.setdefault("state", {})
    ctx = state.get(STATE_KEY)
    if ctx is None:
        ctx = state[STATE_KEY] = RequestContext(new_request_id(), time.perf_counter())
    return ctx


def request_id_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's `x-request-id` when it is a sane token, else a fresh id."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_ID.fullmatch(candidate):
                return candidate
            break
    return new_request_id()


async def edge(
    app: Any, scope: Scope, receive: Receive, send: Send, exchanges: Exchanges | None = None
) -> None:
    """Stamp t0 and the request id, then call `app` with a send that adds `x-request-id`."""
    t0 = time.perf_counter()
    rid = request_id_from_headers(scope.get("headers", ()))
    ctx = scope.setdefault("state", {})[STATE_KEY] = RequestContext(rid, t0)
    # uvicorn's `send` is a bound method of the exchange, which holds the transport
    ctx.transport = getattr(getattr(send, "__self__", None), "transport", None)
    header = (b"x-request-id", rid.encode())
    clock = time.perf_counter

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
            message = {**message, "headers": [*headers, header]}
        ctx.sending_since = clock()
        await send(message)
        ctx.sending_since = 0.0

    token = request_id_var.set(rid)
    if exchanges is not None:
        exchanges.live.add(ctx)
    try:
        await app(scope, receive, send_with_id)
    finally:
        request_id_var.reset(token)
        if exchanges is not None:
            exchanges.live.discard(ctx)
