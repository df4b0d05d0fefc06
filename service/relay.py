"""Forwarding one attempt upstream and relaying its answer: whole, or as a stream.

Answers read whole (JSON, or of known length) are relayed in one piece, rewritten first when the
settings ask (think blocks, the model's name); event streams and bodies of unknown length are
relayed chunk by chunk as they arrive, through the same rewrites as SSE filters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from sanic import Request
from sanic.compat import Header
from sanic.response import HTTPResponse

from service import access, payload, renaming, sse, upstream, usage
from service.backends import Backend
from service.errors import ProxyError
from service.exchange import Exchange
from service.reasoning import ThinkStream, ThinkTags, transform_message
from service.response import Response

log = structlog.get_logger("rerouter")


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """SSE filters in a row: the usage chunk the client did not ask for out, think stripping,
    then renaming (any may be absent)."""

    think: ThinkStream | None
    rename: renaming.RenameStream | None
    drop: usage.UsageDrop | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self.drop is not None:
            chunk = self.drop.feed(chunk)
        if self.think is not None and chunk:
            chunk = self.think.feed(chunk)
        return self.rename.feed(chunk) if self.rename is not None and chunk else chunk

    def close(self) -> bytes:
        tail = self.drop.close() if self.drop is not None else b""
        if self.think is not None:
            tail = (self.think.feed(tail) if tail else b"") + self.think.close()
        if self.rename is not None:
            tail = (self.rename.feed(tail) if tail else b"") + self.rename.close()
        return tail

    @property
    def stripped(self) -> int:
        return self.think.stripped if self.think is not None else 0


class Relayed(Response):
    """An upstream's answer: without a Content-Type when the upstream sent none, where Sanic
    would write its ``content_type`` default (None, as the literal ``None``)."""

    @property
    def processed_headers(self) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        if self.content_type is None and "content-type" not in self.headers:
            return self._written_head()
        return super().processed_headers


class TryNext(Exception):
    """This attempt failed before any byte reached the client, and another one is left."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def upstream_url(request: Request, base: str, path: str) -> str:
    query = request.query_string
    return base + path + (f"?{query}" if query else "")


def headers_up(request: Request, exchange: Exchange, backend: Backend, *, identity: bool = False) -> Any:
    """The client's headers for the upstream; the backend's key (or UPSTREAM_API_KEY) replaces
    the client's credential."""
    key = backend.api_key or exchange.settings.upstream_api_key
    headers = upstream.request_headers(request.headers, without=access.CREDENTIAL_HEADERS if key else ())
    if key:
        headers["authorization"] = f"Bearer {key}"
        if exchange.anthropic:
            headers["x-api-key"] = key  # what Anthropic-style servers read; the others ignore it
    headers["x-request-id"] = exchange.request_id
    if identity:
        headers["accept-encoding"] = "identity"
    return headers


