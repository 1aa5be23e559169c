"""Logging set-up: JSON or text lines, request ids, and secret masking after formatting.

Masking sits in the formatter, after the message, its arguments and any traceback have been
rendered into the final line, because that is the only place where every way a secret can arrive
(an f-string, a `%s` argument, an exception's text, a chained traceback) has become one string.
Every handler of the root logger and of uvicorn's loggers gets it.

Must never: let a handler through without the masking formatter; put the Authorization or
X-API-Key header into a log line.
"""

from __future__ import annotations

import atexit
import contextvars
import datetime as dt
import logging
import os
import sys
import threading
from typing import IO

import msgspec

from registry.secrets import SecretStore

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# uvicorn adds an ANSI-coloured copy of its message; the plain one is enough
_STD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}


class RequestIdFilter(logging.Filter):
    """Adds the current request id (if any) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach `record.request_id`."""
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON."""
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out).decode()


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render with the request id prefixed when there is one."""
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return (
            line.replace(record.getMessage(), f"[{rid}] {record.getMessage()}", 1) if rid else line
        )


class MaskingFormatter(logging.Formatter):
    """Wraps another formatter and masks registered secrets in its output."""

    def __init__(self, inner: logging.Formatter, secrets: SecretStore) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        """Format with the inner formatter, then mask."""
        return self.secrets.mask(self.inner.format(record))


LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "vllm", "transformers")


def configure_logging(
    secrets: SecretStore, *, fmt: str = "json", level: str = "INFO", stream: IO[str] | None = None
) -> None:
    """Route root and library loggers to one masked stderr handler."""
    inner: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(MaskingFormatter(inner, secrets))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in LOGGERS[1:]:
        lib = logging.getLogger(name)
        for old in list(lib.handlers):
            lib.removeHandler(old)
        lib.propagate = True
    mask_all_handlers(secrets)


def mask_all_handlers(secrets: SecretStore) -> None:
    """Wrap the formatter of every handler on known loggers (libraries add their own)."""
    for name in (*LOGGERS, *logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            current = handler.formatter or logging.Formatter()
            if not isinstance(current, MaskingFormatter):
                handler.setFormatter(MaskingFormatter(current, secrets))


# --- JSON-only output: everything else written to fd 1/2 is wrapped ------------------------------

#: progress bars and banners engines print on their own; with JSON logs they are noise
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "warning",
}
_MAX_LINE = 64 * 1024


class _FdPump:
    """Reads what anything (C code, engine subprocesses, print, tqdm) writes to fd 1 and 2."""

    def __init__(self, read_fd: int, out: IO[str], secrets: SecretStore) -> None:
        self.read_fd = read_fd
        self.out = out
        self.secrets = secrets
        self.thread = threading.Thread(target=self._run, name="iw-output-pump", daemon=True)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return
        if text.startswith("{") and text.endswith("}"):
            try:
                if isinstance(msgspec.json.decode(text), dict):
                    # already one JSON object (an engine process using our format): keep it
                    self.out.write(self.secrets.mask(text) + "\n")
                    return
            except msgspec.DecodeError:
                pass
        line = {
            "ts": dt.datetime.now(tz=dt.UTC).isoformat(timespec="milliseconds"),
            "level": "info",
            "logger": "output",
            "message": self.secrets.mask(text)[:_MAX_LINE],
        }
        self.out.write(msgspec.json.encode(line).decode() + "\n")

    def _run(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            # "\r" too: progress bars redraw one line with carriage returns
            parts = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            pending = parts.pop()
            if len(pending) > _MAX_LINE:
                parts.append(pending)
                pending = b""
            for part in parts:
                self._emit(part)
            self.out.flush()
        if pending:
            self._emit(pending)
        self.out.flush()


def capture_output_as_json(secrets: SecretStore) -> IO[str]:
    """Route fd 1 and 2 through a pump that wraps every non-JSON line as a JSON log object.

    Engines and libraries write to the process's stdout/stderr without asking (tqdm bars,
    `print`, C extensions, engine subprocesses that inherit the descriptors); with
    `IW_LOG_FORMAT=json` an operator's log pipeline must still see one JSON object per line.
    Returns a stream on the original stderr for the log handler (our own lines are JSON
    already and need no second pass). Masks secrets in what it wraps.
    """
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.captureWarnings(True)  # noqa: FBT003  (stdlib API) warnings → "py.warnings" → JSON
    sys.stdout.flush()
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    saved = (os.dup(1), os.dup(2))
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = _FdPump(read_fd, real, secrets)
    pump.thread.start()

    def restore() -> None:
        # at exit: put the descriptors back (closing the pipe's write ends), let the pump drain
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        pump.thread.join(timeout=2)

    atexit.register(restore)
    return real
