"""What clients see and what the proxy reports agree: stream outcomes, keep-alives, headers.

Real clients (the openai SDK, sync and async, which end streams differently) and raw sockets
where the bytes on the wire matter, against the proxy as a process and the aiohttp fake.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import Proxy, StartProxy, scrape, total
from tests.fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "hi"}]
KEEPALIVE = b": keep-alive\n\n"


@pytest.fixture(scope="module")
def clients_proxy(start_proxy: StartProxy) -> Proxy:
    return start_proxy(STREAM_KEEPALIVE_SECONDS="0.3")


# --- helpers ------------------------------------------------------------------------------------------


def request_id(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


def raw_post(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    data = orjson.dumps(body)
    head = f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(data) + data


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while piece := sock.recv(65536):
        received += piece
    return received


def exchange_raw(port: int, request: bytes) -> tuple[list[tuple[str, str]], bytes, int]:
    """Send a raw request, read to the close: the header lines, the de-chunked body, the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = read_all(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [
        (name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)
    ]
    if ("transfer-encoding", "chunked") in headers:
        body = dechunk(body)
    return headers, body, int(status_line.split(" ")[1])


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def named(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name]


# --- 1. a stream read to its final event is completed --------------------------------------------------


def test_sync_sdk_stream_read_to_done_is_completed(clients_proxy: Proxy) -> None:
    """The sync SDK closes at [DONE]; the upstream ends its body 1.5 s later: still a 200."""
    before_499 = total(scrape(clients_proxy), "rerouter_requests_total", status_code="499")
    rid = request_id("sync-done")
    client = openai.OpenAI(base_url=clients_proxy.v1, api_key="k", max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model="linger-1500", messages=MESSAGES, stream=True, extra_headers={"x-request-id": rid}
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "reply from linger-1500"
    event = clients_proxy.request_event(rid)
    assert (event["status"], event["outcome"]) == (200, "completed")
    assert total(scrape(clients_proxy), "rerouter_requests_total", status_code="499") == before_499
    assert (
        total(
            scrape(clients_proxy), "rerouter_streams_total", target_model="linger-1500", outcome="completed"
        )
        >= 1
    )


def test_async_sdk_stream_read_to_done_is_completed(clients_proxy: Proxy) -> None:
    rid = request_id("async-done")

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=clients_proxy.v1, api_key="k", max_retries=0, timeout=10)
        stream = await client.completions.create(
            model="linger-300", prompt="x", stream=True, extra_headers={"x-request-id": rid}
        )
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    assert asyncio.run(run()) == "reply from linger-300"
    event = clients_proxy.request_event(rid)
    assert (event["status"], event["outcome"]) == (200, "completed")


@pytest.mark.parametrize("read_to_done", [True, False], ids=["left-after-done", "left-before-done"])
def test_raw_client_leaving_is_completed_only_after_the_final_event(
    clients_proxy: Proxy, read_to_done: bool
) -> None:
    """Leaving after the final event is a completed 200; leaving before it stays a 499."""
    rid = request_id("raw-leave")
    body = {"model": "linger-2000" if read_to_done else "slow-stream", "messages": MESSAGES, "stream": True}
    with socket.create_connection(("127.0.0.1", clients_proxy.port), timeout=10) as sock:
        sock.sendall(raw_post("/v1/chat/completions", body, {"x-request-id": rid}))
        received = b""
        while (b"data: [DONE]\n\n" if read_to_done else b"tick") not in received:
            piece = sock.recv(65536)
            assert piece, "the proxy closed the stream"
            received += piece
    event = clients_proxy.request_event(rid)
    expected = (200, "completed") if read_to_done else (499, "client_disconnected")
    assert (event["status"], event["outcome"]) == expected


def test_a_stream_the_proxy_cuts_at_shutdown_is_not_a_client_disconnect(start_proxy: StartProxy) -> None:
    """SHUTDOWN_TIMEOUT ends a stream that would run 10 s: the proxy's doing, ``proxy_cut``."""
    proxy = start_proxy(SHUTDOWN_GRACE="0", SHUTDOWN_TIMEOUT="1")
    rid = request_id("cut")
    started = threading.Event()

    def stream() -> None:
        body = {"model": "slow-stream", "messages": MESSAGES, "stream": True}
        headers = {"x-request-id": rid}
        try:
            with (
                httpx.Client(timeout=15) as client,
                client.stream("POST", f"{proxy.v1}/chat/completions", json=body, headers=headers) as response,
            ):
                for _ in response.iter_raw():
                    started.set()
        except httpx.HTTPError:
            pass  # cut: expected

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert started.wait(5)
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=20) == 0
    reader.join(5)
    event = proxy.request_event(rid)
    assert (event["status"], event["outcome"]) == (200, "proxy_cut")


# --- 2. keep-alive comments while nothing is relayed -------------------------------------------------------


