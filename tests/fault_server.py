"""A raw asyncio TCP "model server" that misbehaves on purpose, on a loopback port of its own thread.

The aiohttp fake (``tests/fake_upstream.py``) can only produce well-formed HTTP; this one writes
bytes by hand, so it can send garbage, cut a chunked body in the middle of a chunk, reset the
connection at a chosen point or go silent between events. It reads one request per connection
and never keeps a connection alive for another (every answer it finishes says ``Connection:
close``), so each exchange has a connection of its own that the tests can watch: ``Conn`` notes
when it was closed and by whom, which is how a test proves the proxy released the upstream
connection.

The behaviour is picked by the ``X-Fault`` request header, else by the ``model`` of a JSON body
(so the OpenAI SDK can pick it), else ``ok``. Unknown names answer ``ok``. ``echo_only`` servers
answer every request with ``echo``, whatever it asks for (the fuzz tests use one).

- ``ok``: a chat completion (Content-Length), or with ``"stream": true`` three events and
  ``[DONE]`` (chunked); ``GET /v1/models`` answers an OpenAI list;
- ``echo``: 200 JSON describing the request (method, target, body length);
- ``refuse``: not a behaviour but ``FaultServer.refusing()``, which closes the listening socket
  so connections are refused, and reopens it on the same port afterwards;
- ``reset-before-headers`` / ``close-before-headers``: reads the request, then resets (RST) or
  closes (FIN) the connection without a byte of answer;
- ``hang-before-headers``: reads the request and says nothing until the peer closes;
- ``garbage-status``: answers ``this is not HTTP`` and closes; ``garbage-status-hold`` keeps
  the connection open after it (the peer must close it);
- ``hang-after-headers``: 200 ``text/event-stream`` headers (chunked), then silence;
- ``hang-mid-stream``: headers and two events, then silence (no chunk terminator);
- ``reset-mid-stream``: headers and two events, then RST;
- ``slow-stream``: an event every 50 ms until the peer leaves (at most 10 s);
- ``truncated-length``: ``Content-Length: 200`` and 12 bytes of JSON, then FIN;
- ``hang-in-body``: ``Content-Length: 200`` and 12 bytes of JSON, then silence;
- ``truncated-chunked``: ``application/json`` chunked; a chunk announced as 0x40 bytes carries
  10, then FIN;
- ``bad-chunk``: ``application/json`` chunked; one good chunk, 0.1 s later a chunk size line
  ``zz``; the connection is left open;
- ``not-json``: 200 ``application/json`` (Content-Length) whose body is an HTML page;
- ``not-json-chunked``: the same HTML page, chunked, with a proper end;
- ``wrong-type-stream``: two events and ``[DONE]`` sent as ``text/plain`` (chunked);
- ``status-<code>``: that status with an OpenAI error body (``Retry-After: 7`` on 429), for whole
  and streaming requests alike;
  ``status-<code>-html``: that status with an HTML body;
- ``models-garbage`` / ``models-not-list`` (as ``X-Fault`` on ``GET /v1/models``): a 200
  ``application/json`` that is not JSON / a JSON object whose ``data`` is not a list.

Every answer it finishes carries ``X-Fault-Server: <behaviour>``, so a test can tell an answer
the upstream made from one the proxy made.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import orjson

SLOW_INTERVAL = 0.05
HOLD_LIMIT = 30.0
HTML = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
JSON_PIECE = b'{"id": "chat'  # 12 bytes of a JSON document that never ends


@dataclass
class Conn:
    """One connection the server accepted, and what happened on it."""

    id: int
    opened: float
    behaviour: str = ""
    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    answered: float | None = None  # the request was read and the behaviour started
    closed_at: float | None = None
    closed_by: str | None = None  # "server", "peer" or "limit" (the server gave up holding)

    @property
    def open(self) -> bool:
        return self.closed_at is None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Behaviour = Callable[["FaultServer", Conn, Reader, Writer], Awaitable[None]]


class FaultServer:
    def __init__(self, *, echo_only: bool = False) -> None:
        self.echo_only = echo_only
        self.connections: list[Conn] = []
        self.url = ""
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- running -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-server", daemon=True)
        self._thread.start()
        self._call(self._listen())
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            await self._unlisten()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await asyncio.sleep(0.05)  # closed transports let go of their sockets on the next turns

    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """Nobody listens on the port inside the block: connections to it are refused."""
        self._call(self._unlisten())
        try:
            yield
        finally:
            self._call(self._listen())

    def _call(self, coro: Awaitable[None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True, limit=4 * 1024 * 1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    # -- what the tests look at ----------------------------------------------------------------

    def mark(self) -> int:
        """A position in ``connections``: pass it to ``since`` to see only later connections."""
        return len(self.connections)

    def since(self, mark: int) -> list[Conn]:
        return self.connections[mark:]

    def open_connections(self) -> list[Conn]:
        return [conn for conn in self.connections if conn.open]

    def wait_for(self, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_request(self, mark: int, timeout: float = 5.0) -> Conn:
        """The first connection after ``mark`` once its request was read."""
        if not self.wait_for(lambda: any(c.answered for c in self.since(mark)), timeout):
            raise AssertionError("the fault server received no request")
        return next(c for c in self.since(mark) if c.answered)

    # -- serving -------------------------------------------------------------------------------

    async def _handle(self, reader: Reader, writer: Writer) -> None:
        conn = Conn(len(self.connections), time.monotonic())
        self.connections.append(conn)
        try:
            await self._read_request(conn, reader)
            conn.behaviour = self._choose(conn)
            conn.answered = time.monotonic()
            await BEHAVIOURS.get(conn.behaviour, _status_or_ok)(self, conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            if conn.closed_by is None:
                conn.closed_by = "peer"
        except asyncio.CancelledError:
            conn.closed_by = conn.closed_by or "limit"
            raise
        finally:
            if conn.closed_by is None:
                conn.closed_by = "server"
            if not writer.transport.is_closing():
                writer.transport.close()
            conn.closed_at = time.monotonic()

    async def _read_request(self, conn: Conn, reader: Reader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("utf-8", "surrogateescape").split("\r\n")
        conn.method, conn.target, _ = [*lines[0].split(" ", 2), "", ""][:3]
        for line in lines[1:]:
            name, _, value = line.partition(":")
            conn.headers.append((name.strip(), value.strip()))
        if (length := conn.header("content-length")) is not None:
            conn.body = await reader.readexactly(int(length))
        elif (conn.header("transfer-encoding") or "").lower() == "chunked":
            conn.body = await _read_chunked(reader)

    def _choose(self, conn: Conn) -> str:
        if self.echo_only:
            return "echo"
        chosen = conn.header("x-fault")
        if chosen is None and conn.body.startswith(b"{"):
            with contextlib.suppress(ValueError):
                model = orjson.loads(conn.body).get("model")
                chosen = model if isinstance(model, str) else None
        return chosen or "ok"


async def _read_chunked(reader: Reader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


# -- bytes on the wire ---------------------------------------------------------------------------------

_REASONS = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def head(status: int, behaviour: str, content_type: str, *, length: int | None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}\r\n"
        f"Content-Type: {content_type}\r\n{framing}X-Fault-Server: {behaviour}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


def event(model: str, text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    body = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1, "model": model}
    return b"data: " + orjson.dumps({**body, "choices": [choice]}) + b"\n\n"


def completion(model: str) -> bytes:
    message = {"role": "assistant", "content": f"reply from {model}"}
    return orjson.dumps(
        {
            "id": "chatcmpl-fault",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        }
    )


def _streamed(conn: Conn) -> bool:
    with contextlib.suppress(ValueError, AttributeError):
        return orjson.loads(conn.body).get("stream") is True
    return False


async def _send(writer: Writer, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def _hold(conn: Conn, reader: Reader) -> None:
    """Say nothing; return when the peer closes (or after HOLD_LIMIT, noted as ``limit``)."""
    try:
        async with asyncio.timeout(HOLD_LIMIT):
            while await reader.read(65536):
                pass
        conn.closed_by = "peer"
    except TimeoutError:
        conn.closed_by = "limit"


def _reset(writer: Writer) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- behaviours ----------------------------------------------------------------------------------------


async def _ok(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    if conn.target.split("?", 1)[0] == "/v1/models":
        data = [{"id": "ok", "object": "model", "created": 1, "owned_by": "fault"}]
        body = orjson.dumps({"object": "list", "data": data})
        await _send(writer, head(200, "ok", "application/json", length=len(body)) + body)
        return
    if not _streamed(conn):
        body = completion("ok")
        await _send(writer, head(200, "ok", "application/json", length=len(body)) + body)
        return
    events = [event("ok", word) for word in ("reply", " from", " ok")] + [b"data: [DONE]\n\n"]
    await _send(writer, head(200, "ok", "text/event-stream", length=None))
    await _send(writer, b"".join(chunk(e) for e in events) + LAST_CHUNK)


async def _echo(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    path = conn.target.split("?", 1)[0]
    if conn.method == "GET" and path == "/v1/models":
        data = [{"id": "echo-model", "object": "model", "created": 1, "owned_by": "fault"}]
        body = orjson.dumps({"object": "list", "data": data})
    else:
        body = orjson.dumps({"method": conn.method, "target": conn.target, "bytes": len(conn.body)})
    answer = head(200, "echo", "application/json", length=len(body))
    await _send(writer, answer if conn.method == "HEAD" else answer + body)


async def _reset_before_headers(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    _reset(writer)


async def _close_before_headers(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    writer.close()


async def _hang_before_headers(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _hold(conn, reader)


async def _garbage_status(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _send(writer, b"this is not HTTP\r\n\r\n")
    if conn.behaviour.endswith("-hold"):
        await _hold(conn, reader)


async def _hang_after_headers(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _send(writer, head(200, conn.behaviour, "text/event-stream", length=None))
    await _hold(conn, reader)


async def _two_events(writer: Writer, conn: Conn) -> None:
    await _send(writer, head(200, conn.behaviour, "text/event-stream", length=None))
    await _send(writer, chunk(event(conn.behaviour, "one")) + chunk(event(conn.behaviour, " two")))


async def _hang_mid_stream(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _two_events(writer, conn)
    await _hold(conn, reader)


async def _reset_mid_stream(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _two_events(writer, conn)
    await asyncio.sleep(0.05)  # let the events leave before the reset discards the send buffer
    _reset(writer)


async def _slow_stream(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _send(writer, head(200, conn.behaviour, "text/event-stream", length=None))
    peer_left = asyncio.ensure_future(_hold(conn, reader))
    try:
        for _ in range(int(10 / SLOW_INTERVAL)):
            if peer_left.done():
                return
            await _send(writer, chunk(event(conn.behaviour, "tick ")))
            await asyncio.sleep(SLOW_INTERVAL)
        await _send(writer, chunk(b"data: [DONE]\n\n") + LAST_CHUNK)
    finally:
        peer_left.cancel()


async def _truncated_length(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _send(writer, head(200, conn.behaviour, "application/json", length=200) + JSON_PIECE)
    if conn.behaviour == "hang-in-body":
        await _hold(conn, reader)


async def _truncated_chunked(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _send(writer, head(200, conn.behaviour, "application/json", length=None))
    await _send(writer, b"40\r\n" + JSON_PIECE[:10])


async def _bad_chunk(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    await _send(writer, head(200, conn.behaviour, "application/json", length=None))
    await _send(writer, chunk(JSON_PIECE))
    await asyncio.sleep(0.1)  # the good chunk is read on its own, the bad line later
    await _send(writer, b"zz\r\nnot a chunk\r\n")
    await _hold(conn, reader)


async def _not_json(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    if conn.behaviour.endswith("-chunked"):
        answer = head(200, conn.behaviour, "application/json", length=None) + chunk(HTML) + LAST_CHUNK
    else:
        answer = head(200, conn.behaviour, "application/json", length=len(HTML)) + HTML
    await _send(writer, answer)


async def _wrong_type_stream(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    events = [event(conn.behaviour, word) for word in ("plain", " text")] + [b"data: [DONE]\n\n"]
    await _send(writer, head(200, conn.behaviour, "text/plain", length=None))
    await _send(writer, b"".join(chunk(e) for e in events) + LAST_CHUNK)


async def _models_garbage(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    body = HTML if conn.behaviour == "models-garbage" else b'{"object": "list", "data": 5}'
    await _send(writer, head(200, conn.behaviour, "application/json", length=len(body)) + body)


async def _status_or_ok(server: FaultServer, conn: Conn, reader: Reader, writer: Writer) -> None:
    name = conn.behaviour
    code = name.removeprefix("status-").removesuffix("-html")
    if not name.startswith("status-") or not code.isdigit():
        await _ok(server, conn, reader, writer)
        return
    status = int(code)
    extra = "Retry-After: 7\r\n" if status == 429 else ""
    if name.endswith("-html"):
        body, content_type = HTML, "text/html"
    else:
        error = {"message": f"the fault server answers {status}", "type": "fault_error", "code": code}
        body, content_type = orjson.dumps({"error": error}), "application/json"
    await _send(writer, head(status, name, content_type, length=len(body), extra=extra) + body)


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": _ok,
    "echo": _echo,
    "reset-before-headers": _reset_before_headers,
    "close-before-headers": _close_before_headers,
    "hang-before-headers": _hang_before_headers,
    "garbage-status": _garbage_status,
    "garbage-status-hold": _garbage_status,
    "hang-after-headers": _hang_after_headers,
    "hang-mid-stream": _hang_mid_stream,
    "reset-mid-stream": _reset_mid_stream,
    "slow-stream": _slow_stream,
    "truncated-length": _truncated_length,
    "hang-in-body": _truncated_length,
    "truncated-chunked": _truncated_chunked,
    "bad-chunk": _bad_chunk,
    "not-json": _not_json,
    "not-json-chunked": _not_json,
    "wrong-type-stream": _wrong_type_stream,
    "models-garbage": _models_garbage,
    "models-not-list": _models_garbage,
}
