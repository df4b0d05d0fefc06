"""Hostile clients on the wire, against real proxy processes over raw sockets: no body read
before the key, strict request heads, total deadlines for slow clients, the connection cap,
and /readyz as one probe per worker that never follows a redirect.

Every proxy of the module starts side by side, once; its upstream is this module's own echo
server, which records each request it was sent, so "nothing reached the upstream" is checked
on the upstream's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, StartProxy, eventually, side_by_side
from tests.fault_server import FaultServer
from tests.test_soak import worker_pid

KEY = "sk-wire-client-7f3a9c"
UPSTREAM_KEY = "sk-wire-upstream-1b2c3d"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
MIB = 1024 * 1024
ATTACK_BODY = 30 * MIB
ATTACKERS = 12
SLOW_LIMIT = 1.0  # CLIENT_HEADER_TIMEOUT and CLIENT_BODY_TIMEOUT of the slow proxy
CAP = 8  # MAX_CLIENT_CONNECTIONS of the capped proxy
PROBE_DELAY = 0.5


class ProbeUpstream:
    """An aiohttp server whose GET /v1/models takes PROBE_DELAY seconds, or redirects elsewhere;
    it counts the requests it gets and the most it held at once."""

    def __init__(self, location: str | None = None) -> None:
        self.location = location
        self.hits = 0
        self.in_flight = 0
        self.peak = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.location is not None:
            raise web.HTTPFound(self.location)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(PROBE_DELAY)
        finally:
            self.in_flight -= 1
        return web.json_response({"object": "list", "data": []})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> ProbeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


@pytest.fixture(scope="module")
def probed() -> Iterator[dict[str, ProbeUpstream]]:
    trap = ProbeUpstream().start()
    servers = {
        "slow": ProbeUpstream().start(),
        "trap": trap,
        "redirecting": ProbeUpstream(location=f"{trap.url}/v1/models").start(),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def proxies(
    start_proxy: StartProxy, echo: FaultServer, probed: dict[str, ProbeUpstream]
) -> Iterator[dict[str, Proxy]]:
    settings: dict[str, dict[str, str]] = {
        "keyed": {"PROXY_API_KEYS": KEY, "UPSTREAM_API_KEY": UPSTREAM_KEY},
        "slow": {
            "CLIENT_HEADER_TIMEOUT": str(SLOW_LIMIT),
            "CLIENT_BODY_TIMEOUT": str(SLOW_LIMIT),
        },
        "capped": {"MAX_CLIENT_CONNECTIONS": str(CAP), "CLIENT_HEADER_TIMEOUT": "60"},
        "ready": {"UPSTREAM_URL": probed["slow"].url},
        "redirected": {"UPSTREAM_URL": probed["redirecting"].url},
    }
    with side_by_side(start_proxy, settings, UPSTREAM_URL=echo.url, MODEL_MAP="{}") as running:
        yield running


def connect(proxy: Proxy, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


CLOSE_WAIT = 2.0


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): one answer read whole, then whether the proxy closed the
    connection right after it (EOF, or a reset once the answer was read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines[1:])
    }
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the answer"
        body += chunk
    # A close comes right after the answer; a kept-alive connection need not be waited on longer.
    timeout = sock.gettimeout()
    sock.settimeout(CLOSE_WAIT)
    try:
        closed = sock.recv(65536) == b""
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        closed = False
    finally:
        sock.settimeout(timeout)
    return int(lines[0].split()[1]), headers, body[:length], closed


def error_code(body: bytes) -> str:
    return str(orjson.loads(body)["error"]["code"])


def refused_and_closed(proxy: Proxy, request: bytes, status: int, code: str) -> None:
    """``request`` gets ``status`` with ``code``, says ``Connection: close`` and closes."""
    with connect(proxy, timeout=5) as sock:
        sock.sendall(request)
        answered, headers, body, closed = read_answer(sock)
    assert answered == status, body
    assert error_code(body) == code
    assert headers["connection"] == "close"
    assert closed


# --- 4. no key, no body ----------------------------------------------------------------------------


def test_without_a_key_the_401_comes_before_the_body_and_the_connection_closes(
    proxies: dict[str, Proxy], echo: FaultServer
) -> None:
    """Only the head of a 30 MiB upload is sent: the 401 must come without waiting for the body
    (Sanic used to buffer the whole body first), and no 100 Continue invites the body either."""
    mark = echo.mark()
    for expect in (b"", b"Expect: 100-continue\r\n"):
        with connect(proxies["keyed"], timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                + expect
                + b"Content-Length: %d\r\n\r\n" % ATTACK_BODY
            )
            status, headers, body, closed = read_answer(sock)
        assert status == 401, body
        assert error_code(body) == "invalid_api_key"
        assert headers["connection"] == "close"
        assert closed
    assert echo.since(mark) == []


def test_with_the_key_100_continue_invites_the_body_and_it_is_forwarded(
    proxies: dict[str, Proxy], echo: FaultServer
) -> None:
    mark = echo.mark()
    body = b'{"model": "m", "input": "hi"}'
    with connect(proxies["keyed"]) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"Expect: 100-continue\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, headers, _, _ = read_answer(sock)
    assert status == 200
    assert headers["connection"] == "keep-alive"
    assert echo.wait_request(mark).body == body


def test_an_honest_client_without_a_key_gets_its_401_not_a_reset(proxies: dict[str, Proxy]) -> None:
    """httpx sends the whole body before it reads: the proxy drains it (lingering close) rather
    than resetting the connection under the client's answer."""
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            response = client.post(
                f"{proxies['keyed'].v1}/embeddings", content=b"x" * (2 * MIB), headers={"x-api-key": "wrong"}
            )
            assert response.status_code == 401
            assert response.headers["connection"] == "close"


