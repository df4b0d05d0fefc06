"""End to end at the HTTP level: raw bytes, headers, paths, the models listing, health.

The client here is plain httpx (or a raw socket where the framing itself matters), so the
checks see exactly what went over the wire between client, proxy and fake upstream.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import openai
import orjson
import pytest

from tests.conftest import DEFAULT_MAP, Proxy, StartProxy
from tests.fake_upstream import MODELS, FakeUpstream

TIMEOUT = httpx.Timeout(5.0)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def lower_keys(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["code"] == code
    return error


# --- streaming: bytes, headers, incremental delivery -------------------------------------------------


def _raw_stream(client: httpx.Client, url: str, body: dict[str, object]) -> tuple[httpx.Headers, bytes]:
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        return response.headers, b"".join(response.iter_raw())


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_stream_bytes_identical_to_upstream(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, endpoint: str
) -> None:
    body: dict[str, object] = {
        "model": "plain-local-model",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat/completions" else {})
    body.update({"prompt": "hi"} if endpoint == "completions" else {})

    via_proxy_headers, via_proxy = _raw_stream(http, f"{proxy.v1}/{endpoint}", body)
    direct_headers, direct = _raw_stream(http, f"{upstream.url}/v1/{endpoint}", body)

    assert via_proxy == direct
    events = via_proxy.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    usage = orjson.loads(events[-3].removeprefix(b"data: "))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert via_proxy_headers["content-type"] == "text/event-stream"
    assert via_proxy_headers["x-accel-buffering"] == "no"
    assert "x-accel-buffering" not in direct_headers  # the proxy adds it
    assert "content-length" not in via_proxy_headers


def test_stream_of_mapped_model_is_the_targets_stream(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    """The rewrite touches the request only: the answer is byte for byte the target's."""
    messages = [{"role": "user", "content": "hi"}]
    _, via_proxy = _raw_stream(
        http, f"{proxy.v1}/chat/completions", {"model": "llama-13b", "stream": True, "messages": messages}
    )
    _, direct = _raw_stream(
        http,
        f"{upstream.url}/v1/chat/completions",
        {"model": "llama-13-served", "stream": True, "messages": messages},
    )
    assert via_proxy == direct
    assert b'"model":"llama-13-served"' in via_proxy


