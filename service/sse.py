"""Server-sent events from the upstream's byte stream, cut into events without re-encoding them.

Each event keeps the exact bytes it arrived as, so the proxy can relay what it does not change
byte for byte and re-encode only what it rewrites. Network chunks may split an event anywhere,
even inside a UTF-8 character or between the two bytes of a CRLF.

Code that looks at every event tests for a part with ``data.find(part) >= 0`` rather than
``part in data``: for bytes, ``in`` first tries its operand as an integer and makes and clears
a TypeError, which costs as much again as the search (~150 ns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import structlog

log = structlog.get_logger("rerouter")

DEFAULT_MAX_EVENT = 1024 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")
BOM = b"\xef\xbb\xbf"  # skipped on the stream's first line


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One event: its original bytes (up to and including the blank line) and its joined data.

    ``data`` is None when the event has no data field at all (a comment, a stray blank line).
    """

    raw: bytes
    data: str | None


class SSEParser:
    """Incremental parser: feed chunks as they arrive, close at the end of the stream."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._raw = bytearray()
        self._data: list[bytes] = []
        self._after_cr = False
        self._first_line = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events this chunk completes; an unfinished line or event waits for more."""
        whole = self._whole_events(chunk)
        if whole is not None:
            return whole
        events: list[SSEEvent] = []
        if chunk and self._after_cr:
            # A CR ended the previous chunk and its line at once, so nothing waits on the
            # network; an LF now completes that CRLF and belongs to the bytes already parsed.
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
                if self._raw:
                    self._raw += b"\n"
                else:
                    events.append(SSEEvent(b"\n", None))
        scanned = len(self._line)
        self._line += chunk
        buffer = self._line
        start = 0
        while (match := _LINE_END.search(buffer, scanned)) is not None:
            self._raw += buffer[start : match.end()]
            event = self._take_line(bytes(buffer[start : match.start()]))
            if event is not None:
                events.append(event)
            start = scanned = match.end()
            self._after_cr = match.end() == len(buffer) and match.group() == b"\r"
        del buffer[:start]
        return events

    def _whole_events(self, chunk: bytes) -> list[SSEEvent] | None:
        """What ``feed`` gives for a chunk of whole one-line ``data:`` events with nothing held
        before it. Split at once; anything else (None) goes through the line parser."""
        lines = whole_data_lines(chunk) if self.idle else None
        if lines is None:
            return None
        return [
            SSEEvent(line + b"\n\n", line[5:].removeprefix(b" ").decode(errors="replace")) for line in lines
        ]

    @property
    def idle(self) -> bool:
        """Nothing held and past the stream's start: the next chunk begins a line of an event."""
        return not (self._line or self._raw or self._first_line or self._after_cr)

    @property
    def buffered(self) -> int:
        """Bytes held for the event under way: its complete lines and the line being read."""
        return len(self._raw) + len(self._line)

    def pending(self) -> bytes:
        """The bytes held for the event under way, as they came; the parser holds nothing after."""
        held = bytes(self._raw + self._line)
        self._raw.clear()
        self._line.clear()
        self._data = []
        return held

    def close(self) -> list[SSEEvent]:
        """The last event when the stream ended without its blank line; the parser starts over."""
        events: list[SSEEvent] = []
        if self._line:
            self._raw += self._line
            event = self._take_line(bytes(self._line))
            if event is not None:
                events.append(event)
        if self._raw:
            events.append(self._dispatch())
        self._line.clear()
        self._after_cr = False
        self._first_line = True
        return events

    def _take_line(self, line: bytes) -> SSEEvent | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(BOM)
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" "))
        return None

    def _dispatch(self) -> SSEEvent:
        data = b"\n".join(self._data).decode("utf-8", "replace") if self._data else None
        event = SSEEvent(bytes(self._raw), data)
        self._raw.clear()
        self._data = []
        return event


def whole_data_lines(chunk: bytes) -> list[bytes] | None:
    """The lines of ``chunk`` (without their blank line) when it is whole one-line ``data:``
    events, LF-ended: how a model server sends a token, one event a write. Else None."""
    if not chunk.endswith(b"\n\n") or chunk.find(b"\r") >= 0:
        return None
    # The usual read: one event, whose only LFs end it. find() stops at the first LF, where
    # count() would scan the whole chunk, and more slowly.
    if chunk.find(b"\n") == len(chunk) - 2:
        return [chunk[:-2]] if chunk.startswith(b"data:") else None
    lines = chunk[:-2].split(b"\n\n")
    if all(line.startswith(b"data:") and line.find(b"\n") < 0 for line in lines):
        return lines
    return None


