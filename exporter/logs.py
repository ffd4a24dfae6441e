"""logfmt or JSON lines on stderr, like Prometheus' own components.

Structured fields travel in `extra={"fields": {...}}`. Secrets never reach a log call, so nothing
here needs to scrub; a traceback is only written at debug level.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

LEVELS = ("debug", "info", "warn", "error")


def _base(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": record.levelname.lower().replace("warning", "warn"),
        "caller": record.name,
        "msg": record.getMessage(),
    }
    fields.update(getattr(record, "fields", None) or {})
    if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
        fields["exception"] = logging.Formatter().formatException(record.exc_info)
    return fields


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _base(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_base(record), default=str)


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": logging.WARNING}.get(level, getattr(logging, level.upper())))
    # APScheduler says "skipped: maximum number of running instances reached" for every
    # throttled job; that is the budget working, not news
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
    # a client that sends a malformed request is the client's problem: aiohttp says so at error
    # level with a traceback, which would let anyone on the network fill the log
    logging.getLogger("aiohttp.server").addFilter(_ClientErrorsAreDebug())


class _ClientErrorsAreDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith("Error handling"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = (
                record.exc_info if logging.getLogger().isEnabledFor(logging.DEBUG) else None
            )
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True
