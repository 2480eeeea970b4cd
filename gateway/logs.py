"""The gateway's logs: request ids, one access line per request, and the process's logging set-up.

The access line is written by the ``sluice.access`` logger at INFO when a response has ended (a stream's last byte
included), as ``key=value`` pairs, or as one JSON object a line with ``--log-format json``::

    2026-01-05T10:00:00.123Z INFO sluice.access method=POST path=/v1/embeddings status=200 duration_ms=3.10
    service=embedding_service triton_ms=2.40 cache_hits=0 cache_misses=1 request_id=4f1c... client=127.0.0.1

(one line). A request's Triton time, cache counts and LLM figures reach its line through ``AccessRecord``: the
gateway's metrics (metrics.py) add each observation to the current request's record too, so the line and
``/metrics`` count the same things.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TextIO, get_args

import orjson
from starlette.types import Scope

__all__ = [
    "ACCESS_LOGGER", "CLIENT_CLOSED_REQUEST", "LOG_FORMATS", "LOG_LEVELS", "REQUEST_ID_HEADER", "SLUICE_LOGGERS",
    "AccessLine", "AccessRecord", "JsonFormatter", "LogFormat", "LogLevel", "LogSettings", "TextFormatter",
    "configure_logging", "current_record", "request_id", "unanswered_status",
]

ACCESS_LOGGER = logging.getLogger("sluice.access")
# The packages whose loggers --log-level sets (the gateway's are named after its modules, or "sluice.*").
SLUICE_LOGGERS = ("sluice", "gateway", "compiler", "runtimes")
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
REQUEST_ID_HEADER = b"x-request-id"
# A client's id is kept when it is this short and plain (UUIDs, ULIDs, trace ids, base64): anything else could
# forge or break log lines, so it is replaced by a new one.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
# The status logged and counted for a request whose client went away before any response began (nginx's).
CLIENT_CLOSED_REQUEST = 499
# Values written bare in a text line; any other is JSON-quoted, so a path cannot break or forge a line.
_BARE_VALUE = re.compile(r"[A-Za-z0-9._:/@+=-]+")


def request_id(scope: Scope) -> bytes:
    """The request's ``x-request-id`` when it is 1-128 characters of ``A-Z a-z 0-9 . _ : / + = @ -``; otherwise
    (absent, or anything else) a new random one, 32 hex digits."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:  # ASGI servers give header names in lower case
            if _CLIENT_REQUEST_ID.fullmatch(value):
                return bytes(value)
            break
    return secrets.token_hex(16).encode()


def unanswered_status(error: BaseException | None) -> int:
    """The status a request that sent no response start is logged and counted with: 500 when the app failed,
    499 when the client went away (the disconnect's cancellation, or a quiet return after it)."""
    return 500 if isinstance(error, Exception) else CLIENT_CLOSED_REQUEST


@dataclass(slots=True)
class AccessRecord:
    """What a request's access line says beyond its method, path and status; ``None`` when it did not happen.
    Filled in by the metrics (metrics.py) as the request runs."""

    triton_seconds: float | None = None
    cache_hits: int | None = None
    cache_misses: int | None = None
    first_token_seconds: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


# The record of the request the current task serves (tasks it starts inherit it); None outside a request, or when
# the access log is off.
current_record: ContextVar[AccessRecord | None] = ContextVar("sluice_access_record", default=None)


