"""upstream: which headers cross the proxy, and how aiohttp failures become client answers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import aiohttp
import pytest

from service import upstream
from service.access import CREDENTIAL_HEADERS
from service.config import Settings
from service.errors import ProxyError
from service.upstream import UpstreamError, failure, request_headers, response_headers

# -- request headers ---------------------------------------------------------------------------


def test_request_headers_drop_hop_by_hop_host_length_and_expect() -> None:
    given = [
        ("Host", "proxy.local:1234"),
        ("Content-Length", "12"),
        ("Expect", "100-continue"),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic xyz"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Authorization", "Bearer sk-test"),
        ("Content-Type", "application/json"),
        ("OpenAI-Organization", "org-1"),
    ]
    kept = request_headers(given)
    assert list(kept.items()) == [
        ("Authorization", "Bearer sk-test"),
        ("Content-Type", "application/json"),
        ("OpenAI-Organization", "org-1"),
    ]


def test_request_headers_drop_what_connection_names_case_insensitively() -> None:
    given = [
        ("connection", "close, X-Hop-One ,x-hop-two"),
        ("X-HOP-ONE", "a"),
        ("x-hop-two", "b"),
        ("X-Hop-Three", "c"),
        ("Connection", "X-Hop-Three"),
        ("X-Stays", "d"),
    ]
    assert list(request_headers(given).items()) == [("X-Stays", "d")]


def test_request_headers_without_credentials_drops_them_in_any_case_before_the_control_check() -> None:
    given = [
        ("Authorization", "Bearer a\x01"),
        ("AUTHORIZATION", "Bearer b"),
        ("api-key", "c"),
        ("Api-Key", "d"),
        ("Content-Type", "application/json"),
        ("X-Request-Id", "r"),
    ]
    kept = request_headers(given, without=CREDENTIAL_HEADERS)
    assert list(kept.items()) == [("Content-Type", "application/json"), ("X-Request-Id", "r")]
    with pytest.raises(ProxyError) as raised:
        request_headers(given)
    assert raised.value.status == 400


def test_request_headers_keep_repeated_headers_in_order() -> None:
    given = [("X-Multi", "1"), ("Accept", "text/event-stream"), ("x-multi", "2"), ("X-Multi", "3")]
    kept = request_headers(given)
    assert kept.getall("x-multi") == ["1", "2", "3"]
    assert kept["accept"] == "text/event-stream"


def test_response_headers_keep_set_cookie_duplicates_and_drop_hop_by_hop() -> None:
    given = [
        ("Content-Type", "application/json"),
        ("Content-Length", "99"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, X-Internal"),
        ("X-Internal", "secret-route"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Retry-After", "7"),
        ("Content-Encoding", "gzip"),
    ]
    assert response_headers(given) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Retry-After", "7"),
        ("Content-Encoding", "gzip"),
    ]


# -- failure mapping on plain exceptions -------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "reason"),
    [
        (TimeoutError(), 504, "timeout"),  # asyncio.TimeoutError is this same class
        (aiohttp.ServerTimeoutError("read"), 504, "timeout"),
        (aiohttp.ServerDisconnectedError(), 502, "disconnected"),
        (aiohttp.ClientOSError(104, "reset"), 502, "disconnected"),
        (aiohttp.ClientPayloadError("truncated"), 502, "disconnected"),
        (aiohttp.ClientError("odd"), 502, "bad_response"),
    ],
)
def test_failure_maps_exceptions(exc: BaseException, status: int, reason: str) -> None:
    error = failure(exc)
    assert isinstance(error, ProxyError)
    assert (error.status, error.reason, error.code) == (status, reason, f"upstream_{reason}")
    kind = json.loads(error.body())["error"]["type"]
    assert kind == ("upstream_timeout" if status == 504 else "upstream_error")


# -- failure mapping on real connections -------------------------------------------------------

Behaviour = Callable[[asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


@asynccontextmanager
async def raw_server(behaviour: Behaviour, seen: list[bytes] | None = None) -> AsyncIterator[str]:
    """A loopback TCP server that reads one request head, then does ``behaviour``."""
    release = asyncio.Event()
    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if seen is not None:
                seen.append(head)
            await behaviour(writer, release)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        await asyncio.gather(*handlers, return_exceptions=True)


async def hang(writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
    await release.wait()


async def hang_up(writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
    return


async def garbage(writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    await writer.drain()


async def truncated(writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a little")
    await writer.drain()


async def ok(writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
    await writer.drain()


SETTINGS = Settings(upstream_url="http://unused", upstream_connect_timeout=2.0, upstream_read_timeout=0.3)


async def call_once(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    async with (
        upstream.new_session(SETTINGS) as session,
        upstream.call(
            session,
            "POST",
            url,
            data=data,
            headers=request_headers((headers or {}).items()),
            limits=upstream.limits(SETTINGS, whole=True),
        ) as r,
    ):
        return await r.read()


def closed_port() -> socket.socket:
    """A bound but not listening socket: connecting to its port is refused, and nobody takes it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_closed_port_is_a_real_client_connector_error_mapped_to_502_connect() -> None:
    async def main() -> None:
        with closed_port() as sock:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/models"
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientConnectorError) as caught:
                    await session.get(url)
            error = failure(caught.value)
            assert (error.status, error.reason, error.code) == (502, "connect", "upstream_connect")
            with pytest.raises(UpstreamError) as through_call:
                await call_once(url)
            assert (through_call.value.status, through_call.value.reason) == (502, "connect")

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [
        (hang, 504, "timeout"),
        (hang_up, 502, "disconnected"),
        (truncated, 502, "disconnected"),
        (garbage, 502, "bad_response"),
    ],
    ids=["silent", "hang-up", "truncated-body", "not-http"],
)
def test_call_turns_real_upstream_failures_into_upstream_errors(
    behaviour: Behaviour, status: int, reason: str
) -> None:
    async def main() -> None:
        async with raw_server(behaviour) as url:
            with pytest.raises(UpstreamError) as caught:
                await call_once(url, b"{}")
        assert (caught.value.status, caught.value.reason) == (status, reason)

    asyncio.run(asyncio.wait_for(main(), 20))


