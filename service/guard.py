"""The client connection, guarded: strict request heads, total deadlines for slow clients, a cap
on open connections, no body read before the request is admitted, and lingering closes.

Sanic 25.12 leaves all of these to the application: its head parser accepts any bytes before
the colon (``Content-Length : 5`` is not a length, so the body is parsed as a second request),
its ``REQUEST_TIMEOUT`` restarts with every byte, it accepts connections without limit, and it
buffers a route's body before any handler runs. The smallest hook that covers the whole
connection is its own extension point, a protocol class (``app.prepare(protocol=...)``) whose
``Http`` checks the head Sanic has just parsed, before any handler sees the request. The
routes are declared ``stream=True``, so a body is read only by ``read_body``, after the path
and key checks.

A connection whose request is not read to its end is never reused: the answer says
``Connection: close``, then the proxy shuts its sending side, discards what still arrives (at
most LINGER_SECONDS and MAX_REQUEST_BYTES), and closes. Closing at once with unread bytes makes
the kernel reset the connection, and the client may lose the answer it was sent.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sanic import Request
from sanic.exceptions import BadRequest, PayloadTooLarge, RequestTimeout, SanicException
from sanic.http import Http
from sanic.models.server_types import ConnInfo
from sanic.server.protocols.http_protocol import HttpProtocol

from service.config import Settings
from service.errors import ProxyError

LINGER_SECONDS = 5.0
# RFC 9112 5.1: field-name ":" OWS field-value OWS, the name a token (RFC 9110 5.6.2); no space
# before the colon, no empty name, no obs-fold. RFC 9110 5.5: CR, LF and NUL never in a value.
_FIELD_LINES = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*)*")
# Origin-form, or absolute-form with a path (RFC 9112 3.2); nothing else reaches a route.
_TARGET = re.compile(r"/|[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*/")


def head_problem(head: bytes, target: str) -> str | None:
    """Why a request head (request line and field lines, without the blank line) is refused."""
    if not _TARGET.match(target):
        return "the request target must be a path or an absolute URL with a path"
    first_line_end = head.find(b"\r\n")
    if not _FIELD_LINES.fullmatch(head, first_line_end if first_line_end >= 0 else len(head)):
        return (
            "malformed header field: a name is a token followed directly by ':' and a value "
            "holds no CR, LF or NUL (RFC 9112 5.1)"
        )
    return None


class GuardedHttp(Http):
    """Sanic's HTTP/1.1 cycle with a strict head, a body deadline and no reading on after an
    answer that left the body unread."""

    __slots__ = ("body_deadline", "kept_alive")

    def __init__(self, protocol: GuardedProtocol) -> None:
        super().__init__(protocol)
        self.body_deadline = 0.0
        self.kept_alive = False

    async def http1_request_header(self) -> None:
        protocol: GuardedProtocol = self.protocol
        settings: Settings = protocol.app.ctx.settings
        if self.kept_alive:  # the first request's head deadline runs from the connection's start
            protocol.arm()
        self.kept_alive = True
        try:
            await super().http1_request_header()
        finally:
            protocol.disarm()
        problem = head_problem(self.request.head, self.url)
        if problem is not None:
            self.request_body = None  # framing we do not trust: read no further
            raise BadRequest(problem)
        self.body_deadline = protocol.loop.time() + settings.client_body_timeout

    def unread(self) -> bool:
        """The request has body bytes the proxy has not read."""
        return bool(self.request_body) and (self.request_body == "chunked" or bool(self.request_bytes_left))

    async def http1_response_header(self, data: bytes, end_stream: bool) -> None:
        if self.unread():
            # Answered without the body (401, 413, 408...): ask for none (no 100 Continue), read
            # none, and close the connection, lingering, once the answer is out.
            self.request_body = None
            self.expecting_continue = False
            self.keep_alive = False
        if not self.keep_alive:
            self.protocol.must_linger = True
        await super().http1_response_header(data, end_stream)


class GuardedProtocol(HttpProtocol):
    """One client connection: refused with a 503 past MAX_CLIENT_CONNECTIONS, its head bounded by
    CLIENT_HEADER_TIMEOUT from its start, closed lingering when bytes may be left unread."""

    HTTP_CLASS = GuardedHttp
    __slots__ = (
        "_deadline",
        "_drain_left",
        "_head_due",
        "_head_timer",
        "_lingering",
        "must_linger",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._deadline: asyncio.TimerHandle | None = None  # the lingering close's
        self._head_due: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._drain_left = 0
        self._lingering = False
        self.must_linger = False

    def connection_made(self, transport: Any) -> None:
        settings: Settings = self.app.ctx.settings
        open_now = len(self.connections)
        if open_now < settings.max_client_connections:
            super().connection_made(transport)
            self.arm()
            return
        self.transport = transport
        self.conn_info = ConnInfo(transport, unix=self._unix)
        if open_now >= 2 * settings.max_client_connections:
            transport.abort()  # a flood: even the refusals are at their limit
            return
        self.connections.add(self)  # refusals count, so a flood of them is bounded too
        transport.write(BUSY)
        self._linger()

    def arm(self) -> None:
        """From now, CLIENT_HEADER_TIMEOUT for the request head: past it the request gets a 408.

        One timer per connection, moved on only when it fires before the deadline: a keep-alive
        connection arms this for every request, and making and cancelling a timer costs ~4 µs."""
        due = self.loop.time() + self.app.ctx.settings.client_header_timeout
        if self._head_timer is None or self._head_timer.when() > due:
            self._stop_head_timer()
            self._head_timer = self.loop.call_at(due, self._head_check)
        self._head_due = due

    def disarm(self) -> None:
        """The head arrived: the timer, when it fires, finds nothing due."""
        self._head_due = None

    def _stop_head_timer(self) -> None:
        self._head_due = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_check(self) -> None:
        self._head_timer = None
        due = self._head_due
        if due is None:
            return
        if due - self.loop.time() > 0.001:  # armed again since: wait for the new deadline
            self._head_timer = self.loop.call_at(due, self._head_check)
            return
        self._head_due = None
        self._expire()

    def _expire(self) -> None:
        """As Sanic's own timeouts do: the connection task is cancelled and, if a request was
        begun, answers the exception set here; one that sent nothing yet is just closed."""
        http = self.http
        if http is not None and self._task is not None:
            http.exception = RequestTimeout("the request head did not arrive in time")
            self.must_linger = True
            self._task.cancel()

    def close(self, timeout: float | None = None) -> None:
        transport = self.transport
        if self.must_linger and not self._lingering and transport is not None and not transport.is_closing():
            self._linger()
            return
        self._stop_head_timer()
        super().close(timeout)

    def _linger(self) -> None:
        """Shut the sending side once the answer is out, discard what arrives, close on the
        client's end, or after LINGER_SECONDS or MAX_REQUEST_BYTES, whichever comes first."""
        self._lingering = True
        self._drain_left = self.app.ctx.settings.max_request_bytes
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._stop_timers()
        self._deadline = self.loop.call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        self.must_linger = False
        self.close()

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)
            return
        self._drain_left -= len(data)
        if self._drain_left < 0:
            self._end_linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    def _stop_timers(self) -> None:
        self._stop_head_timer()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


