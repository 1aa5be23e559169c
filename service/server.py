"""The uvicorn server, with a stop shaped for Kubernetes.

Plain uvicorn, on SIGTERM, stops its main loop, waits `timeout_graceful_shutdown` for open
connections, then cancels whatever still runs (every live stream ends as a truncated body and an
`Exception in ASGI application` traceback) and only then tells the app to shut down. Here the
first SIGTERM or SIGINT starts the app's own `drain_and_stop()` (service/app.py `GracefulStop`)
while uvicorn keeps serving: `/ready` turns 503 and new requests get 503 at once, in-flight
requests get `IW_DRAIN_TIMEOUT_S` to finish, the rest end with a `shutting_down` error event and
`[DONE]`, and the engine is unloaded. Only then is uvicorn told to exit, and by then every
response has ended, so it has nothing to cut. A second signal skips what is left of the drain;
a third makes uvicorn exit at once.

uvicorn re-raises a caught signal after it has shut down (so a parent sees "killed by SIGTERM");
a stop that went as planned exits 0 instead, which is what Kubernetes and `make serve` expect.

Liveness on its own port (`IW_HEALTH_PORT`): `/health` on the main port is answered before
routing, but still on the event loop, and a loop busy with hundreds of streams on 2 cores answers
it late (p99 in the hundreds of ms). A tiny HTTP listener in a thread of its own answers within
the GIL's switch interval instead. It says 200 while uvicorn's main loop has ticked within
`LOOP_STALL_S` (a hung loop is a dead process to an orchestrator), else 503.

Must never: do work in the signal handler beyond scheduling a callback on the event loop; let
the probe thread touch the app's state (it reads one float).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any, Protocol

import uvicorn

logger = logging.getLogger(__name__)

#: the signals that stop the server (Ctrl-C and Kubernetes' SIGTERM)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Drainer(Protocol):
    """What the server needs from the app to stop it gracefully (`GracefulStop`)."""

    async def drain_and_stop(self) -> None:
        """Refuse new requests, drain, end the rest, unload."""
        ...

    def hurry(self) -> None:
        """End the drain now."""
        ...


class WrapperServer(uvicorn.Server):
    """uvicorn whose signal handling drains the app first (see the module docstring)."""

    #: the event loop may go this long without a tick before liveness says 503
    LOOP_STALL_S = 30.0

    def __init__(self, config: uvicorn.Config, app: Any, health_port: int | None = None) -> None:
        super().__init__(config)
        self.app = app
        self.signals = 0
        self.health_port = health_port
        self.heartbeat = time.monotonic()
        self._probe: _ProbeServer | None = None
        self._probe_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_task: asyncio.Task[None] | None = None

    def loop_alive(self) -> bool:
        """The main loop ticked recently (read from the probe thread: one float)."""
        return time.monotonic() - self.heartbeat < self.LOOP_STALL_S

    async def on_tick(self, counter: int) -> bool:
        """The 10 Hz tick of uvicorn, stamped for the liveness listener."""
        self.heartbeat = time.monotonic()
        return await super().on_tick(counter)

    def _start_probe(self) -> None:
        if self.health_port is None:
            return
        self._probe = _ProbeServer((self.config.host, self.health_port), self.loop_alive)
        self._probe_thread = threading.Thread(
            target=self._probe.serve_forever, kwargs={"poll_interval": 0.5}, name="liveness",
            daemon=True,
        )  # fmt: skip
        self._probe_thread.start()
        logger.info(
            "liveness: GET /health on %s:%d (own thread)", self.config.host, self.health_port
        )

    def _stop_probe(self) -> None:
        if self._probe is not None:
            self._probe.shutdown()
            self._probe.server_close()
            self._probe = None

    def _drainer(self) -> Drainer | None:
        state = getattr(self.app, "state", None)
        drainer: Drainer | None = getattr(state, "stopper", None) if state is not None else None
        return drainer

    async def startup(self, sockets: Any = None) -> None:
        """Remember the loop the signal handler schedules the drain on, then start."""
        self._loop = asyncio.get_running_loop()
        self._start_probe()
        await super().startup(sockets=sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        """The shutdown of uvicorn, then the liveness listener goes too."""
        try:
            await super().shutdown(sockets=sockets)
        finally:
            await asyncio.to_thread(self._stop_probe)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Handle the stop signals while serving; unlike uvicorn, do not re-raise them after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain (scheduled on the loop); second: hurry; third: exit now."""
        self.signals += 1
        loop = self._loop
        if loop is None or self._drainer() is None or not self.started:
            # not serving yet (lifespan still starting): nothing to drain
            super().handle_exit(sig, frame)
            self.force_exit = self.signals > 1
            return
        if self.signals == 1:
            loop.call_soon_threadsafe(self._begin_stop, sig)
        elif self.signals == 2:
            loop.call_soon_threadsafe(self._hurry)
        else:
            self.should_exit = True
            self.force_exit = True

    def _begin_stop(self, sig: int) -> None:
        logger.info("received %s: stopping gracefully", signal.Signals(sig).name)
        self._stop_task = asyncio.get_running_loop().create_task(self._stop(), name="stop")

    def _hurry(self) -> None:
        logger.warning("second stop signal: ending the drain now")
        drainer = self._drainer()
        if drainer is not None:
            drainer.hurry()

    async def _stop(self) -> None:
        drainer = self._drainer()
        try:
            if drainer is not None:
                await drainer.drain_and_stop()
        except Exception:
            logger.exception("graceful stop failed; stopping anyway")
        finally:
            # every response has ended: uvicorn closes idle connections and exits its loop
            self.should_exit = True


__all__ = ["STOP_SIGNALS", "WrapperServer"]


def _probe_response(status: str, body: bytes, *, head: bool = False) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode() + (b"" if head else body)


_OK = b'{"status":"ok"}'
_STALLED = b'{"status":"event loop stalled"}'
_NOT_FOUND = _probe_response("404 Not Found", b'{"status":"not found"}')
_BAD = _probe_response("400 Bad Request", b'{"status":"bad request"}')
#: the most of a probe request that is read: a request line and a few headers
_MAX_REQUEST = 4096


class _ProbeHandler(socketserver.BaseRequestHandler):
    """`GET`/`HEAD /health`, one request per connection, bounded in size and time.

    Deliberately not `http.server`: its header parsing is Python work that waits for the GIL
    at every step, which is the cost this listener exists to avoid.
    """

    server: _ProbeServer

    def handle(self) -> None:
        """Read the request head (bounded), answer, close."""
        sock: socket.socket = self.request
        sock.settimeout(2.0)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < _MAX_REQUEST:
                chunk = sock.recv(_MAX_REQUEST - len(data))
                if not chunk:
                    break
                data += chunk
            method, _, rest = data.partition(b" ")
            target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD") or b"\r\n" not in data:
                reply = _BAD
            elif target != b"/health":
                reply = _NOT_FOUND
            elif self.server.loop_alive():
                reply = _probe_response("200 OK", _OK, head=method == b"HEAD")
            else:
                reply = _probe_response("503 Service Unavailable", _STALLED, head=method == b"HEAD")
            sock.sendall(reply)
        except OSError:
            return


class _ProbeServer(socketserver.TCPServer):
    """One connection at a time (probes are tiny); knows when the event loop last ticked."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], loop_alive: Callable[[], bool]) -> None:
        self.loop_alive = loop_alive
        super().__init__(address, _ProbeHandler)
