"""Limits at the HTTP edge, enforced by the server before the app (and so before auth) runs.

uvicorn bounds neither the size nor the number of request headers (httptools keeps appending
whatever a client sends), has no header-read or body-read timeout (a client that trickles one byte
a second holds its connection for ever) and does not cap connections (`limit_concurrency` only
answers 503 once a whole header block has been read). `LimitedHttpToolsProtocol` adds all of that
to uvicorn's httptools protocol, the fast parser `uvicorn[standard]` already installs:

- header bytes per request (`IW_MAX_HEADER_BYTES`) and header count (`IW_MAX_HEADERS`) → 431;
  bytes beyond the limit are never handed to the parser, so memory stays bounded;
- the header block must arrive within `IW_HEADER_TIMEOUT_S` of its first byte (or of the
  connection opening) → 408, and the body within `IW_BODY_TIMEOUT_S` of the header block → 408;
- an idle keep-alive connection is closed after `IW_KEEPALIVE_S` (uvicorn's own timer);
- at most `IW_MAX_CONNECTIONS` open connections; the next is answered 503 and closed.

Every answer the server writes itself (these, and uvicorn's 400 for malformed HTTP) carries the
OpenAI error envelope and an `x-request-id`, like the app's own errors.

`server_options(settings)` returns the keyword arguments for `uvicorn.Config`/`uvicorn.run`.

Must never: read more than the header limit into memory before answering; import the app.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.settings import Settings

__all__ = ["EdgeLimits", "LimitedHttpToolsProtocol", "server_options"]

logger = logging.getLogger("inference_wrapper.http")


class EdgeLimits:
    """The numbers the protocol enforces (one instance per server, read by every connection)."""

    __slots__ = (
        "body_timeout_s",
        "header_timeout_s",
        "max_connections",
        "max_header_bytes",
        "max_headers",
    )

    def __init__(
        self,
        *,
        max_header_bytes: int,
        max_headers: int,
        header_timeout_s: float,
        body_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        """The limits a `Settings` names."""
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


class _TooManyHeadersError(Exception):
    """Raised from the parser callback to stop parsing at the header that broke the count."""


def _error_bytes(status: int, message: str, code: str, error_type: str) -> bytes:
    """A complete HTTP/1.1 response carrying the error envelope; the connection then closes."""
    body = msgspec.json.encode(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )
    head = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"x-request-id: " + uuid.uuid4().hex.encode() + b"\r\n",
        b"connection: close\r\n",
        b"\r\n",
    ]
    return b"".join(head) + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits, read timeouts and a connection cap."""

    #: set by `server_options` on a subclass made per server (uvicorn builds the protocol itself)
    limits: EdgeLimits

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._read_timer: TimerHandle | None = None
        self._refused = False
        self._too_many_headers = False

    # --- connection -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse beyond the connection cap; start the clock for the first header block."""
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                503,
                "too many open connections (IW_MAX_CONNECTIONS); retry shortly",
                "too_many_connections",
                "server_error",
            )
            return
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the read timer with the connection."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser at most the header budget while a header block is being read."""
        if self._refused:
            return
        if self._awaiting_headers and self._read_timer is None:
            # bytes after an idle keep-alive: uvicorn's keep-alive timer is cancelled below
            self._arm(self.limits.header_timeout_s, self._header_timeout)
        if self._awaiting_headers:
            budget = self.limits.max_header_bytes - self._header_bytes
            if len(data) > budget:
                # feed only what the budget allows: if the header block ends inside it, the
                # rest (body, or a pipelined request) follows; if not, 431 without reading more
                self._feed(data[: max(budget, 0)])
                if self._refused or self.transport.is_closing():
                    return
                if self._headers_pending():
                    self._refuse_headers("request headers exceed IW_MAX_HEADER_BYTES")
                    return
                data = data[max(budget, 0) :]
            else:
                self._header_bytes += len(data)
        self._feed(data)

    def _headers_pending(self) -> bool:
        """Whether the parser is still inside a header block (a callback may have changed it)."""
        return self._awaiting_headers

    def _current_cycle(self) -> RequestResponseCycle | None:
        # uvicorn types `cycle` as always set; it is None until the first header block ends
        return self.cycle

    def _feed(self, data: bytes) -> None:
        if not data:
            return
        super().data_received(data)

    # --- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A new request: fresh header budget."""
        self._awaiting_headers = True
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count headers; stop the parser at the first one over the limit."""
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            # httptools turns a callback's exception into a parser error, which uvicorn answers
            # through send_400_response: the flag makes that answer a 431
            self._too_many_headers = True
            raise _TooManyHeadersError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """Headers done: the body clock starts."""
        self._awaiting_headers = False
        self._header_bytes = 0
        self._disarm()
        super().on_headers_complete()
        if not self.parser.should_upgrade():
            self._arm(self.limits.body_timeout_s, self._body_timeout)

    def on_message_complete(self) -> None:
        """Body done: no read clock until the next request's first byte."""
        self._disarm()
        self._awaiting_headers = True
        self._header_bytes = 0
        super().on_message_complete()

    # --- errors the server answers itself -------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """The answer uvicorn gives malformed HTTP, in the envelope."""
        if self._too_many_headers:
            self._refuse_headers("too many request headers (IW_MAX_HEADERS)")
            return
        self._refuse(400, msg, "invalid_http_request", "invalid_request_error")

    def _refuse_headers(self, message: str) -> None:
        logger.warning("refused a request: %s", message)
        self._refuse(431, message, "request_header_fields_too_large", "invalid_request_error")

    def _header_timeout(self) -> None:
        self._read_timer = None
        if self._header_bytes == 0 and self._current_cycle() is None:
            # a connection that never sent a byte: nobody to answer
            self.transport.close()
            return
        logger.warning("closed a connection: header block not received in IW_HEADER_TIMEOUT_S")
        self._refuse(
            408,
            "request headers not received in time (IW_HEADER_TIMEOUT_S)",
            "request_timeout",
            "invalid_request_error",
        )

    def _body_timeout(self) -> None:
        self._read_timer = None
        cycle = self._current_cycle()
        if cycle is None or not cycle.more_body:
            return
        logger.warning("closed a connection: request body not received in IW_BODY_TIMEOUT_S")
        # the app sees a disconnect; whatever it sends later goes nowhere
        cycle.disconnected = True
        cycle.message_event.set()
        if cycle.response_started:
            self.transport.close()
            return
        self._refuse(
            408,
            "request body not received in time (IW_BODY_TIMEOUT_S)",
            "request_timeout",
            "invalid_request_error",
        )

    def _refuse(self, status: int, message: str, code: str, error_type: str) -> None:
        self._refused = True
        self._disarm()
        cycle = self._current_cycle()
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.write(_error_bytes(status, message, code, error_type))
            self.transport.close()

    # --- timer ----------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None


def protocol_class(limits: EdgeLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to `limits` (uvicorn instantiates it with its own arguments)."""
    return type("BoundLimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` / `uvicorn.run` that enforce the edge limits."""
    return {
        "http": protocol_class(EdgeLimits.from_settings(settings)),
        # uvicorn takes whole seconds here; round up so a setting of 0.5 never means "at once"
        "timeout_keep_alive": max(1, int(-(-settings.keepalive_s // 1))),
        # our own protocol caps connections with an enveloped 503; uvicorn's limit_concurrency
        # would also count streaming tasks and answer in plain text
        "limit_concurrency": None,
    }