def _upload(proxy: Proxy) -> int:
    """One unauthenticated 30 MiB upload, sent whole as a careless client does; its status."""
    with connect(proxy, timeout=30) as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\n")
        sock.sendall(b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % ATTACK_BODY)
        piece = b"\0" * MIB
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(ATTACK_BODY // MIB):
                sock.sendall(piece)
        return read_answer(sock)[0]


def rss_kb(pid: int, field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def test_unauthenticated_uploads_do_not_grow_the_worker(proxies: dict[str, Proxy], echo: FaultServer) -> None:
    """12 unauthenticated 30 MiB uploads at once: each gets its 401, none is buffered (the
    worker used to hold all of them, about 400 MB)."""
    proxy = proxies["keyed"]
    pid = worker_pid(proxy)
    before = rss_kb(pid, "VmRSS")
    mark = echo.mark()
    with ThreadPoolExecutor(ATTACKERS) as pool:
        statuses = list(pool.map(_upload, [proxy] * ATTACKERS))
    peak = rss_kb(pid, "VmHWM")
    print(f"worker RSS before {before / 1024:.1f} MB, peak during the attack {peak / 1024:.1f} MB")
    assert statuses == [401] * ATTACKERS
    assert echo.since(mark) == []
    assert peak - before < 64 * 1024, (before, peak)


# --- 5. strict request heads -------------------------------------------------------------------------


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"\r\n"

MALFORMED_HEADS = [
    pytest.param(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\n"
        + AUTH
        + b"Content-Length : %d\r\n\r\n" % len(SMUGGLED)
        + SMUGGLED,
        id="space-before-colon-desync",
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"authorization : Bearer sk-own\r\n\r\n",
        id="authorization-space",
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"api-key\t: sk-own\r\n\r\n", id="api-key-tab"
    ),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b": empty\r\n\r\n", id="empty-name"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"X\0Y: 1\r\n\r\n", id="nul-in-name"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"X\nY: 1\r\n\r\n", id="lf-in-name"),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"X(Y): 1\r\n\r\n", id="non-token-name"
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"X-A: 1\r\n folded\r\n\r\n", id="obs-fold"
    ),
    pytest.param(
        b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"X-A: 1\nX-B: 2\r\n\r\n", id="lf-in-value"
    ),
    pytest.param(
        b"GET http://evil.example HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"\r\n", id="absolute-without-path"
    ),
    pytest.param(
        b"GET http://evil.example?x=1 HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"\r\n", id="absolute-query-only"
    ),
]


@pytest.mark.parametrize("request_bytes", MALFORMED_HEADS)
def test_a_malformed_head_is_400_closes_and_reaches_nothing(
    proxies: dict[str, Proxy], echo: FaultServer, request_bytes: bytes
) -> None:
    mark = echo.mark()
    refused_and_closed(proxies["keyed"], request_bytes, 400, "invalid_request")
    time.sleep(0.2)  # a forwarded request would have reached the echo server by now
    assert echo.since(mark) == []


@pytest.mark.parametrize(
    "header", [b"Authorization: Bearer sk-\xff\xfe", b"api-key: \xe9t\xe9"], ids=["authorization", "api-key"]
)
def test_a_credential_that_is_not_utf8_is_401(
    proxies: dict[str, Proxy], echo: FaultServer, header: bytes
) -> None:
    mark = echo.mark()
    with connect(proxies["keyed"]) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n" + header + b"\r\n\r\n")
        status, _, body, _ = read_answer(sock)
    assert status == 401, body
    assert error_code(body) == "invalid_api_key"
    assert echo.since(mark) == []