class EventFilter:
    """A stream rewriter, SSE bytes in and out, one event at a time through ``_relay``.

    An event ending in CR is handed over before the LF of its CRLF arrives, and the parser then
    passes that LF on alone so an event relayed as it came keeps its exact bytes. When the event
    went out rewritten (LF-ended) or not at all, that LF is dropped here: relayed, it would end
    an empty event of its own.

    An event is held until it is complete, so its size bounds the memory a stream takes: the
    first event larger than ``max_event`` bytes (MAX_SSE_EVENT_BYTES) and everything after it
    are relayed as they come, untransformed, with a warning (``overflowed``). Whatever the
    chunking, the stream is cut over at the same event.
    """

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self._parser = SSEParser()
        self._orphan_lf = False
        self._max_event = max_event
        self.overflowed = False

    def feed(self, chunk: bytes) -> bytes:
        """What the events this chunk completes become; an unfinished event waits for more."""
        if self.overflowed:
            return chunk
        parts = []
        for event in self._parser.feed(chunk):
            if not self.overflowed and len(event.raw) > self._max_event:
                parts.append(self._overflow())
            parts.append(event.raw if self.overflowed else self._emit(event))
        if not self.overflowed and self._parser.buffered > self._max_event:
            parts.append(self._overflow())
        if self.overflowed:
            parts.append(self._parser.pending())
        return b"".join(parts)

    def close(self) -> bytes:
        """The rest of the stream; the filter starts over, as its parser does."""
        tail = b"".join(self._emit(event) for event in self._parser.close()) if not self.overflowed else b""
        self._orphan_lf = False
        self.overflowed = False
        return tail

    def _overflow(self) -> bytes:
        self.overflowed = True
        log.warning(
            "stream event larger than MAX_SSE_EVENT_BYTES, relaying the rest as it comes",
            limit=self._max_event,
        )
        return self._give_up()

    def _between_events(self) -> bool:
        """Nothing held: a chunk of whole events can be judged on its own bytes."""
        return self._parser.idle and not self._orphan_lf and not self.overflowed

    def _give_up(self) -> bytes:
        """What the filter still holds of the events before, as SSE bytes (nothing by default)."""
        return b""

    def _emit(self, event: SSEEvent) -> bytes:
        if self._orphan_lf and event.raw == b"\n":
            self._orphan_lf = False
            return b""
        out = self._relay(event)
        self._orphan_lf = event.raw.endswith(b"\r") and not out.endswith(b"\r")
        return out

    def _relay(self, event: SSEEvent) -> bytes:
        raise NotImplementedError


def encode_data(data: bytes | str) -> bytes:
    """A data-only event; text with line breaks becomes several data lines, as the spec joins them."""
    if isinstance(data, str):
        data = data.encode()
    return b"".join(b"data: " + line + b"\n" for line in _LINE_END.split(data)) + b"\n"


KEEPALIVE = b": keep-alive\n\n"
_FINAL_EVENTS = frozenset(
    {b"message_stop", b"response.completed", b"response.failed", b"response.incomplete"}
)
_FINAL_TYPE = re.compile(rb'"type"\s*:\s*"(?:message_stop|response\.(?:completed|failed|incomplete))"')
_TAIL = 65536  # the final event is looked for in at most this many bytes


def at_boundary(sent: bytes) -> bool:
    """Whether bytes relayed so far end between events (or none were): only there may a comment go."""
    return not sent or sent.endswith((b"\n\n", b"\n\r\n"))


def ends_stream(sent: bytes) -> bool:
    """Whether the bytes relayed last end with a stream's final event: ``data: [DONE]`` (OpenAI),
    ``message_stop`` (Anthropic) or ``response.completed``/``failed``/``incomplete`` (Responses),
    by its ``event:`` line or its data's top-level ``type``.

    Looked at once, when the client leaves, never per chunk. A quoted ``"type"`` inside a text
    delta is escaped (``\\"type\\"``), so the pattern cannot match a model's words.
    """
    text = sent[-_TAIL:].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not text.endswith(b"\n\n"):
        return False
    start = text.rfind(b"\n\n", 0, len(text) - 2)
    event = text[start + 2 if start >= 0 else 0 : -2]
    for line in event.split(b"\n"):
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if (name == b"data" and value == b"[DONE]") or (name == b"event" and value in _FINAL_EVENTS):
            return True
    return _FINAL_TYPE.search(event) is not None
