"""The benchmark's Python upstream: paced SSE streams, and canned answers when nginx is absent.

    python -m bench.sse_upstream [--host 127.0.0.1] [--port 0]

Prints ``listening PORT`` once it accepts connections; stops on SIGTERM or SIGINT.

It has to stay cheap, so that the proxy in front of it is what gets measured: one asyncio process
(uvloop when installed), a hand-written HTTP/1.1 reader, pre-encoded events, and a single timer
for every open stream. Each stream keeps its own schedule (event ``k`` due at ``start + k /
rate``), and streams are kept in one heap by their next due time; the timer fires for the
earliest, writes every event due by then (plus a fraction of a millisecond), and re-arms. Since
clients open their streams spread over time, the phases spread too, and the load is a steady
10,000 events/s rather than 500 events in one burst every 50 ms (``align=1`` gives that burst,
as a batching inference engine would).

``POST`` with ``"stream": true`` in the body answers a chunked ``text/event-stream``; the query
string sets its shape:

- ``events`` (default 100): events carrying text or the finish reason, then ``data: [DONE]``;
- ``rate`` (default 20): events per second, per stream; 0 writes the whole stream at once;
- ``think=1``: the text starts with a ``<think>…</think>`` block split across events;
- ``idle=1``: send the first event, then nothing until the client leaves;
- ``align=1``: due times on multiples of the interval, shared by all streams.

Each paced event carries its send time as ``"bench_ts": <time.monotonic_ns()>`` (CLOCK_MONOTONIC,
the same clock in every process), read just before the write. Any other ``POST`` gets the
canned JSON answer, ``GET /v1/models`` a list, and everything else 404.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import re
import signal
import time
from urllib.parse import parse_qs

from bench import payloads

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_QUERY_HEADER = re.compile(rb"\r\nx-bench-query:([^\r]*)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
# The timer's period at most: events due meanwhile are written together when it fires (each with
# its own send time), rather than waking the loop for every one (uvloop's timers round to 1 ms,
# and a shorter delay would spin).
_TICK_NS = 1_000_000

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_DONE_AND_END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payloads.DONE), payloads.DONE)
_MODELS = b'{"object":"list","data":[{"id":"%s","object":"model","created":0,"owned_by":"bench"}]}' % (
    payloads.SERVED_MODEL.encode()
)


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        content_type,
        len(body),
        body,
    )


_JSON_ANSWER = _response(b"200 OK", b"application/json", payloads.CANNED_JSON)
_MODELS_ANSWER = _response(b"200 OK", b"application/json", _MODELS)
_NOT_FOUND = _response(b"404 Not Found", b"application/json", b'{"error":"not found"}')


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_heads_cache: dict[tuple[int, bool, bool], list[bytes]] = {}
_burst_cache: dict[int, bytes] = {}


def _heads(events: int, think: bool, fingerprint: bool) -> list[bytes]:
    key = (events, think, fingerprint)
    if key not in _heads_cache:
        _heads_cache[key] = payloads.event_heads(events, think=think, fingerprint=fingerprint)
    return _heads_cache[key]


class Scheduler:
    """One timer for all paced streams: a heap of (next due time, sequence, stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[int, int, Stream]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: int | None = None

    def add(self, stream: Stream, due_ns: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due_ns, self._seq, stream))
        if self._timer_due is None or due_ns < self._timer_due:
            self._arm(due_ns)

    def _arm(self, due_ns: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due_ns
        delay = max(_TICK_NS, due_ns - time.monotonic_ns()) / 1e9
        self._timer = self._loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_due = None
        heap = self._heap
        limit = time.monotonic_ns()
        while heap and heap[0][0] <= limit:
            stream = heapq.heappop(heap)[2]
            # send_next may start a pipelined stream on the same connection, which adds to the heap.
            due = None if stream.closed else stream.send_next()
            if due is not None:
                self._seq += 1
                heapq.heappush(heap, (due, self._seq, stream))
        if heap:
            self._arm(heap[0][0])


class Stream:
    __slots__ = ("closed", "heads", "idle", "interval", "protocol", "sent", "start", "tail")

    def __init__(
        self, protocol: UpstreamProtocol, heads: list[bytes], tail: bytes, interval: int, idle: bool
    ) -> None:
        self.protocol = protocol
        self.heads = heads
        self.tail = tail
        self.interval = interval
        self.idle = idle
        self.sent = 0
        self.start = 0
        self.closed = False

    def send_next(self) -> int | None:
        """Write the next event now; its successor's due time, or None when none is due."""
        transport = self.protocol.transport
        event = self.heads[self.sent] + b"%d%s" % (time.monotonic_ns(), self.tail)
        self.sent += 1
        if self.sent < len(self.heads):
            transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            return None if self.idle else self.start + self.sent * self.interval
        transport.write(b"%x\r\n%s\r\n%s" % (len(event), event, _DONE_AND_END))
        self.closed = True
        self.protocol.stream_done()
        return None


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buffer = bytearray()
        self.stream: Stream | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream.closed = True
            self.stream = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def stream_done(self) -> None:
        self.stream = None
        if self.close_after:
            self.transport.close()
        elif self.buffer:
            self._serve()

    def _serve(self) -> None:
        buffer = self.buffer
        while self.stream is None and not self.transport.is_closing():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            match = _LENGTH.search(head)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(buffer) < total:
                return
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            self.close_after = _CLOSE.search(head) is not None
            self._answer(head, body)
            if self.stream is None and self.close_after:
                self.transport.close()

    def _answer(self, head: bytes, body: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].split(b" ")
        method, target = line[0], line[1] if len(line) > 1 else b"/"
        path, _, query = target.partition(b"?")
        if method == b"GET" and path.endswith(b"/models"):
            self.transport.write(_MODELS_ANSWER)
        elif method != b"POST":
            self.transport.write(_NOT_FOUND)
        elif not _STREAM.search(body):
            self.transport.write(_JSON_ANSWER)
        else:
            # A proxy that drops the query string (LiteLLM) forwards x- headers instead.
            if not query and (match := _QUERY_HEADER.search(head)):
                query = match.group(1).strip()
            self._start_stream(parse_qs(query.decode("latin-1")))

    def _start_stream(self, params: dict[str, list[str]]) -> None:
        def number(name: str, default: float) -> float:
            return float(params[name][0]) if name in params else default

        events = max(1, int(number("events", 100)))
        rate = number("rate", 20)
        think = number("think", 0) > 0
        if rate <= 0:
            if events not in _burst_cache:
                _burst_cache[events] = _STREAM_HEAD + _chunked(payloads.canned_sse(events)) + b"0\r\n\r\n"
            self.transport.write(_burst_cache[events])
            return
        interval = int(1e9 / rate)
        fingerprint = number("fp", 0) > 0
        heads = _heads(events, think, fingerprint)
        stream = Stream(self, heads, payloads.ts_tail(fingerprint), interval, idle=number("idle", 0) > 0)
        self.stream = stream
        self.transport.write(_STREAM_HEAD)
        now = time.monotonic_ns()
        if number("align", 0) > 0:
            stream.start = -(-now // interval) * interval
            self.scheduler.add(stream, stream.start)
            return
        stream.start = now
        due = stream.send_next()
        if due is not None:
            self.scheduler.add(stream, due)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(loop)
    server = await loop.create_server(
        lambda: UpstreamProtocol(scheduler), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
