"""End to end when things go wrong: bad requests, unreachable or failing upstreams, broken
streams, clients that leave. After each, the proxy must still serve the next request."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import httpx2
import openai
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from tests.conftest import Proxy, StartProxy, free_port
from tests.fake_upstream import SLOW_EVENTS, FakeUpstream

TIMEOUT = httpx.Timeout(5.0)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def sdk(proxy: Proxy, timeout: float = 10) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key="sk-faults", max_retries=0, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["message"]
    assert body["error"]["code"] == code
    return body["error"]


def assert_still_serving(proxy: Proxy, upstream: FakeUpstream | None = None) -> None:
    """A normal request right after a failure is answered normally."""
    with httpx.Client(timeout=TIMEOUT) as client:
        if upstream is None:
            assert client.get(f"{proxy.url}/healthz").status_code == 200
            return
        response = client.post(
            f"{proxy.v1}/chat/completions", json={"model": "gpt-3.5-turbo-16k", "messages": MESSAGES}
        )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "reply from qwen3-4b"


# --- bad request bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'{"model": "gpt-4o", "messages": [', b"not json at all", b'{"model": NaN}', b"{}{}"],
    ids=["truncated", "garbage", "nan", "two-objects"],
)
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_invalid_json_is_400(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, endpoint: str, body: bytes
) -> None:
    requests_before = len(upstream.requests)
    response = http.post(f"{proxy.v1}/{endpoint}", content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, "invalid_json")
    assert error["type"] == "invalid_request_error"
    assert len(upstream.requests) == requests_before
    assert_still_serving(proxy, upstream)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"gpt-4o"', b"42", b"null"])
def test_json_that_is_not_an_object_is_400(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, body: bytes
) -> None:
    requests_before = len(upstream.requests)
    response = http.post(
        f"{proxy.v1}/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_json")
    assert len(upstream.requests) == requests_before
    assert_still_serving(proxy, upstream)


def test_invalid_json_on_other_endpoints_is_400(proxy: Proxy, http: httpx.Client) -> None:
    response = http.post(
        f"{proxy.v1}/embeddings", content=b'{"model": "x", ', headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_json")


def test_sdk_raises_bad_request_for_invalid_body(proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(proxy) as client, pytest.raises(openai.BadRequestError) as caught:
        client.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            content=b'{"model": "gpt-4o", "messages": [}',
            options={"headers": {"Content-Type": "application/json"}},
        )
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_json"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.response.headers["x-request-id"]
    assert_still_serving(proxy, upstream)


# --- upstream unreachable -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_upstream_proxy(start_proxy: StartProxy) -> Proxy:
    """UPSTREAM_URL at a loopback port nobody listens on."""
    return start_proxy(UPSTREAM_URL=f"http://127.0.0.1:{free_port()}")


def test_upstream_refused_is_502(dead_upstream_proxy: Proxy, http: httpx.Client) -> None:
    response = http.post(
        f"{dead_upstream_proxy.v1}/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"X-Request-ID": "refused-1"},
    )
    error = assert_openai_error(response, 502, "upstream_connect")
    assert error["type"] == "upstream_error"
    assert response.headers["x-request-id"] == "refused-1"

    listing = http.get(f"{dead_upstream_proxy.v1}/models")
    assert_openai_error(listing, 502, "upstream_connect")
    assert_still_serving(dead_upstream_proxy)


def test_sdk_upstream_refused_raises_status_502(dead_upstream_proxy: Proxy) -> None:
    with sdk(dead_upstream_proxy) as client, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_connect"

    async def run() -> int:
        async with openai.AsyncOpenAI(
            base_url=dead_upstream_proxy.v1, api_key="k", max_retries=0, timeout=10
        ) as client:
            try:
                await client.embeddings.create(model="text-embedding-3-small", input="x")
            except openai.APIStatusError as exc:
                return exc.status_code
        return 0

    assert asyncio.run(run()) == 502


def test_readyz_503_when_upstream_down(dead_upstream_proxy: Proxy, http: httpx.Client) -> None:
    response = http.get(f"{dead_upstream_proxy.url}/readyz")
    error = assert_openai_error(response, 503, "upstream_unavailable")
    assert error["type"] == "service_unavailable"
    health = http.get(f"{dead_upstream_proxy.url}/healthz")
    assert health.status_code == 200  # liveness does not depend on the upstream


# --- upstream timeout ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_proxy(start_proxy: StartProxy) -> Proxy:
    return start_proxy(UPSTREAM_READ_TIMEOUT="0.5")


def test_upstream_timeout_is_504(impatient_proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.post(f"{impatient_proxy.v1}/chat/completions", json={"model": "gpt-hang", "messages": []})
    elapsed = time.monotonic() - started
    error = assert_openai_error(response, 504, "upstream_timeout")
    assert error["type"] == "upstream_timeout"
    assert 0.4 < elapsed < 3
    assert upstream.last("/v1/chat/completions").json()["model"] == "hang"
    assert_still_serving(impatient_proxy, upstream)


def test_sdk_upstream_timeout_raises_status_504(impatient_proxy: Proxy) -> None:
    with sdk(impatient_proxy) as client, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-hang", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"


# --- upstream error statuses --------------------------------------------------------------------------


def test_upstream_429_relayed_verbatim(proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    via_proxy = http.post(f"{proxy.v1}/chat/completions", json={"model": "gpt-ratelimited", "messages": []})
    direct = http.post(f"{upstream.url}/v1/chat/completions", json={"model": "status-429", "messages": []})
    assert via_proxy.status_code == 429
    assert via_proxy.headers["retry-after"] == "7"
    assert via_proxy.content == direct.content
    assert via_proxy.headers["content-type"] == direct.headers["content-type"]
    assert via_proxy.json()["error"]["message"] == "the fake upstream was told to fail"
    assert_still_serving(proxy, upstream)


def test_sdk_sees_429_and_503(proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(proxy) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="gpt-ratelimited", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError) as down:
            client.completions.create(model="gpt-down", prompt="x", stream=True)
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.code == "429"
    assert down.value.status_code == 503
    assert down.value.type == "fake_error"
    assert down.value.message.endswith("the fake upstream was told to fail")
    assert_still_serving(proxy, upstream)


def test_upstream_503_relayed(proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    response = http.post(f"{proxy.v1}/completions", json={"model": "gpt-down", "prompt": "x"})
    assert response.status_code == 503
    assert response.json() == {
        "error": {"message": "the fake upstream was told to fail", "type": "fake_error", "code": "503"}
    }
    assert_still_serving(proxy, upstream)


# --- upstream dies mid-stream -------------------------------------------------------------------------


def _drain(stream: openai.Stream[ChatCompletionChunk], pieces: list[str]) -> None:
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")


def test_sdk_stream_raises_when_upstream_dies(proxy: Proxy, upstream: FakeUpstream) -> None:
    pieces: list[str] = []
    with sdk(proxy) as client:
        stream = client.chat.completions.create(model="gpt-broken", messages=MESSAGES, stream=True)
        with stream, pytest.raises(openai.APIConnectionError) as caught:
            _drain(stream, pieces)
    # a truncated body, not a clean end: the SDK does not mistake it for a finished answer
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert pieces == ["reply", " from"]
    assert upstream.last("/v1/chat/completions").json()["model"] == "die-mid-stream"
    assert_still_serving(proxy, upstream)


async def _adrain(stream: openai.AsyncStream[Completion], pieces: list[str]) -> None:
    async for chunk in stream:
        pieces.append(chunk.choices[0].text)


def test_async_sdk_stream_raises_when_upstream_dies(proxy: Proxy, upstream: FakeUpstream) -> None:
    async def run() -> tuple[list[str], BaseException | None]:
        pieces: list[str] = []
        async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="k", max_retries=0, timeout=10) as client:
            stream = await client.completions.create(model="gpt-broken", prompt="x", stream=True)
            async with stream:
                with pytest.raises(openai.APIConnectionError) as caught:
                    await _adrain(stream, pieces)
        return pieces, caught.value.__cause__

    pieces, cause = asyncio.run(run())
    assert pieces == ["reply", " from"]
    assert isinstance(cause, httpx2.RemoteProtocolError)
    assert_still_serving(proxy, upstream)


def _read_all(response: httpx.Response, received: list[bytes]) -> None:
    for chunk in response.iter_raw():
        received.append(chunk)


def test_raw_stream_ends_without_terminator_when_upstream_dies(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    body = {"model": "gpt-broken", "stream": True, "messages": MESSAGES}
    with http.stream("POST", f"{proxy.v1}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        received: list[bytes] = []
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            _read_all(response, received)
    assert b"".join(received).count(b"data: ") == 2
    assert b"[DONE]" not in b"".join(received)

    # the same on the wire: the connection closes with no zero-length chunk
    raw = orjson.dumps(body)
    port = proxy.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(raw) + raw
        )
        wire = b""
        while chunk := sock.recv(65536):  # ends only because the proxy closes the connection
            wire += chunk
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in wire.lower()
    assert wire.count(b"data: ") == 2
    assert not wire.endswith(b"0\r\n\r\n")
    assert_still_serving(proxy, upstream)


# --- the client leaves mid-stream -----------------------------------------------------------------------


def test_client_disconnect_reaches_upstream(proxy: Proxy, upstream: FakeUpstream) -> None:
    body = orjson.dumps({"model": "gpt-slow", "stream": True, "messages": MESSAGES})
    port = proxy.port
    disconnects_before = len(upstream.disconnects)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        received = b""
        while received.count(b"data: ") < 2:
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the stream early"
            received += chunk
    finally:
        sock.close()
    closed_at = time.monotonic()
    assert b'"model":"slow-stream"' in received

    deadline = closed_at + 3
    while len(upstream.disconnects) == disconnects_before and time.monotonic() < deadline:
        time.sleep(0.002)
    assert len(upstream.disconnects) == disconnects_before + 1, "the upstream never saw the client leave"
    delay = upstream.disconnects[-1] - closed_at
    events_sent = upstream.slow_events_sent[-1]
    print(f"\nclient disconnect reached the upstream after {delay * 1000:.1f} ms; {events_sent} events sent")
    assert delay < 1.0
    assert events_sent < SLOW_EVENTS // 10
    assert_still_serving(proxy, upstream)


def test_sdk_client_closing_a_stream_reaches_upstream(proxy: Proxy, upstream: FakeUpstream) -> None:
    disconnects_before = len(upstream.disconnects)
    with sdk(proxy) as client:
        stream = client.chat.completions.create(model="gpt-slow", messages=MESSAGES, stream=True)
        with stream:
            first = next(iter(stream))
        closed_at = time.monotonic()
    assert first.model == "slow-stream"
    deadline = closed_at + 3
    while len(upstream.disconnects) == disconnects_before and time.monotonic() < deadline:
        time.sleep(0.002)
    assert len(upstream.disconnects) == disconnects_before + 1
    assert upstream.disconnects[-1] - closed_at < 1.0
    assert upstream.slow_events_sent[-1] < SLOW_EVENTS // 10