def test_stream_delivered_incrementally(proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    """slow-stream sends an event per 50 ms for 10 s: events must arrive as they are made."""
    body = {"model": "gpt-slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    disconnects_before = len(upstream.disconnects)
    arrivals: list[float] = []
    started = time.monotonic()
    with http.stream("POST", f"{proxy.v1}/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        buffered = b""
        for chunk in response.iter_raw():
            buffered += chunk
            while b"\n\n" in buffered:
                event, buffered = buffered.split(b"\n\n", 1)
                assert event.startswith(b"data: ")
                assert b'"model":"slow-stream"' in event
                arrivals.append(time.monotonic() - started)
            if len(arrivals) >= 4:
                break
    assert arrivals[0] < 1.0, f"first event after {arrivals[0]:.3f} s"
    # events trickle in about 50 ms apart rather than as one batch
    assert arrivals[3] - arrivals[0] >= 0.1
    assert arrivals[3] < 2.0
    deadline = time.monotonic() + 2
    while len(upstream.disconnects) == disconnects_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(upstream.disconnects) == disconnects_before + 1
    assert upstream.slow_events_sent[-1] < 60


def _read_http_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stream_framing_on_the_wire(proxy: Proxy) -> None:
    """A raw socket: chunked framing ending in the zero-length terminator, SSE inside."""
    body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    port = proxy.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        raw = _read_http_response(sock)
    head, _, framed = raw.partition(b"\r\n\r\n")
    head_lines = head.lower().split(b"\r\n")
    assert head_lines[0] == b"http/1.1 200 ok"
    assert b"transfer-encoding: chunked" in head_lines
    assert b"content-type: text/event-stream" in head_lines
    assert framed.endswith(b"\r\n0\r\n\r\n")
    # undo the chunking by hand
    payload = b""
    while True:
        size_line, _, framed = framed.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        payload += framed[:size]
        assert framed[size : size + 2] == b"\r\n"
        framed = framed[size + 2 :]
    assert payload.endswith(
        b'"model":"echo-model","choices":[{"index":0,"delta":{"content":" echo-model"},'
        b'"finish_reason":null}]}\n\ndata: [DONE]\n\n'
    )


# --- request bodies: untouched when nothing changes ---------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "embeddings"])
def test_untouched_body_forwarded_byte_for_byte(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, endpoint: str
) -> None:
    body = (
        b'{ "temperature" :0.50,\n\t"messages":[ {"content":"caf\\u00e9 \xe2\x98\x95","role" : "user"} ],'
        b'  "prompt": "x",  "model" : "unmapped-model" , "max_tokens":1e1 ,"seed": 12345678901234567890123}  '
    )
    response = http.post(
        f"{proxy.v1}/{endpoint}", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200
    seen = upstream.last(f"/v1/{endpoint}")
    assert seen.body == body
    assert int(lower_keys(seen.headers)["content-length"]) == len(body)


def test_rewritten_body_changes_only_the_model(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    body = (
        b'{"z": [1, 2.5, "\\u2603"], "model":"gpt-3.5-turbo-16k", '
        b'"a": {"b": null, "c": true}, "messages": []}'
    )
    response = http.post(
        f"{proxy.v1}/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["model"] == "qwen3-4b"
    sent = orjson.loads(upstream.last("/v1/chat/completions").body)
    assert sent == {**orjson.loads(body), "model": "qwen3-4b"}
    assert list(sent) == ["z", "model", "a", "messages"]  # key order kept


# --- /v1/models ---------------------------------------------------------------------------------------

EXACT_ALIASES = [key for key in DEFAULT_MAP if not key.startswith("/")]


def test_models_list_adds_exact_aliases_once(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    response = http.get(f"{proxy.v1}/models", headers={"Authorization": "Bearer sk-list"})
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    ids = [entry["id"] for entry in listing["data"]]
    assert ids == MODELS + EXACT_ALIASES
    assert len(ids) == len(set(ids))
    alias_entry = listing["data"][len(MODELS)]
    assert alias_entry == {
        "id": "gpt-3.5-turbo-16k",
        "object": "model",
        "created": 0,
        "owned_by": "openai-model-rerouter",
    }
    assert listing["data"][0] == {"id": "echo-model", "object": "model", "created": 1, "owned_by": "fake"}
    assert lower_keys(upstream.last("/v1/models").headers)["authorization"] == "Bearer sk-list"


@pytest.fixture(scope="module")
def alias_proxy(start_proxy: StartProxy, upstream: FakeUpstream) -> Proxy:
    """UPSTREAM_URL ending in /v1, and a map whose exact keys include upstream model ids."""
    model_map = {
        "qwen3-4b": "echo-model",
        "Qwen/Qwen3-4B": "qwen3-4b",
        "my-alias": "qwen3-4b",
        "org/alias": "Qwen/Qwen3-4B",
        "/re-.*/": "echo-model",
    }
    return start_proxy(UPSTREAM_URL=upstream.url + "/v1", MODEL_MAP=orjson.dumps(model_map).decode())


def test_models_list_does_not_repeat_an_alias_the_upstream_lists(
    alias_proxy: Proxy, http: httpx.Client
) -> None:
    response = http.get(f"{alias_proxy.v1}/models")
    assert response.status_code == 200
    ids = [entry["id"] for entry in response.json()["data"]]
    assert ids == [*MODELS, "my-alias", "org/alias"]


def test_alias_shadowing_an_upstream_id_routes_to_its_target(
    alias_proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    response = http.post(f"{alias_proxy.v1}/chat/completions", json={"model": "qwen3-4b", "messages": []})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "reply from echo-model"
    assert upstream.last("/v1/chat/completions").json()["model"] == "echo-model"


@pytest.mark.parametrize("path", ["org/alias", "org%2Falias"])
def test_models_retrieve_alias_with_slash(alias_proxy: Proxy, http: httpx.Client, path: str) -> None:
    """``org%2Falias`` is how the openai SDK sends ``models.retrieve("org/alias")``."""
    response = http.get(f"{alias_proxy.v1}/models/{path}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "org/alias", "object": "model", "created": 1, "owned_by": "fake"}


def test_sdk_models_retrieve_alias_with_slash(alias_proxy: Proxy) -> None:
    with openai.OpenAI(base_url=alias_proxy.v1, api_key="sk-x", max_retries=0, timeout=5) as client:
        model = client.models.retrieve("org/alias")
    assert model.id == "org/alias"
    assert model.owned_by == "fake"


def test_models_retrieve(proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    alias = http.get(f"{proxy.v1}/models/gpt-3.5-turbo-16k")
    assert alias.status_code == 200
    assert alias.json() == {"id": "gpt-3.5-turbo-16k", "object": "model", "created": 1, "owned_by": "fake"}
    assert alias.headers["x-request-id"]

    direct = http.get(f"{proxy.v1}/models/Qwen/Qwen3-4B")
    assert direct.status_code == 200
    assert direct.json()["id"] == "Qwen/Qwen3-4B"
    assert upstream.last().path == "/v1/models/Qwen/Qwen3-4B"

    # an unmapped id the upstream does not know: the upstream's own 404 comes back as it was
    unknown = http.get(f"{proxy.v1}/models/no-such-model")
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": {"message": "model no-such-model not found", "type": "fake_error", "code": "404"}
    }
    assert upstream.last().path == "/v1/models/no-such-model"

    missing = http.get(f"{proxy.v1}/models/gpt-missing")
    error = assert_openai_error(missing, 404, "model_not_found")
    assert error["type"] == "not_found_error"
    assert "not-listed-anywhere" in error["message"]


# --- other /v1 endpoints, methods, paths --------------------------------------------------------------


def test_rerank_model_rewritten(proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    body = {"model": "llama-8b", "query": "capital of France?", "documents": ["Paris", "Berlin"], "top_n": 1}
    response = http.post(f"{proxy.v1}/rerank", json=body)
    assert response.status_code == 200
    sent = upstream.last("/v1/rerank")
    assert sent.json() == {**body, "model": "llama-8-served"}
    assert response.json() == {
        "path": "/v1/rerank",
        "method": "POST",
        "model": "llama-8-served",
        "bytes": len(sent.body),
    }


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_method_path_and_query_forwarded_intact(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, method: str
) -> None:
    target = "/v1/files/file-abc%2Fdef/content?purpose=fine-tune&after=a%20b&tag=x&tag=y&plus=1+2&empty="
    content = b'{"model": "gpt-4o", "keep": 1}' if method in ("PUT", "PATCH") else None
    response = http.request(
        method, proxy.url + target, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == method
    assert echoed["path"] == target
    seen = upstream.last()
    assert (seen.method, seen.path) == (method, target)
    if content is not None:
        assert seen.json() == {"model": "echo-model", "keep": 1}
    else:
        assert seen.body == b""


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/models"), ("POST", "/v2/chat/completions"), ("POST", "/chat/completions")],
)
def test_paths_outside_v1_are_404_in_openai_shape(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, method: str, path: str
) -> None:
    requests_before = len(upstream.requests)
    response = http.request(method, proxy.url + path, json={"model": "gpt-4o"})
    error = assert_openai_error(response, 404, "not_found")
    assert error["type"] == "not_found_error"
    assert len(upstream.requests) == requests_before  # nothing forwarded


def test_multipart_only_the_model_value_changes(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    """A hand-made form, model field after the file: the upstream gets the same bytes but
    for the model's value."""
    boundary = b"----e2eBoundary7MA4YWxk"
    audio = bytes(range(256)) * 3 + b"\r\n\r\n--\xff\xfe\x00model\r\n"

    def form(model: bytes) -> bytes:
        return (
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="clip.mp3"\r\n'
            b"Content-Type: audio/mpeg\r\n\r\n" + audio + b"\r\n"
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="model"\r\n\r\n' + model + b"\r\n"
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="response_format"\r\n\r\njson\r\n'
            b"--" + boundary + b"--\r\n"
        )

    content_type = "multipart/form-data; boundary=" + boundary.decode()
    response = http.post(
        f"{proxy.v1}/audio/translations", content=form(b"whisper-1"), headers={"Content-Type": content_type}
    )
    assert response.status_code == 200
    seen = upstream.last("/v1/audio/translations")
    assert seen.body == form(b"whisper-large-v3")
    assert lower_keys(seen.headers)["content-type"] == content_type
    assert response.json()["bytes"] == len(form(b"whisper-large-v3"))

    # an unmapped model: the form is forwarded exactly as sent
    http.post(
        f"{proxy.v1}/audio/translations", content=form(b"my-whisper"), headers={"Content-Type": content_type}
    )
    assert upstream.last("/v1/audio/translations").body == form(b"my-whisper")


# --- headers -------------------------------------------------------------------------------------------


def test_headers_forwarded_and_hop_by_hop_dropped(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    response = http.post(
        f"{proxy.v1}/moderations",
        json={"model": "omni-moderation-latest", "input": "x"},
        headers={
            "Host": "proxy.example.com:8443",
            "Authorization": "Bearer sk-secret-123",
            "OpenAI-Organization": "org-42",
            "X-Custom-Thing": "some value; with=params",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "hop",
            "Keep-Alive": "timeout=5, max=100",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Upgrade": "h2c",
        },
    )
    assert response.status_code == 200
    got = lower_keys(upstream.last("/v1/moderations").headers)
    assert got["authorization"] == "Bearer sk-secret-123"
    assert got["openai-organization"] == "org-42"
    assert got["x-custom-thing"] == "some value; with=params"
    assert got["content-type"] == "application/json"
    for name in ("x-drop-me", "keep-alive", "te", "trailer", "proxy-authorization", "upgrade"):
        assert name not in got, name
    assert "x-drop-me" not in got.get("connection", "").lower()
    assert got["host"] == urlsplit(upstream.url).netloc
    # the upstream's own response headers come back
    assert response.headers["x-upstream-echo"] == "yes"
    assert response.headers["content-type"] == "application/json; charset=utf-8"


def test_request_id_honoured_and_forwarded(proxy: Proxy, upstream: FakeUpstream, http: httpx.Client) -> None:
    given = http.post(
        f"{proxy.v1}/embeddings", json={"model": "m", "input": "x"}, headers={"X-Request-ID": "trace-abc.123"}
    )
    assert given.headers["x-request-id"] == "trace-abc.123"
    assert lower_keys(upstream.last("/v1/embeddings").headers)["x-request-id"] == "trace-abc.123"

    generated = http.post(f"{proxy.v1}/embeddings", json={"model": "m", "input": "x"})
    request_id = generated.headers["x-request-id"]
    assert len(request_id) == 32
    int(request_id, 16)
    assert lower_keys(upstream.last("/v1/embeddings").headers)["x-request-id"] == request_id

    another = http.post(f"{proxy.v1}/embeddings", json={"model": "m", "input": "x"})
    assert another.headers["x-request-id"] != request_id


@pytest.mark.parametrize("given", ["x" * 129, "has space"], ids=["too-long", "space"])
def test_unusable_request_id_replaced_consistently(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, given: str
) -> None:
    """An id the proxy will not use is replaced by a generated one, and the upstream is told
    the same id the client is, so the two ends of the exchange can be matched."""
    response = http.post(
        f"{proxy.v1}/embeddings",
        json={"model": "m", "input": "x"},
        headers=[(b"X-Request-ID", given.encode())],
    )
    assert response.status_code == 200
    returned = response.headers["x-request-id"]
    assert returned != given
    assert len(returned) == 32
    assert lower_keys(upstream.last("/v1/embeddings").headers)["x-request-id"] == returned


def test_request_id_on_streams_and_errors(proxy: Proxy, http: httpx.Client) -> None:
    body = {"model": "gpt-4o", "stream": True, "messages": []}
    with http.stream(
        "POST", f"{proxy.v1}/chat/completions", json=body, headers={"X-Request-ID": "stream-1"}
    ) as response:
        response.read()
    assert response.headers.get_list("x-request-id") == ["stream-1"]

    bad = http.post(f"{proxy.v1}/chat/completions", content=b"{", headers={"X-Request-ID": "bad-1"})
    assert bad.status_code == 400
    assert bad.headers["x-request-id"] == "bad-1"


# --- UPSTREAM_URL spellings -----------------------------------------------------------------------


def test_upstream_url_with_trailing_v1(
    alias_proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    response = http.post(
        f"{alias_proxy.v1}/completions", json={"model": "re-anything", "prompt": "hi"}, params={"a": "1"}
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "reply from echo-model"
    assert upstream.last().path == "/v1/completions?a=1"
    assert http.get(f"{alias_proxy.url}/readyz").status_code == 200


def test_upstream_url_with_trailing_slash(
    start_proxy: StartProxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    slashed = start_proxy(UPSTREAM_URL=upstream.url + "/")
    response = http.post(f"{slashed.v1}/chat/completions", json={"model": "gpt-4o", "messages": []})
    assert response.status_code == 200
    assert response.json()["model"] == "echo-model"
    assert upstream.last().path == "/v1/chat/completions"
    listing = http.get(f"{slashed.v1}/models")
    assert listing.status_code == 200
    assert [entry["id"] for entry in listing.json()["data"]][: len(MODELS)] == MODELS
    assert upstream.last().path == "/v1/models"


# --- health --------------------------------------------------------------------------------------------


def test_healthz_and_readyz(proxy: Proxy, http: httpx.Client) -> None:
    health = http.get(f"{proxy.url}/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = http.get(f"{proxy.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_every_proxied_response_names_its_target_model_and_upstream(proxy: Proxy) -> None:
    chat = {"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        plain = client.post(f"{proxy.v1}/chat/completions", json=chat)
        with client.stream("POST", f"{proxy.v1}/chat/completions", json={**chat, "stream": True}) as stream:
            stream.read()
        relayed_error = client.post(f"{proxy.v1}/chat/completions", json={**chat, "model": "gpt-down"})
        own_error = client.post(f"{proxy.v1}/chat/completions", content=b"{not json")
        injected = client.post(f"{proxy.v1}/chat/completions", json={**chat, "model": "evil\r\nx-evil: 1"})
    for response, target in [(plain, "qwen3-4b"), (stream, "qwen3-4b"), (relayed_error, "status-503")]:
        assert response.headers["x-rerouter-target-model"] == target
        assert response.headers["x-rerouter-upstream"] == "default"
        assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
    assert own_error.status_code == 400
    assert own_error.headers["x-rerouter-upstream"] == "default"
    assert "x-rerouter-target-model" not in own_error.headers
    assert "x-evil" not in injected.headers
    assert injected.headers["x-rerouter-target-model"] == "evil%0D%0Ax-evil:%201"
