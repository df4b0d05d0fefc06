"""``RESPONSE_MODEL=requested``: answers name the model the client asked for, not the upstream's.

The proxy sends ``gpt-4o`` upstream as ``qwen3-4b`` and the upstream answers with its own name;
clients that check the ``model`` they get back (or log it) should see the id they sent. Only the
top-level ``model`` changes, and the one nested in a Responses API event's ``response`` object
or in an Anthropic ``message_start`` event's ``message``.

What is not renamed is relayed as the exact bytes that came in: answers and events that do not
parse, are not objects, carry no ``model`` or already carry the requested one. A body without the
bytes ``"model"`` is not parsed at all; a key spelled with escapes (``"mod\\u0065l"``) is missed,
which no upstream does. Numbers orjson cannot hold (integers beyond 64 bits) go through
``service.payload``'s standard-library fallback so they come out as they went in.
"""

from __future__ import annotations

from typing import Any

from service import payload
from service.errors import ProxyError
from service.sse import BOM, DEFAULT_MAX_EVENT, EventFilter, SSEEvent

_MODEL_KEY = b'"model"'


def _rename(body: Any, requested: str) -> bool:
    """Set the model of the object and of its nested ``response`` or ``message``; whether
    anything changed."""
    if not isinstance(body, dict):
        return False
    changed = False
    for holder in (body, body.get("response"), body.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("model"), str) and holder["model"] != requested:
            holder["model"] = requested
            changed = True
    return changed


def _renamed(data: bytes, requested: str) -> bytes | None:
    """The re-encoded JSON, or None when it stays as it is (not JSON, or nothing to rename)."""
    try:
        body = payload.loads(data)
        # payload raises its request errors; here they only mean "cannot rename, relay as is".
        return payload.dumps(body) if _rename(body, requested) else None
    except ProxyError:
        return None


def rename_json(data: bytes, requested: str) -> bytes:
    """A whole JSON answer naming ``requested``; the very same bytes object when nothing changed."""
    renamed = _renamed(data, requested) if data.find(_MODEL_KEY) >= 0 else None  # find(): see sse
    return data if renamed is None else renamed


def _with_data(raw: bytes, data: bytes) -> bytes:
    """The event's own lines, LF-ended and in order, with its data lines replaced by one ``data``.

    ``event:``, ``id:``, ``retry:`` and comment lines stay: Responses API clients dispatch on
    ``event:``, and ``id:`` is what a reconnecting client resumes from. Compact JSON holds no line
    break, so one data line carries it.
    """
    lines: list[bytes] = []
    data_line: bytes | None = b"data: " + data
    for line in raw.splitlines():
        if line.partition(b":")[0] != b"data":
            lines.append(line)
        elif data_line is not None:
            lines.append(data_line)
            data_line = None
    return b"".join(line + b"\n" for line in lines)


class RenameStream(EventFilter):
    """A streamed answer, SSE bytes in and out, each event's model set to ``requested``.

    Events it leaves alone go out as the exact bytes that came in, so any chunking of the input
    gives the same output bytes.
    """

    def __init__(self, requested: str, max_event: int = DEFAULT_MAX_EVENT) -> None:
        super().__init__(max_event)
        self._requested = requested
        self._first = True

    def close(self) -> bytes:
        tail = super().close()
        self._first = True
        return tail

    def _relay(self, event: SSEEvent) -> bytes:
        first, self._first = self._first, False
        if event.data is None:
            return event.raw
        renamed = _renamed(event.data.encode(), self._requested) if event.raw.find(_MODEL_KEY) >= 0 else None
        if renamed is None:
            return event.raw
        if first and event.raw.startswith(BOM):
            return BOM + _with_data(event.raw[len(BOM) :], renamed)
        return _with_data(event.raw, renamed)