async def relay(
    request: Request,
    exchange: Exchange,
    backend: Backend,
    url: str,
    body: bytes,
    think: str = "keep",
    rename: str | None = None,
    *,
    last: bool = True,
) -> HTTPResponse | None:
    """Forward, and relay the answer.

    Read whole first: answers with a length or without a body, and JSON answers (a JSON answer
    cut or stalled half-way then still gets its own 502/504, and think blocks can be taken
    out). Relayed as they arrive: event streams and anything else of unknown length. ``think``
    other than ``keep`` rewrites think blocks in a successful completion answer, and ``rename``
    names the model the client asked for in it; both need it unencoded. Otherwise the answer's
    bytes are relayed untouched. Unless ``last``, a 5xx or 429 is not relayed but tried again.

    A stream's chunks go out as they arrive, through its filters, each seen by the usage meter
    as it came. An upstream failure mid-way closes the client's connection without the final
    chunk, so the client sees a broken stream rather than a clean end. Usage is taken however
    the stream ended: the sync openai SDK leaves right after ``[DONE]``, the usage chunk
    already relayed. An event stream that sent the client nothing for STREAM_KEEPALIVE_SECONDS
    (think text withheld, a slow first token) gets an SSE comment, only ever between events, so
    idle timeouts in front (ingress-nginx: 60 s) do not cut it.
    """
    settings = exchange.settings
    rewrite = think != "keep" or rename is not None or exchange.hide_usage
    sending = upstream.call(
        request.app.ctx.session,
        request.method,
        upstream_url(request, url, exchange.path),
        data=body or None,
        headers=headers_up(request, exchange, backend, identity=rewrite),
        limits=upstream.limits(settings, backend, whole=not exchange.stream),
    )
    del body  # aiohttp's until sent: a stream holding the request's body for its whole life
    exchange.to_upstream()
    async with sending as answer:
        if not last and (answer.status >= 500 or answer.status == 429):
            raise TryNext(f"http_{answer.status}" if answer.status == 429 else "http_5xx")
        note_status(exchange, answer.status)
        headers = upstream.response_headers(answer.headers.items())
        event_stream = answer.content_type == "text/event-stream"
        transform = answer.status == 200 and rewrite
        encoding = answer.headers.get("content-encoding", "identity").lower()
        if transform and encoding not in ("", "identity"):
            # Asked for identity, got it compressed anyway: relayed as it came, not rewritten.
            log.warning("answer left as sent: the upstream compressed it", encoding=encoding)
            transform = False
        chat = exchange.endpoint == "chat/completions"
        json_answer = answer.content_type == "application/json"
        gap = settings.read_timeout(backend)
        counted = usage.counted(request.method, exchange.path, exchange.endpoint)
        if not event_stream and (
            json_answer
            or answer.content_length is not None
            or answer.status in (204, 304)
            or request.method == "HEAD"
        ):
            data = await upstream.read_whole(answer, gap)
            exchange.from_upstream()
            if json_answer and answer.status == 200 and counted:
                exchange.usage = usage.find(data)
            if transform and json_answer:
                data = _transformed(data, think, chat, rename, exchange)
            return Relayed(data, status=answer.status, headers=headers)
        stream = (
            _stream_filter(
                think, chat, rename, exchange.hide_usage, settings.think_tags, settings.max_sse_event_bytes
            )
            if transform and event_stream
            else None
        )
        meter = usage.StreamMeter() if answer.status == 200 and counted else None
        # Relayed here rather than in a function of its own: each frame a stream awaits through
        # stays alive while it lasts, a few hundred bytes.
        head, keepalive = _stream_head(exchange, answer, headers, event_stream)
        with upstream.BodyReader(answer, gap, keepalive) as reader:
            chunk = await reader.read()  # before any byte is sent, a failure still gets its status
            exchange.outcome = "started"
            response = await request.respond(head)
            opened = commented = False  # headers sent before any content / a comment sent
            try:
                while chunk != b"":
                    if chunk is None:
                        if sse.at_boundary(exchange.sent_last):
                            await response.send(sse.KEEPALIVE)
                            commented = True
                        chunk = await reader.read()
                        continue
                    if meter is not None:
                        meter.feed(chunk)
                    if data := (chunk if stream is None else stream.feed(chunk)):
                        if exchange.first_byte is None:
                            exchange.first_byte = time.perf_counter()
                            if commented and data.startswith(sse.BOM):  # a BOM counts only at the start
                                data = data[len(sse.BOM) :]
                        await response.send(data)
                        exchange.sent_before, exchange.sent_last = exchange.sent_last, data
                        reader.relayed = True
                    elif not opened and exchange.first_byte is None:
                        await response.send(b"", end_stream=False)  # the headers at once, text withheld
                        opened = True
                    chunk = await reader.read()
                if stream is not None and (tail := stream.close()):
                    await response.send(tail)
                    exchange.sent_before, exchange.sent_last = exchange.sent_last, tail
            except upstream.FAILURES as exc:
                exchange.outcome = "upstream_error"
                exchange.upstream_error = upstream.failure(exc).reason
                log.warning("upstream failed mid-stream", reason=exchange.upstream_error)
                if request.transport is not None:
                    request.transport.close()
                return None
            finally:
                if stream is not None:
                    exchange.think_blocks = stream.stripped
                if meter is not None:
                    exchange.usage = found = meter.usage()
                    exchange.per_token = meter.per_token(found) if found is not None else None
        await response.eof()
        exchange.outcome = "completed"
        return None


def _transformed(data: bytes, think: str, chat: bool, rename: str | None, exchange: Exchange) -> bytes:
    if think != "keep":
        data = _without_think(data, think, chat, exchange)
    return renaming.rename_json(data, rename) if rename is not None else data


def _stream_filter(
    think: str, chat: bool, rename: str | None, hide_usage: bool, tags: ThinkTags, max_event: int
) -> StreamFilter:
    """Usage chunk out, think stripping, renaming, each an SSE filter of its own (bytes in, bytes
    out), each holding at most ``max_event`` bytes of an event (MAX_SSE_EVENT_BYTES)."""
    stripper = ThinkStream(think, chat, tags, max_event) if think != "keep" else None
    renamer = renaming.RenameStream(rename, max_event) if rename is not None else None
    return StreamFilter(stripper, renamer, usage.UsageDrop(max_event) if hide_usage else None)


def _without_think(data: bytes, mode: str, chat: bool, exchange: Exchange) -> bytes:
    try:
        body = payload.loads(data)
    except ProxyError:
        return data
    if not isinstance(body, dict):
        return data
    exchange.think_blocks = transform_message(body, mode, chat, exchange.settings.think_tags)
    return payload.dumps(body) if exchange.think_blocks else data


def note_status(exchange: Exchange, status: int) -> None:
    exchange.status = status
    if status >= 400:
        exchange.upstream_error = f"http_{status // 100}xx"


def _stream_head(
    exchange: Exchange, answer: aiohttp.ClientResponse, headers: list[tuple[str, str]], event_stream: bool
) -> tuple[Relayed, float]:
    """The stream's response, not sent yet, and its keep-alive interval (0: none)."""
    head = Relayed(status=answer.status, headers=headers)
    own: Header = head.headers
    exchange.stamp(own)
    own.add("server-timing", exchange.stream_timing())
    if event_stream:
        own["x-accel-buffering"] = "no"
    protocol = answer.connection.protocol if answer.connection is not None else None
    if protocol is not None:
        # The BodyReader bounds each read by the gap from here on; aiohttp's own read timer
        # would be cancelled and made again for every chunk (~4 µs an event). start_timeout()
        # with no timeout set also drops the timer left from reading the head.
        protocol.read_timeout = None
        protocol.start_timeout()
    return head, exchange.settings.stream_keepalive_seconds if event_stream else 0
