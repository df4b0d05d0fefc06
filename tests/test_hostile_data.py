"""Hostile data against real proxy processes: state shared between clients, ids that cannot be
labels, unbounded ids, bodies the upstream may read otherwise than the proxy, credentials in the
settings, and upstream events too large to hold.

The upstream is this module's own aiohttp server, reached by host name (``localhost``): aiohttp's
cookie jar refuses IP hosts, so only a name shows whether the proxy's session keeps cookies. It
records every request, sets a cookie on ``/v1/session`` and streams one huge event for
``huge-<bytes>`` models.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, Samples, StartProxy, eventually, pick, scrape
from tests.fake_upstream import Seen
from tests.test_cli import run
from tests.test_security import send_raw

UPSTREAM_KEY = "sk-upstream-9f8e7d"
CLIENT_SECRET = "sk-client-anthropic-1a2b3c"
COOKIE = "sid=client-a-session-4711"
LIMIT = 64  # MAX_MODEL_ID_LENGTH of the proxy under test
EVENT_LIMIT = 4096  # its MAX_SSE_EVENT_BYTES
MAP = {
    "gpt-3.5-turbo-16k": "qwen3-4b",
    "text-embedding-3-small": "bge-m3",
    "gpt-huge": "huge-65536",
    "gpt-small": "huge-100",
    "/long-(.*)/": "\\1\\1\\1",  # a target three times as long as what the client sent
}
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Upstream:
    """A model server on a loopback port, in a thread of its own."""

    port: int = 0
    requests: list[Seen] = field(default_factory=list)

    @property
    def by_name(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        threading.Thread(target=loop.run_forever, name="hostile-upstream", daemon=True).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        if request.path == "/v1/session":
            return web.json_response({"ok": True}, headers={"Set-Cookie": f"{COOKIE}; Path=/"})
        parsed = orjson.loads(body) if body.startswith(b"{") else {}
        model = str(parsed.get("model"))
        if request.path == "/v1/chat/completions" and model.startswith("huge-") and parsed.get("stream"):
            return await _huge_stream(request, model, int(model.removeprefix("huge-")))
        return web.json_response({"model": model, "object": "echo", "choices": []})


def _chunk(model: str, text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return b"data: " + orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
    )


async def _huge_stream(request: web.Request, model: str, size: int) -> web.StreamResponse:
    """A small event, one event of ``size`` bytes of text sent in 1 KiB pieces, a small event."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, "first") + b"\n\n")
    big = _chunk(model, "x" * size) + b"\n\n"
    for start in range(0, len(big), 1024):
        await response.write(big[start : start + 1024])
    await response.write(_chunk(model, "last") + b"\n\ndata: [DONE]\n\n")
    return response


@pytest.fixture(scope="module")
def server() -> Upstream:
    upstream = Upstream()
    upstream.start()
    return upstream


@pytest.fixture(scope="module")
def proxy(start_proxy: StartProxy, server: Upstream) -> Iterator[Proxy]:
    started = start_proxy(
        UPSTREAM_URL=server.by_name,
        MODEL_MAP=json.dumps(MAP),
        UPSTREAM_API_KEY=UPSTREAM_KEY,
        MAX_MODEL_ID_LENGTH=str(LIMIT),
        MAX_SSE_EVENT_BYTES=str(EVENT_LIMIT),
        RESPONSE_MODEL="requested",
    )
    yield started
    started.stop()


def new_since(server: Upstream, mark: int) -> list[Seen]:
    return server.requests[mark:]


def post(
    proxy: Proxy, path: str, body: bytes, content_type: str = "application/json", **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{proxy.v1}/{path}", content=body, headers={"content-type": content_type, **headers}, timeout=15
    )


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def request_events(proxy: Proxy) -> list[dict[str, Any]]:
    return [event for event in proxy.log_events() if event.get("event") == "request"]


# --- 1. no state crosses clients ------------------------------------------------------------------


def test_a_cookie_set_for_one_client_never_reaches_the_upstream_with_another(
    proxy: Proxy, server: Upstream
) -> None:
    first = httpx.get(f"{proxy.v1}/session", timeout=10)
    assert first.status_code == 200
    assert first.headers["set-cookie"].startswith(COOKIE), "the client it was meant for still gets it"
    mark = len(server.requests)
    for method, path in (("GET", "/v1/session"), ("GET", "/v1/files"), ("POST", "/v1/embeddings")):
        with httpx.Client(timeout=10) as other:  # another client, its own connection, no cookie
            body = {"model": "text-embedding-3-small", "input": "x"} if method == "POST" else None
            assert other.request(method, proxy.url + path, json=body).status_code == 200
    seen = new_since(server, mark)
    assert len(seen) == 3
    assert [s.headers.get("Cookie") for s in seen] == [None, None, None]