def sent_header_names(headers: dict[str, str], data: bytes | None) -> tuple[str, list[str]]:
    async def main() -> list[bytes]:
        seen: list[bytes] = []
        async with raw_server(ok, seen) as url:
            assert await call_once(url, data, headers) == b"{}"
        return seen

    (head,) = asyncio.run(asyncio.wait_for(main(), 20))
    lines = head.decode().split("\r\n")
    return lines[0], sorted(line.split(":", 1)[0].lower() for line in lines[1:] if line)


def test_the_session_adds_no_headers_of_its_own() -> None:
    """The upstream sees the client's headers, plus only Host and Content-Length."""
    given = {"Authorization": "Bearer k", "Content-Type": "application/json", "X-Request-ID": "r1"}
    request_line, names = sent_header_names(given, b'{"a":1}')
    assert request_line == "POST /v1/chat/completions HTTP/1.1"
    assert names == ["authorization", "content-length", "content-type", "host", "x-request-id"]


def test_a_body_without_content_type_is_not_given_one() -> None:
    """``new_session`` promises aiohttp adds no default headers: not even Content-Type."""
    _, names = sent_header_names({"X-Request-ID": "r2"}, b"raw bytes")
    assert names == ["content-length", "host", "x-request-id"]


def test_url_is_sent_as_written_without_requoting() -> None:
    async def main() -> list[bytes]:
        seen: list[bytes] = []
        async with raw_server(ok, seen) as url:
            await call_once(url.replace("/v1/chat/completions", "/v1/files/a%2Fb?q=%20x&y=1"))
        return seen

    (head,) = asyncio.run(asyncio.wait_for(main(), 20))
    assert head.split(b"\r\n", 1)[0] == b"POST /v1/files/a%2Fb?q=%20x&y=1 HTTP/1.1"


# -- BodyReader keep-alive ---------------------------------------------------------------------


async def paced_body(pieces: list[bytes], pause: float) -> AsyncIterator[str]:
    """A real aiohttp server sending ``pieces`` ``pause`` seconds apart; yields its URL."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, piece in enumerate(pieces):
            if index:
                await asyncio.sleep(pause)
            await response.write(piece)
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def reads(url: str, gap: float, keepalive: float, relay: bool = True) -> list[bytes | None]:
    got: list[bytes | None] = []
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        with upstream.BodyReader(answer, gap, keepalive) as body:
            while (chunk := await body.read()) != b"":
                got.append(chunk)
                body.relayed = relay and chunk is not None
    return got


def test_body_reader_says_when_a_keepalive_is_due_and_loses_no_byte() -> None:
    pieces = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]

    async def main() -> list[bytes | None]:
        async with asynccontextmanager(paced_body)(pieces, 0.5) as url:
            return await reads(url, gap=5, keepalive=0.1)

    got = asyncio.run(asyncio.wait_for(main(), 20))
    assert b"".join(chunk for chunk in got if chunk is not None) == b"".join(pieces)
    ticks = [index for index, chunk in enumerate(got) if chunk is None]
    assert len(ticks) >= 4  # about four per 0.5 s gap
    assert got[0] is not None


def test_body_reader_without_keepalive_times_out() -> None:
    async def main() -> list[bytes | None]:
        async with asynccontextmanager(paced_body)([b"data: 1\n\n", b"data: 2\n\n"], 2.0) as url:
            return await reads(url, gap=0.3, keepalive=0)

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(main(), 20))


def test_body_reader_keepalive_ticks_do_not_hide_the_gap_timeout() -> None:
    async def main() -> list[bytes | None]:
        async with asynccontextmanager(paced_body)([b"data: 1\n\n", b"data: 2\n\n"], 3.0) as url:
            return await reads(url, gap=0.5, keepalive=0.1)

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(main(), 20))