async def read_body(request: Request, settings: Settings) -> None:
    """Read the body of a ``stream=True`` route, at most MAX_REQUEST_BYTES (413) and within
    CLIENT_BODY_TIMEOUT of the end of the head (408). Call it only once the request is admitted:
    nothing of the body is read before."""
    http = request.stream
    if http is None or not http.request_body:
        return
    http.request_max_size = settings.max_request_bytes  # stream=True lifted Sanic's limit
    deadline = http.body_deadline if isinstance(http, GuardedHttp) else None
    try:
        if _arrived(http):  # most bodies come with their head: no timer (one costs ~10 µs)
            await request.receive_body()
        else:
            async with asyncio.timeout_at(deadline):
                await request.receive_body()
    except TimeoutError:
        raise ProxyError(408, "the request body did not arrive in time", "request_timeout") from None
    except PayloadTooLarge:
        limit = settings.max_request_bytes
        raise ProxyError(413, f"request body exceeds {limit} bytes", "invalid_request") from None
    except SanicException as exc:
        raise ProxyError(exc.status_code, str(exc), "invalid_request") from None


def _arrived(http: Http) -> bool:
    """The whole body, of a known length, is in the receive buffer: reading it cannot wait."""
    return (
        http.request_body is True
        and not http.expecting_continue
        and http.request_bytes_left is not None
        and len(http.recv_buffer) >= http.request_bytes_left
    )


def _busy() -> bytes:
    """The whole answer to a connection past MAX_CLIENT_CONNECTIONS, made once."""
    error = ProxyError(503, "the proxy has too many open connections", "too_many_connections").body()
    head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    return f"{head}connection: close\r\ncontent-length: {len(error)}\r\n\r\n".encode() + error


BUSY = _busy()
