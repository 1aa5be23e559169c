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

Must never: do work in the signal handler beyond scheduling a callback on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Generator
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

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self.signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_task: asyncio.Task[None] | None = None

    def _drainer(self) -> Drainer | None:
        state = getattr(self.app, "state", None)
        drainer: Drainer | None = getattr(state, "stopper", None) if state is not None else None
        return drainer

    async def startup(self, sockets: Any = None) -> None:
        """Remember the loop the signal handler schedules the drain on, then start."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

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
