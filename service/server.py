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
import http.server
import logging
import signal
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


class _ProbeHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /health on the liveness port; anything else 404. Short socket timeout."""

    timeout = 2.0
    protocol_version = "HTTP/1.1"
    server: _ProbeServer

    def _answer(self, *, body: bool) -> None:
        if self.path.split("?", 1)[0] != "/health":
            status, payload = 404, b'{"status":"not found"}'
        elif self.server.loop_alive():
            status, payload = 200, b'{"status":"ok"}'
        else:
            status, payload = 503, b'{"status":"event loop stalled"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        # one request per connection: the listener serves connections one at a time
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        """Liveness."""
        self._answer(body=True)

    def do_HEAD(self) -> None:
        """Liveness without a body."""
        self._answer(body=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (base signature)
        """Probes every few seconds would drown the log: silent."""


class _ProbeServer(http.server.HTTPServer):
    """One connection at a time (probes are tiny); knows when the event loop last ticked."""

    def __init__(self, address: tuple[str, int], loop_alive: Callable[[], bool]) -> None:
        self.loop_alive = loop_alive
        super().__init__(address, _ProbeHandler)
