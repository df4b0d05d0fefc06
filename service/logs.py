"""structlog set-up: one JSON (or console) line per event, bound to the request's context.

Events carry ids, models, statuses and timings only: never prompts, completions or keys. What
a client sent (a model id) can hold anything: ids are cut to a bounded length (``bounded``),
the console format escapes control characters in every field as JSON does, and an event with
a string that is not valid Unicode is still written, its bad characters escaped.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any, BinaryIO, NamedTuple

import orjson
import structlog

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, lone surrogates.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def bounded(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters, marked with its full length when cut."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text)} chars]"


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape(text: str) -> str:
    """``text`` with every character a terminal or a log line could act on written as an escape."""
    return _UNPRINTABLE.sub(_escaped, text)


def _escape_fields(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console format: a field's line break or escape sequence must not forge a line or a colour."""
    for key, value in event.items():
        if isinstance(value, str) and _UNPRINTABLE.search(value):
            event[key] = escape(value)
    return event


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_printable(key): _printable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(item) for item in value]
    return value


def _json(event: Any, **options: Any) -> bytes:
    """orjson; it refuses lone surrogates, and then the event goes out with them escaped rather
    than being lost to a traceback."""
    try:
        return orjson.dumps(event, **options)
    except TypeError:
        return orjson.dumps(_printable(event), **options)


_REQUEST_ID: ContextVar[str | None] = ContextVar("rerouter_request_id", default=None)


def bind_request(request_id: str | None) -> None:
    """Events logged from here on in this context carry ``request_id`` (None: no id): the request's own
    task, and the callbacks it schedules (they run in a copy of its context). One connection's
    requests share a task, so each request binds its own id as it begins."""
    _REQUEST_ID.set(request_id)


def _add_request_id(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """One context variable read: structlog's merge_contextvars walks the whole context."""
    request_id = _REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


class _Timestamp:
    """``timestamp``: ISO 8601 in UTC to the microsecond, ``2026-11-28T13:24:28.123456Z``. The
    date and time of day change once a second, so they are formatted once a second: structlog's
    TimeStamper builds a datetime per event, a quarter of the event's cost."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        second, micro = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{micro:06d}Z"


class _Direct(NamedTuple):
    """What ``request_event`` needs to write as structlog would: the processors configured (to
    tell that they are still the ones in force), their renderer, the stream, the timestamp."""

    processors: list[structlog.typing.Processor]
    renderer: structlog.typing.Processor
    stream: BinaryIO
    timestamp: _Timestamp


_direct: _Direct | None = None
_level = logging.NOTSET


def request_event(fields: dict[str, Any]) -> None:
    """The one event per request, ``fields`` then ``"event": "request"``: the line ``log.info``
    writes, byte for byte, without structlog's generic path (a bound logger, a copy of the
    context, a call per processor, a lock), which cost a third of the event. Written that way
    only with the JSON format at level info or below, and while the processors configured are
    in force: anything else (the console format, structlog's ``capture_logs``) goes through
    structlog. Above level info, nothing is written, as structlog's filtering would."""
    if _level > logging.INFO:
        return
    direct = _direct
    if (
        direct is None
        or structlog.get_config()["processors"] is not direct.processors
        or direct.processors[-1] is not direct.renderer
    ):
        structlog.get_logger("rerouter").info("request", **fields)
        return
    fields["event"] = "request"
    _add_request_id(None, "info", fields)
    fields["level"] = "info"
    fields["timestamp"] = direct.timestamp.now()
    direct.stream.write(direct.renderer(None, "info", fields) + b"\n")
    direct.stream.flush()


def configure(log_format: str, log_level: str) -> None:
    global _direct, _level
    timestamp = _Timestamp()
    processors: list[structlog.typing.Processor] = [
        _add_request_id,
        structlog.processors.add_log_level,
        timestamp,
        structlog.processors.format_exc_info,
    ]
    _level = level = logging.getLevelName(log_level.upper())
    if log_format == "console":
        processors.append(_escape_fields)
        renderer: structlog.typing.Processor = structlog.dev.ConsoleRenderer(colors=False)
        logger_factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json)
        logger_factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    direct = log_format != "console" and level <= logging.INFO
    _direct = _Direct(processors, renderer, sys.stdout.buffer, timestamp) if direct else None