# --- 2. ids that cannot be labels ---------------------------------------------------------------


def test_a_lone_surrogate_model_is_refused_and_metrics_stay_up(proxy: Proxy, server: Upstream) -> None:
    mark = len(server.requests)
    for path in ("chat/completions", "embeddings", "responses"):
        answer = post(proxy, path, b'{"model": "\\ud800", "messages": [], "input": "x"}')
        assert_error(answer, 400, "invalid_json")
        assert answer.headers["x-request-id"]
    assert new_since(server, mark) == [], "nothing is forwarded"
    assert (
        post(
            proxy, "chat/completions", orjson.dumps({"model": "gpt-3.5-turbo-16k", "messages": HI})
        ).status_code
        == 200
    )
    assert pick(scrape(proxy), "rerouter_requests_total", status_code="400")

    def logged() -> None:
        refused = [e for e in request_events(proxy) if e["status"] == 400 and e["endpoint"] == "responses"]
        assert refused, "the log event is written"

    eventually(logged, 10)
    assert "Traceback" not in proxy.log_path.read_text(errors="replace")


# --- 3. ids bounded in length -------------------------------------------------------------------


def test_an_id_over_max_model_id_length_is_refused_before_anything_is_forwarded(
    proxy: Proxy, server: Upstream
) -> None:
    mark = len(server.requests)
    for size in (LIMIT + 1, 100_000):
        body = orjson.dumps({"model": "m" * size, "messages": HI})
        answer = post(proxy, "chat/completions", body)
        assert_error(answer, 400, "invalid_model")
        assert len(answer.headers.get("x-rerouter-target-model", "")) <= LIMIT
        form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + b"m" * size + b"\r\n--b--\r\n"
        assert_error(
            post(proxy, "audio/transcriptions", form, "multipart/form-data; boundary=b"), 400, "invalid_model"
        )
    assert_error(httpx.get(f"{proxy.v1}/models/{'m' * (LIMIT + 1)}", timeout=10), 400, "invalid_model")
    assert new_since(server, mark) == []
    assert post(proxy, "embeddings", orjson.dumps({"model": "m" * LIMIT, "input": "x"})).status_code == 200


def test_a_long_served_id_is_other_in_metrics_absent_from_headers_and_cut_in_logs(
    proxy: Proxy, server: Upstream
) -> None:
    """MODEL_MAP can make a target longer than any id a client may send: it is bounded too."""
    source = "long-" + "a" * (LIMIT - 5)
    mark = len(server.requests)
    answer = post(proxy, "embeddings", orjson.dumps({"model": source, "input": "x"}))
    assert answer.status_code == 200
    target = "a" * (LIMIT - 5) * 3
    (seen,) = new_since(server, mark)
    assert orjson.loads(seen.body)["model"] == target, "the upstream got the mapped id"
    assert "x-rerouter-target-model" not in answer.headers
    assert answer.headers["x-rerouter-upstream"] == "default"

    def booked() -> Samples:
        samples = scrape(proxy)
        assert [
            labels
            for name, labels, _ in samples
            if name == "rerouter_requests_total" and labels["source_model"] == source
        ] == [
            {"endpoint": "embeddings", "source_model": source, "target_model": "other", "status_code": "200"}
        ]
        return samples

    samples = eventually(booked, 10)
    assert all(len(value) <= LIMIT for _, labels, _ in samples for value in labels.values())
    (event,) = [e for e in request_events(proxy) if e.get("source_model") == source]
    assert event["target_model"] == target[:LIMIT] + f"...[{len(target)} chars]"


# --- 9. one parse decides -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "model"),
    [
        (
            "chat/completions",
            b'{"model": "gpt-4o", "model": "gpt-3.5-turbo-16k", "messages": []}',
            "qwen3-4b",
        ),
        (
            "chat/completions",
            b'{"model": "qwen3-4b", "max_tokens": 5, "messages": [], "max_tokens": 9}',
            "qwen3-4b",
        ),
        ("embeddings", b'{"model": "text-embedding-3-small", "input": "x", "model": "other"}', "other"),
    ],
)
def test_a_key_named_twice_reaches_the_upstream_as_the_proxy_read_it(
    proxy: Proxy, server: Upstream, path: str, body: bytes, model: str
) -> None:
    """Routed by the last ``model`` (as the proxy's parser reads it), and the upstream gets that
    one alone: it cannot pick the other."""
    for content_type in ("application/json", "text/plain"):
        mark = len(server.requests)
        answer = post(proxy, path, body, content_type)
        assert answer.status_code == 200, answer.text
        (seen,) = new_since(server, mark)
        assert seen.body.count(b'"model"') == 1
        assert orjson.loads(seen.body)["model"] == model
        assert seen.body.count(b"max_tokens") <= 1
        if b"max_tokens" in body:
            assert orjson.loads(seen.body)["max_tokens"] == 9


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", ""])
@pytest.mark.parametrize("path", ["chat/completions", "embeddings"])
def test_a_json_body_under_another_content_type_is_mapped_as_the_upstream_will_read_it(
    proxy: Proxy, server: Upstream, content_type: str, path: str
) -> None:
    model, served = (
        ("gpt-3.5-turbo-16k", "qwen3-4b")
        if path == "chat/completions"
        else ("text-embedding-3-small", "bge-m3")
    )
    body = b'{"model": "' + model.encode() + b'", "messages": [], "input": "x"}'
    mark = len(server.requests)
    answer = post(proxy, path, body, content_type)
    assert answer.status_code == 200, answer.text
    (seen,) = new_since(server, mark)
    assert orjson.loads(seen.body)["model"] == served


