"""`jsonl_log`: one JSON line per exchange (prompts, completions, usage, metrics) to a file.

Lines are built, masked with the service's secret store and written by one thread of the hook's
own, fed through a bounded queue: the event loop never waits on the disk, and a disk slower than
the traffic loses lines (counted in the log) instead of memory. The file is rotated by size
(`path.1` … `path.N`).

Must never: write a line before masking it; grow without bound (queue and file are both bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import queue
import threading
from pathlib import Path
from typing import IO, Any, ClassVar

import msgspec
from attrs import field, frozen

from hooks.base import Exchange, Hook, HookSetup
from schemas.converter import unstructure
from schemas.validators import FieldValueError, in_range

logger = logging.getLogger(__name__)
_STOP = object()


def _writable_parent(_: Any, attribute: Any, value: str) -> None:
    path = Path(value)
    if not value or path.is_dir():
        raise FieldValueError(attribute.name, f"{attribute.name} must name a file")
    if not path.parent.is_dir():
        raise FieldValueError(attribute.name, f"{attribute.name}: its folder does not exist")


@frozen
class JsonlLogParams:
    """Where and how much to log."""

    path: str = field(validator=_writable_parent)
    """The log file (its folder must exist); rotated copies are path.1 ... path.N."""
    max_bytes: int = field(default=100 * 1024 * 1024, validator=in_range(4096))
    """Size at which the file is rotated."""
    backups: int = field(default=3, validator=in_range(0, 100))
    """Rotated files kept."""
    include_prompts: bool = True
    """Log the request's messages (after the hooks before this one amended them)."""
    include_completions: bool = True
    """Log the generated text, as sent to the client."""
    queue_size: int = field(default=1000, validator=in_range(1, 100_000))
    """Exchanges waiting for the writer thread; beyond it they are dropped."""


class JsonlLogHook(Hook):
    """Log each exchange as a JSON line (secrets masked), rotated by size."""

    params_type: ClassVar[type[Any]] = JsonlLogParams

    def __init__(self, params: Any, setup: HookSetup) -> None:
        super().__init__(params, setup)
        p: JsonlLogParams = params
        self.path = Path(p.path)
        # opened now so that an unwritable path stops start-up, not the first request
        self._file: IO[bytes] | None = self.path.open("ab")
        self._queue: queue.Queue[Any] = queue.Queue(p.queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        self.written = 0

    async def after_response(self, exchange: Exchange) -> None:
        """Hand the exchange to the writer thread (never waits)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"iw-hook-{self.name}", daemon=True
                    )
                    self._thread.start()
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                logger.warning("hook %s: %d lines dropped (disk too slow)", self.name, self.dropped)

    def line(self, exchange: Exchange) -> bytes:
        """The masked JSON line of one exchange."""
        p: JsonlLogParams = self.params
        record: dict[str, Any] = {
            "ts": dt.datetime.now(tz=dt.UTC).isoformat(timespec="milliseconds"),
            "request_id": exchange.request_id,
            "model": exchange.model,
            "backend": exchange.backend,
            "preset": exchange.preset,
            "stream": exchange.stream,
            "status": exchange.status,
            "finish_reasons": list(exchange.finish_reasons),
            "usage": dict(exchange.usage),
            "metrics": dict(exchange.metrics),
            "tags": dict(exchange.tags),
        }
        if p.include_prompts:
            record["messages"] = unstructure(exchange.request.messages)
            prompt = exchange.request.prompt
            if prompt is not None:  # a raw prompt (/v1/completions): text or token ids
                record["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        if p.include_completions:
            record["completions"] = list(exchange.completions)
        if exchange.error is not None:
            record["error"] = unstructure(exchange.error)
        # masked after encoding: the store matches the JSON-escaped form of each secret too
        text = self.setup.mask(msgspec.json.encode(record).decode())
        return text.encode() + b"\n"

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._write(self.line(item))
            except Exception:
                logger.exception("hook %s could not write a line", self.name)

    def _write(self, data: bytes) -> None:
        p: JsonlLogParams = self.params
        f = self._file
        if f is None:
            return
        if f.tell() and f.tell() + len(data) > p.max_bytes:
            f = self._rotate()
        f.write(data)
        f.flush()
        self.written += 1

    def _rotate(self) -> IO[bytes]:
        p: JsonlLogParams = self.params
        assert self._file is not None  # noqa: S101  (only called with a file open)
        self._file.close()
        if p.backups:
            for n in range(p.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("ab")
        return self._file

    async def close(self) -> None:
        """Write what is queued (bounded wait), stop the thread, close the file."""
        thread = self._thread
        if thread is not None:
            with contextlib.suppress(queue.Full):
                await asyncio.to_thread(self._queue.put, _STOP, timeout=5)
            await asyncio.to_thread(thread.join, 5)
        if self._file is not None:
            self._file.close()
            self._file = None