def test_every_token_character_is_still_a_header_name(proxies: dict[str, Proxy], echo: FaultServer) -> None:
    """Strict, not narrow: the odd but legal names of RFC 9110 are forwarded as they came."""
    mark = echo.mark()
    with connect(proxies["keyed"]) as sock:
        sock.sendall(
            b"GET /v1/files HTTP/1.1\r\nHost: proxy\r\n"
            + AUTH
            + b"X-Odd!#$%&'*+.^_`|~9: v\r\nX-Empty:\r\n\r\n"
        )
        status, _, body, _ = read_answer(sock)
    assert status == 200, body
    seen = echo.wait_request(mark)
    assert seen.header("X-Odd!#$%&'*+.^_`|~9") == "v"
    assert seen.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_the_upstream_sees_the_clients_headers_and_nothing_aiohttp_would_add(
    proxies: dict[str, Proxy], echo: FaultServer
) -> None:
    """No User-Agent, Accept, Accept-Encoding or Content-Type of the client library's own: a
    body sent without a Content-Type reaches the upstream without one."""
    mark = echo.mark()
    with connect(proxies["keyed"]) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"Content-Length: 4\r\n\r\nabcd")
        status, _, body, _ = read_answer(sock)
    assert status == 200, body
    seen = echo.wait_request(mark)
    assert sorted(name.lower() for name, _ in seen.headers) == [
        "authorization",
        "content-length",
        "host",
        "x-request-id",
    ]
    assert seen.header("content-length") == "4"


# --- 6. slow clients ---------------------------------------------------------------------------------


def test_slowloris_connections_are_cut_by_the_head_deadline(proxies: dict[str, Proxy]) -> None:
    """50 connections trickling a head a byte at a time (Sanic's own timeout restarts with every
    byte) are all cut about CLIENT_HEADER_TIMEOUT after they opened; a normal client is served
    meanwhile."""
    proxy = proxies["slow"]
    head = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nX-Padding: " + b"a" * 200
    sockets = [connect(proxy) for _ in range(50)]
    opened = time.monotonic()
    cut_after: dict[int, float] = {}
    for sock in sockets:
        sock.setblocking(False)
    served = False
    position = 0
    while len(cut_after) < len(sockets) and time.monotonic() - opened < 8 and position < len(head):
        for index, sock in enumerate(sockets):
            if index in cut_after:
                continue
            try:
                sock.send(head[position : position + 1])
                sock.recv(1, socket.MSG_PEEK)  # an answer, or the end: either way, cut
                cut_after[index] = time.monotonic() - opened
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                cut_after[index] = time.monotonic() - opened
        if not served:
            served = httpx.get(f"{proxy.v1}/files", timeout=5).status_code == 200
        position += 1
        time.sleep(0.05)
    for sock in sockets:
        sock.close()
    assert served
    assert len(cut_after) == len(sockets), f"{len(sockets) - len(cut_after)} connections still open"
    assert max(cut_after.values()) < SLOW_LIMIT + 4, sorted(cut_after.values())
    assert min(cut_after.values()) >= SLOW_LIMIT * 0.9, sorted(cut_after.values())


def test_a_connection_that_sends_nothing_is_closed_by_the_head_deadline(proxies: dict[str, Proxy]) -> None:
    with connect(proxies["slow"]) as sock:
        opened = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - opened < SLOW_LIMIT + 4


def test_a_trickled_body_is_cut_by_the_body_deadline_with_408(
    proxies: dict[str, Proxy], echo: FaultServer
) -> None:
    mark = echo.mark()
    with connect(proxies["slow"]) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\nContent-Length: 1000\r\n\r\n{")
        began = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while not answer and time.monotonic() - began < SLOW_LIMIT + 6:
            with contextlib.suppress(BlockingIOError):
                sock.send(b" ")
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(65536)
            time.sleep(0.05)
        took = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"request_timeout" in answer
    assert SLOW_LIMIT * 0.9 <= took < SLOW_LIMIT + 4
    assert echo.since(mark) == []


def test_past_max_client_connections_a_new_connection_gets_503_at_once(proxies: dict[str, Proxy]) -> None:
    proxy = proxies["capped"]
    request = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    held = [connect(proxy) for _ in range(CAP)]

    try:
        eventually(lambda: refused_and_closed(proxy, request, 503, "too_many_connections"), timeout=10)
    finally:
        for sock in held:
            sock.close()

    def served() -> None:
        with connect(proxy, timeout=5) as sock:
            sock.sendall(request)
            assert read_answer(sock)[0] == 200

    eventually(served, timeout=10)


# --- 7. /readyz --------------------------------------------------------------------------------------


async def _readyz_at_once(url: str, count: int) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> int:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=20)) as response:
                return response.status

        return await asyncio.gather(*(one() for _ in range(count)))


def test_readyz_sends_one_probe_however_many_ask(
    proxies: dict[str, Proxy], probed: dict[str, ProbeUpstream]
) -> None:
    statuses = asyncio.run(_readyz_at_once(f"{proxies['ready'].url}/readyz", 200))
    assert statuses == [200] * 200
    assert probed["slow"].hits == 1
    assert probed["slow"].peak == 1


def test_readyz_never_follows_a_redirect(proxies: dict[str, Proxy], probed: dict[str, ProbeUpstream]) -> None:
    """The upstream answers (a 302 is an answer); where its Location points is never asked."""
    response = httpx.get(f"{proxies['redirected'].url}/readyz", timeout=10)
    assert response.status_code == 200
    assert probed["redirecting"].hits == 1
    assert probed["trap"].hits == 0