def test_two_content_types_or_a_compressed_body_are_refused(proxy: Proxy, server: Upstream) -> None:
    body = b'{"model": "text-embedding-3-small", "input": "x"}'
    mark = len(server.requests)
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    status, reply = send_raw(proxy, head, body)
    assert status == 400, reply[:200]
    assert b'"invalid_header"' in reply
    compressed = post(proxy, "embeddings", gzip.compress(body), **{"content-encoding": "gzip"})
    assert_error(compressed, 415, "unsupported_content_encoding")
    assert new_since(server, mark) == []


# --- 10. credentials ------------------------------------------------------------------------------


def test_x_api_key_is_replaced_like_the_other_credential_headers(proxy: Proxy, server: Upstream) -> None:
    mark = len(server.requests)
    body = orjson.dumps({"model": "gpt-3.5-turbo-16k", "messages": HI})
    answer = post(
        proxy, "chat/completions", body, **{"x-api-key": CLIENT_SECRET, "anthropic-version": "2023-06-01"}
    )
    assert answer.status_code == 200
    (seen,) = new_since(server, mark)
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_SECRET not in " ".join(f"{k}: {v}" for k, v in seen.headers.items())
    assert seen.headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize(
    ("env", "setting", "secret"),
    [
        (
            {"UPSTREAM_URL": "http://127.0.0.1:9", "UPSTREAM_API_KEY": "sk-top\nsecret-1"},
            "UPSTREAM_API_KEY",
            "secret-1",
        ),
        (
            {"UPSTREAM_URL": "http://127.0.0.1:9", "UPSTREAM_API_KEY": "sk-\x7fsecret-2"},
            "UPSTREAM_API_KEY",
            "secret-2",
        ),
        ({"UPSTREAM_URL": "http://admin:hunter2-secret-3@127.0.0.1:9/v1"}, "UPSTREAM_URL", "secret-3"),
        ({"UPSTREAM_URL": "admin:hunter2-secret-4@127.0.0.1:9"}, "UPSTREAM_URL", "secret-4"),
        (
            {"UPSTREAM_URL": "http://127.0.0.1:9", "UPSTREAMS": '{"b": "https://u:secret-5@b.example"}'},
            "UPSTREAMS",
            "secret-5",
        ),
        (
            {
                "UPSTREAM_URL": "http://127.0.0.1:9",
                "UPSTREAMS": '{"b": {"urls": ["http://b"], "api_key": "k\\r\\nsecret-6"}}',
            },
            "UPSTREAMS",
            "secret-6",
        ),
    ],
)
def test_bad_credentials_fail_at_start_naming_the_setting_never_the_secret(
    env: dict[str, str], setting: str, secret: str
) -> None:
    result = run("check", **env)
    assert result.code == 2, result.out + result.err
    assert result.err.startswith(f"openai-model-rerouter: {setting}"), result.err
    assert secret not in result.out + result.err


# --- 11. bounded buffers --------------------------------------------------------------------------


def stream_chat(proxy: Proxy, model: str) -> bytes:
    body = {"model": model, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{proxy.v1}/chat/completions", json=body, timeout=30) as answer:
        assert answer.status_code == 200
        return answer.read()


def test_an_event_over_max_sse_event_bytes_is_relayed_as_it_came_with_a_warning(proxy: Proxy) -> None:
    small = stream_chat(proxy, "gpt-small")
    assert small.count(b'"model":"gpt-small"') == 3, "under the limit every event is renamed"
    data = stream_chat(proxy, "gpt-huge")
    events = data.split(b"\n\n")
    assert b'"model":"gpt-huge"' in events[0], "the event before the big one is still renamed"
    assert events[1] == _chunk("huge-65536", "x" * 65536), "the big one is relayed byte for byte"
    assert events[2] == _chunk("huge-65536", "last"), "and so is the rest"
    assert data.endswith(b"data: [DONE]\n\n")

    def warned() -> None:
        assert [e for e in proxy.log_events() if e["event"].startswith("stream event larger")]

    eventually(warned, 10)