def test_strip_mode_sends_headers_at_once_and_comments_while_thinking(start_proxy: StartProxy) -> None:
    """The think block takes ~2 s and is withheld: the headers come at once, then comments; the
    rest is byte for byte what the same proxy sends without keep-alives. (Completions: a chat
    stream's first event, the role, is not withheld.)"""
    body = {"model": "qwen3-think-slow", "prompt": "hi", "stream": True}
    quiet = start_proxy(THINK_OUTPUT="strip", STREAM_KEEPALIVE_SECONDS="0")
    lively = start_proxy(THINK_OUTPUT="strip", STREAM_KEEPALIVE_SECONDS="0.3")
    _, expected, _ = exchange_raw(quiet.port, raw_post("/v1/completions", body))
    with socket.create_connection(("127.0.0.1", lively.port), timeout=10) as sock:
        sock.sendall(raw_post("/v1/completions", body))
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(65536)
            assert piece
            head += piece
        assert b"data:" not in head, "the headers waited for the first text"
        received = head + read_all(sock)
    body_bytes = dechunk(received.partition(b"\r\n\r\n")[2])
    assert body_bytes.startswith(KEEPALIVE)
    assert body_bytes.index(KEEPALIVE) < body_bytes.index(b"data:")
    assert body_bytes.replace(KEEPALIVE, b"") == expected
    assert b"<think>" not in expected
    assert b"think about" not in expected
    assert expected.endswith(b"data: [DONE]\n\n")


def test_sync_sdk_reads_a_stream_with_comments(start_proxy: StartProxy) -> None:
    proxy = start_proxy(THINK_OUTPUT="strip", STREAM_KEEPALIVE_SECONDS="0.2")
    client = openai.OpenAI(base_url=proxy.v1, api_key="k", max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="qwen3-think-slow", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "answer 0 from qwen3-think-slow"


def test_comments_go_only_between_events_of_a_relayed_stream(
    clients_proxy: Proxy, upstream: FakeUpstream
) -> None:
    """Paced events 0.8 s apart: comments in the gaps, and without them the upstream's exact bytes."""
    body = {"model": "paced-3x800", "messages": MESSAGES, "stream": True}
    direct = httpx.post(f"{upstream.url}/v1/chat/completions", json=body, timeout=10).content
    _, relayed, status = exchange_raw(clients_proxy.port, raw_post("/v1/chat/completions", body))
    assert status == 200
    assert relayed.count(KEEPALIVE) >= 2
    assert relayed.replace(KEEPALIVE, b"") == direct
    for at in range(len(relayed)):
        if relayed.startswith(KEEPALIVE, at) and at:
            assert relayed[:at].endswith(b"\n\n"), "a comment inside an event"


def test_keepalive_zero_sends_no_comment(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = start_proxy(STREAM_KEEPALIVE_SECONDS="0")
    body = {"model": "paced-2x700", "messages": MESSAGES, "stream": True}
    _, relayed, _ = exchange_raw(proxy.port, raw_post("/v1/chat/completions", body))
    assert KEEPALIVE not in relayed
    assert relayed.endswith(b"data: [DONE]\n\n")


# --- 3. no duplicate headers, no invented Content-Type -----------------------------------------------------


def test_proxy_headers_replace_the_upstreams_on_a_stream(clients_proxy: Proxy) -> None:
    """Behind LiteLLM the upstream sends X-Accel-Buffering and its own X-Request-Id already."""
    answer = {"X-Accel-Buffering": "no", "x-request-id": "from-upstream", "X-Rerouter-Upstream": "spoofed"}
    headers, body, status = exchange_raw(
        clients_proxy.port,
        raw_post(
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            {"X-Fake-Answer-Headers": orjson.dumps(answer).decode(), "x-request-id": "mine"},
        ),
    )
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n")
    assert named(headers, "x-accel-buffering") == ["no"]
    assert named(headers, "x-request-id") == ["mine"]
    assert named(headers, "x-rerouter-upstream") == ["default"]


def test_proxy_headers_replace_the_upstreams_on_a_whole_answer(clients_proxy: Proxy) -> None:
    answer = {"x-request-id": "from-upstream", "x-rerouter-target-model": "spoofed"}
    headers, _, status = exchange_raw(
        clients_proxy.port,
        raw_post(
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": MESSAGES},
            {"X-Fake-Answer-Headers": orjson.dumps(answer).decode(), "x-request-id": "mine"},
        ),
    )
    assert status == 200
    assert named(headers, "x-request-id") == ["mine"]
    assert named(headers, "x-rerouter-target-model") == ["echo-model"]


@pytest.mark.parametrize(
    "model", ["paced-2x10-chunked", "gpt-4o"], ids=["streamed-unknown-length", "whole-with-length"]
)
def test_an_answer_without_content_type_is_relayed_without_one(clients_proxy: Proxy, model: str) -> None:
    remove = orjson.dumps({"Content-Type": None}).decode()
    headers, body, status = exchange_raw(
        clients_proxy.port,
        raw_post(
            "/v1/chat/completions", {"model": model, "messages": MESSAGES}, {"X-Fake-Answer-Headers": remove}
        ),
    )
    assert status == 200
    assert named(headers, "content-type") == []
    assert orjson.loads(body)["choices"]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client
