"""Logging set-up: JSON or text lines, request ids, and secret masking after formatting.

Masking sits in the formatter, after the message, its arguments and any traceback have been
rendered into the final line, because that is the only place where every way a secret can arrive
(an f-string, a `%s` argument, an exception's text, a chained traceback) has become one string.
Every handler of the root logger and of uvicorn's loggers gets it.

Must never: let a handler through without the masking formatter; put the Authorization or
X-API-Key header into a log line.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import sys
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
