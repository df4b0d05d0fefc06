"""The measuring client for streams: many SSE streams over raw asyncio sockets.

    python -m bench.stream_client --url http://127.0.0.1:PORT --streams 500 --events 100 --rate 20

Opens ``--streams`` connections spread evenly over ``--ramp`` seconds, each a ``POST
/v1/chat/completions`` with ``"stream": true`` (the shape of the stream in the query string, see
bench/sse_upstream.py), de-chunks the answer and reads nothing of each event but its
``"bench_ts"``: the delay of an event is the time it was received (``time.monotonic_ns()`` when
its bytes arrived) minus the upstream's send time. Prints one JSON object: streams completed,
events seen, delay percentiles in microseconds, and this process's own CPU seconds, so the noise
it adds to a 2-core machine is visible.

``--idle --hold``: streams of one event that stay open. Prints ``{"ready": N, ...}`` once every
stream has its first event, keeps them open until a line (or EOF) on stdin, then closes them and
prints the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from bench import payloads

_TS = re.compile(rb'"(?:%s|%s)":"?(\d+)' % (payloads.TS_FIELD.encode(), payloads.TS_FINGERPRINT.encode()))
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)


class Run:
    """What all streams of one run saw."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.delays: list[int] = []
        self.completed = 0
        self.failed = 0
        self.errors: list[str] = []
        self.with_first_event = 0
        self.all_started = asyncio.get_running_loop().create_future()
        self.all_done = asyncio.get_running_loop().create_future()

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(message)
        self._check_done()

    def complete(self) -> None:
        self.completed += 1
        self._check_done()

    def first_event(self) -> None:
        self.with_first_event += 1
        if self.with_first_event + self.failed >= self.streams and not self.all_started.done():
            self.all_started.set_result(None)

    def _check_done(self) -> None:
        if self.completed + self.failed >= self.streams and not self.all_done.done():
            self.all_done.set_result(None)
        if self.with_first_event + self.failed >= self.streams and not self.all_started.done():
            self.all_started.set_result(None)


