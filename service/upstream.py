"""The connection to the model server: one aiohttp session per worker, headers, failures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Iterable
from functools import lru_cache
from types import TracebackType

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from service.backends import Backend
from service.config import Settings
from service.errors import ProxyError

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "expect"}
_NOT_RELAYED_DOWN = HOP_BY_HOP | {"content-length"}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Raised by aiohttp's parser for a broken body; not a ClientError.
FAILURES = (aiohttp.ClientError, TimeoutError, HttpProcessingError)


class UpstreamError(ProxyError):
    """The upstream could not be reached or did not answer in time; ``reason`` labels metrics."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(status, message, f"upstream_{reason}")
        self.reason = reason


_NOT_ADDED = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


class _AsSent(aiohttp.ClientRequest):
    """A request that gets none of aiohttp's own headers, as ``skip_auto_headers`` asks, with
    the skipped names made once: aiohttp sorts them into a new multidict for every request, 2 %
    of the proxy's instructions per request. aiohttp reads the names from ``_skip_auto_headers``
    to leave out the body's default Content-Type; a wire test checks that none is added."""

    _SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in _NOT_ADDED)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = self._SKIPPED


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """Bodies pass through as the upstream encoded them (no auto-decompression), and aiohttp adds
    none of its own default headers, so the upstream sees what the client sent.

    The session is shared by every client of the worker, so it keeps nothing of one request for
    the next: no cookie jar (an upstream's Set-Cookie is relayed to its client, never stored), no
    session-wide auth or headers, no redirects followed (``call`` passes allow_redirects=False),
    no proxy or .netrc from the environment (trust_env off), and one TLS setting for all, so a
    pooled connection is never reused under another client's terms.

    A stream holds its connection for the whole generation, so the pool (aiohttp's default is
    100) is sized by UPSTREAM_MAX_CONNECTIONS; every request sets its own timeouts.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.upstream_max_connections, ttl_dns_cache=60),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=limits(settings, whole=False),
        auto_decompress=False,
        skip_auto_headers=_NOT_ADDED,
        request_class=_AsSent,
    )


def limits(settings: Settings, backend: Backend | None = None, *, whole: bool) -> aiohttp.ClientTimeout:
    """Connect and between-bytes limits always (the backend's own, else the global ones); a
    total (REQUEST_TIMEOUT) only for answers read whole, since a total would cut long streams."""
    return _timeout(
        settings.request_timeout if whole else None,
        settings.connect_timeout(backend),
        settings.read_timeout(backend),
    )


@lru_cache(maxsize=64)
def _timeout(total: float | None, connect: float, read: float) -> aiohttp.ClientTimeout:
    """ClientTimeout is immutable, so requests with the same limits share one."""
    return aiohttp.ClientTimeout(total=total, sock_connect=connect, sock_read=read)


def request_headers(
    headers: Iterable[tuple[str, str]] | CIMultiDict[str], *, without: Collection[str] = ()
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, Host, Content-Length and ``without``.

    A value with a control character (tab aside) cannot be sent on: 400 rather than a failure
    deeper down (a header in ``without`` is not sent, so not checked). Copied whole and then
    pruned: a multidict copy is one C call, a filtered rebuild costs a Python step per header."""
    kept: CIMultiDict[str] = CIMultiDict(headers)
    for name in kept.keys() & without if without else ():
        kept.popall(name, None)
    if any(map(_CONTROL.search, kept.values())):
        name = next(name for name, value in kept.items() if _CONTROL.search(value))
        raise ProxyError(400, f"header {name!r} holds a control character", "invalid_header")
    # The names present are found in one call (a case-insensitive set intersection).
    for name in kept.keys() & _hop_by_hop(_NOT_FORWARDED_UP, kept.getall("connection", ())):
        kept.popall(name, None)
    return kept


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's headers minus hop-by-hop ones and Content-Length (Sanic sets its own).
    An answer carries a handful of headers: one pass over them costs half of a multidict's
    copy-and-prune."""
    pairs = list(headers)
    drop = _hop_by_hop(_NOT_RELAYED_DOWN, [value for name, value in pairs if name.lower() == "connection"])
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def _hop_by_hop(always: frozenset[str], connection: Iterable[str]) -> frozenset[str]:
    """The lower-case names not passed on: ``always``, and every header a Connection value names."""
    named = frozenset(token.strip().lower() for value in connection for token in value.split(","))
    return always | named if named else always


def failure(exc: BaseException) -> UpstreamError:
    """Map an aiohttp failure to what the client is told."""
    if isinstance(exc, TimeoutError):
        return UpstreamError(504, "the upstream did not answer in time", "timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(502, "the upstream refused the connection or is unreachable", "connect")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError):
        return UpstreamError(502, "the upstream closed the connection", "disconnected")
    return UpstreamError(502, "the upstream sent an invalid response", "bad_response")


class call:
    """One upstream exchange; connection failures and timeouts, on the way in or while the body
    is read inside the block, become UpstreamError. A class rather than an
    ``asynccontextmanager``: that generator machinery cost more than the rest of this module."""

    __slots__ = ("_request",)

    def __init__(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: CIMultiDict[str] | None = None,
        limits: aiohttp.ClientTimeout,
    ) -> None:
        self._request = session.request(
            method,
            URL(url, encoded=True),
            data=data,
            headers=headers,
            allow_redirects=False,
            timeout=limits,
        )

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            return await self._request.__aenter__()
        except FAILURES as exc:
            raise failure(exc) from None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._request.__aexit__(kind, exc, tb)
        if isinstance(exc, FAILURES):
            raise failure(exc) from None


class BodyReader:
    """The answer's body as it arrives, each read bounded by ``gap``: aiohttp's C parser can wait
    forever on a malformed chunk-size line, and a stream turns aiohttp's own read timer off.

    With ``keepalive`` (seconds), ``read`` also returns None when nothing was relayed to the
    client for that long (the caller sets ``relayed`` after each send), so a stream whose text is
    withheld can send an SSE comment. The read is interrupted and resumed; aiohttp keeps what
    arrived meanwhile in its buffer.

    One timer per body, re-armed only when it fires, rather than an ``asyncio.timeout`` per read:
    a stream makes thousands of reads, and each timer costs a heap push and a cancel. Use it as a
    context manager in the task that reads.
    """

    __slots__ = (
        "_content",
        "_expired",
        "_gap",
        "_keepalive",
        "_loop",
        "_quiet_since",
        "_reading_since",
        "_resumed_since",
        "_task",
        "_tick",
        "_timer",
        "relayed",
    )

    def __init__(self, answer: aiohttp.ClientResponse, gap: float, keepalive: float = 0) -> None:
        self._content = answer.content
        self._gap = gap
        self._keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._reading_since: float | None = None
        self._resumed_since: float | None = None  # a read cut short for a keep-alive began then
        self._quiet_since = self._loop.time()
        self._expired = False
        self._tick = False
        self.relayed = False
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> BodyReader:
        self._timer = self._loop.call_later(min(self._gap, self._keepalive or self._gap), self._check)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        since = self._reading_since
        if since is not None and self._task is not None:
            if now - since >= self._gap:
                self._expired = True
                self._task.cancel()
                return
            if self._keepalive and now - self._quiet_since >= self._keepalive:
                self._tick = True
                self._task.cancel()
                return
        self._arm(now)

    def _arm(self, now: float) -> None:
        deadline = (self._reading_since or now) + self._gap
        if self._keepalive:
            due = self._quiet_since + self._keepalive
            deadline = min(deadline, due if due > now else now + self._keepalive)
        self._timer = self._loop.call_at(deadline, self._check)

    async def read(self) -> bytes | None:
        """What arrived since the last read; ``b""`` at the end of the body; None (only with a
        ``keepalive``) when the client has had nothing for that long."""
        now = self._loop.time()
        self._reading_since, self._resumed_since = self._resumed_since or now, None
        if self.relayed:
            self._quiet_since, self.relayed = now, False
        try:
            return await self._content.readany()
        except asyncio.CancelledError:
            if self._task is not None and (self._expired or self._tick) and self._task.uncancel() == 0:
                if self._expired:
                    raise TimeoutError("no body bytes from the upstream in time") from None
                self._tick = False
                self._resumed_since = self._reading_since  # the gap runs on across keep-alives
                self._quiet_since = self._loop.time()
                self._arm(self._quiet_since)
                return None
            raise
        finally:
            self._reading_since = None

    async def whole(self) -> bytes:
        chunks = []
        while chunk := await self.read():
            chunks.append(chunk)
        return b"".join(chunks)


async def read_whole(answer: aiohttp.ClientResponse, gap: float) -> bytes:
    """The whole body: taken at once when all of it has arrived (a short answer comes with its
    head), without a timer; else read under a BodyReader's."""
    content = answer.content
    if content.is_eof():
        return content.read_nowait()
    with BodyReader(answer, gap) as reader:
        return await reader.whole()