@dataclass(slots=True)
class AccessLine:
    """One request's access line: the message of its log record, written as text by ``str`` or as JSON fields by
    ``fields``, so nothing is formatted unless a handler writes it."""

    method: str
    path: str
    status: int
    seconds: float
    service: str | None
    request_id: str
    client: str | None
    record: AccessRecord

    def fields(self) -> dict[str, Any]:
        record = self.record
        fields: dict[str, Any] = {
            "method": self.method, "path": self.path, "status": self.status, "duration_ms": _ms(self.seconds),
        }
        if self.service is not None:
            fields["service"] = self.service
        if record.triton_seconds is not None:
            fields["triton_ms"] = _ms(record.triton_seconds)
        if record.cache_hits is not None or record.cache_misses is not None:
            fields["cache_hits"] = record.cache_hits or 0
            fields["cache_misses"] = record.cache_misses or 0
        if record.first_token_seconds is not None:
            fields["ttft_ms"] = _ms(record.first_token_seconds)
        if record.prompt_tokens is not None:
            fields["prompt_tokens"] = record.prompt_tokens
        if record.completion_tokens is not None:
            fields["completion_tokens"] = record.completion_tokens
        fields["request_id"] = self.request_id
        if self.client is not None:
            fields["client"] = self.client
        return fields

    def __str__(self) -> str:
        # fields() as text, written directly: a quarter of the CPU of formatting each value alike. Only the path
        # needs quoting; the other values are numbers, a validated id, an address, a method token and a service
        # name of [A-Za-z0-9_.-].
        record = self.record
        path = self.path if _BARE_VALUE.fullmatch(self.path) else orjson.dumps(self.path).decode()
        line = f"method={self.method} path={path} status={self.status} duration_ms={self.seconds * 1000:.2f}"
        if self.service is not None:
            line += f" service={self.service}"
        if record.triton_seconds is not None:
            line += f" triton_ms={record.triton_seconds * 1000:.2f}"
        if record.cache_hits is not None or record.cache_misses is not None:
            line += f" cache_hits={record.cache_hits or 0} cache_misses={record.cache_misses or 0}"
        if record.first_token_seconds is not None:
            line += f" ttft_ms={record.first_token_seconds * 1000:.2f}"
        if record.prompt_tokens is not None:
            line += f" prompt_tokens={record.prompt_tokens}"
        if record.completion_tokens is not None:
            line += f" completion_tokens={record.completion_tokens}"
        line += f" request_id={self.request_id}"
        if self.client is not None:
            line += f" client={self.client}"
        return line


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class _UtcTime:
    """``2026-01-05T10:00:00.123Z`` for a record; the seconds part is formatted once per second, not per line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> <message>``, a traceback on the lines after it."""

    def __init__(self) -> None:
        super().__init__()
        self._time = _UtcTime()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self._time(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, then an access line's fields or ``message``
    (and ``exception``, a traceback as one string)."""

    def __init__(self) -> None:
        super().__init__()
        self._time = _UtcTime()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self._time(record.created), "level": record.levelname, "logger": record.name}
        if isinstance(record.msg, AccessLine):
            entry.update(record.msg.fields())
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


@dataclass(frozen=True)
class LogSettings:
    """How the process logs: the level of Sluice's loggers (``debug`` also lets other libraries' debug and info
    lines through, uvicorn's start-up lines among them), the format (``text`` or ``json``) and whether access lines
    are written (they are INFO: ``warning`` drops them too)."""

    level: LogLevel = "info"
    format: LogFormat = "text"
    access_log: bool = True

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")
        if self.format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {self.format!r}")


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``settings.format``: Sluice's own at
    ``settings.level``, other libraries' (uvicorn, gRPC, the compiler's tools) at warning or above unless the level
    is debug.

    Process-wide, for the `sluice` commands: the app itself (``create_app``) configures nothing, so tests and
    embedders keep their own set-up.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
    root.addHandler(handler)
    level = logging.getLevelName(settings.level.upper())
    root.setLevel(level if level == logging.DEBUG else max(level, logging.WARNING))
    for name in SLUICE_LOGGERS:
        logging.getLogger(name).setLevel(level)
    ACCESS_LOGGER.setLevel(logging.NOTSET if settings.access_log else logging.WARNING)
    # Our formatters use none of what a LogRecord otherwise looks up on every call: the caller's frame, thread and
    # process (the logging HOWTO's "Optimization"); about 1.5 us of each access line's 6 us in a loop.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
