"""Per-request context captured at the ASGI edge: arrival time and request id.

`t0` is taken when the ASGI app receives the request, before body parsing and auth, because that
is where a client's clock starts too (DESIGN.md, metric definitions). The request id is the
client's own `x-request-id` when it is a sane token, else a fresh one; it is echoed on every
response, errors and 404s included.

Must never: trust a client header as anything but an opaque label.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from litestar.types import Message, Receive, Scope, Send

from service.logs import request_id_var

_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
STATE_KEY = "iw_context"


class RequestContext:
    """What the edge knows about a request."""

    __slots__ = ("handler_at", "request_id", "t0")

    def __init__(self, request_id: str, t0: float) -> None:
        self.request_id = request_id
        self.t0 = t0
        self.handler_at: float | None = None


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


async def edge(app: Any, scope: Scope, receive: Receive, send: Send) -> None:
    """Stamp t0 and the request id, then call `app` with a send that adds `x-request-id`."""
    t0 = time.perf_counter()
    rid = request_id_from_headers(scope.get("headers", ()))
    scope.setdefault("state", {})[STATE_KEY] = RequestContext(rid, t0)
    header = (b"x-request-id", rid.encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
            message = {**message, "headers": [*headers, header]}
        await send(message)

    token = request_id_var.set(rid)
    try:
        await app(scope, receive, send_with_id)
    finally:
        request_id_var.reset(token)