class StreamProtocol(asyncio.Protocol):
    """One stream: status line and headers, then chunked (or close-delimited) SSE."""

    def __init__(self, run: Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.in_body = False
        self.chunked = True
        self.raw = bytearray()  # body bytes not yet de-chunked
        self.events = bytearray()  # de-chunked bytes not yet scanned up to an event's end
        self.data_left = 0  # of the current chunk's payload
        self.crlf_left = 0  # after it
        self.seen = 0
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        if self.in_body and not self.chunked:
            self._scan(time.monotonic_ns(), final=True)
            self._finish()
        else:
            self.finished = True
            self.run.fail(f"connection lost after {self.seen} events: {exc!r}")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end])
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
            if status != b"200":
                self.finished = True
                self.run.fail(f"status {status.decode('latin-1')}")
                self.transport.close()  # type: ignore[union-attr]
                return
            self.chunked = _CHUNKED.search(head) is not None
            self.in_body = True
            data = bytes(self.head[end + 4 :])
            self.head.clear()
        if self.chunked:
            self._dechunk(data)
        else:
            self.events += data
        self._scan(now)

    def _dechunk(self, data: bytes) -> None:
        raw = self.raw
        raw += data
        pos, size = 0, len(raw)
        while pos < size:
            if self.data_left:
                take = min(self.data_left, size - pos)
                self.events += raw[pos : pos + take]
                pos += take
                self.data_left -= take
                if self.data_left:
                    break
                self.crlf_left = 2
            if self.crlf_left:
                take = min(self.crlf_left, size - pos)
                pos += take
                self.crlf_left -= take
                continue
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            length = int(raw[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if length == 0:
                self._finish()
                break
            self.data_left = length
        del raw[:pos]

    def _scan(self, now: int, final: bool = False) -> None:
        events = self.events
        end = len(events) if final else events.rfind(b"\n\n") + 2
        if end < 2:
            return
        first = self.seen == 0
        delays = self.run.delays
        for match in _TS.finditer(events, 0, end):
            delays.append(now - int(match.group(1)))
            self.seen += 1
        del events[:end]
        if first and self.seen:
            self.run.first_event()

    def _finish(self) -> None:
        if self.finished:
            return
        self._scan(time.monotonic_ns(), final=True)
        self.finished = True
        self.run.complete()
        if self.transport is not None:
            self.transport.close()


def percentiles(values: list[int], scale: float = 1e-3) -> dict[str, float]:
    """Nearest-rank percentiles (and mean, max) of ``values`` times ``scale``."""
    if not values:
        return {}
    ordered = sorted(values)
    count = len(ordered)

    def rank(fraction: float) -> float:
        return ordered[min(count - 1, max(0, math.ceil(fraction * count) - 1))] * scale

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": ordered[-1] * scale,
        "mean": sum(ordered) / count * scale,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_request(host: str, port: int, query: str, body: bytes) -> bytes:
    return (
        f"POST /v1/chat/completions?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\nX-Bench-Query: {query}\r\n"
        f"Authorization: Bearer sk-bench-not-a-key\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run_streams(
    url: str,
    *,
    streams: int,
    events: int,
    rate: float,
    ramp: float,
    think: bool = False,
    idle: bool = False,
    align: bool = False,
    hold: bool = False,
    fingerprint: bool = False,
    limit_s: float = 120.0,
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    query = (
        f"events={events}&rate={rate:g}&think={int(think)}&idle={int(idle)}&align={int(align)}"
        f"&fp={int(fingerprint)}"
    )
    request = build_request(host, port, query, payloads.chat_body(stream=True))
    loop = asyncio.get_running_loop()
    run = Run(streams)
    protocols: list[StreamProtocol] = []
    cpu0, wall0 = _cpu_seconds(), time.monotonic()

    async def open_one() -> None:
        protocol = StreamProtocol(run, request)
        protocols.append(protocol)
        try:
            await loop.create_connection(lambda: protocol, host, port)
        except OSError as exc:
            protocol.finished = True
            run.fail(f"connect: {exc!r}")

    tasks = []
    for index in range(streams):
        delay = wall0 + index * ramp / streams - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(open_one()))
    await asyncio.gather(*tasks)
    result: dict[str, Any] = {}
    try:
        if hold:
            await asyncio.wait_for(asyncio.shield(run.all_started), limit_s)
            ready = {"ready": run.with_first_event, "failed": run.failed, "errors": run.errors}
            print(json.dumps(ready), flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            for protocol in protocols:
                if protocol.transport is not None:
                    protocol.finished = True
                    protocol.transport.close()
            result["held"] = run.with_first_event
        else:
            await asyncio.wait_for(asyncio.shield(run.all_done), limit_s)
    except TimeoutError:
        result["timed_out"] = True
        for protocol in protocols:
            if not protocol.finished and protocol.transport is not None:
                protocol.transport.abort()
    wall = time.monotonic() - wall0
    result.update(
        {
            "streams": streams,
            "completed": run.completed,
            "failed": run.failed,
            "errors": run.errors,
            "events_seen": len(run.delays),
            "delay_us": percentiles(run.delays),
            "client_cpu_s": round(_cpu_seconds() - cpu0, 4),
            "wall_s": round(wall, 3),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=100, help="events per stream")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second per stream")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which streams open")
    parser.add_argument("--think", action="store_true", help="streams start with a think block")
    parser.add_argument("--idle", action="store_true", help="one event, then the stream idles")
    parser.add_argument("--align", action="store_true", help="all streams send on the same ticks")
    parser.add_argument("--hold", action="store_true", help="with --idle: wait for stdin, then close")
    parser.add_argument(
        "--fingerprint", action="store_true", help="the send time in system_fingerprint (for LiteLLM)"
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    async def go() -> dict[str, Any]:
        return await run_streams(
            args.url,
            streams=args.streams,
            events=args.events,
            rate=args.rate,
            ramp=args.ramp,
            think=args.think,
            idle=args.idle,
            align=args.align,
            hold=args.hold,
            fingerprint=args.fingerprint,
            limit_s=args.timeout,
        )

    try:
        import uvloop
    except ImportError:
        result = asyncio.run(go())
    else:
        result = uvloop.run(go())
    print(json.dumps(result), flush=True)
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
