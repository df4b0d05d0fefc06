"""Security and limits of real proxy processes: client keys, the upstream key, no open proxy,
request size, timeouts and the upstream connection pool.

One proxy per configuration serves every test that needs it: client keys from the environment,
from a file (with tight limits), from both (with an upstream key), and one whose upstream never
completes a connect. The four start side by side, once for the module, against this module's own
fake upstream, so its request log and concurrency count see this module's traffic only.
Requests that a client library would normalise go over raw sockets.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import Proxy, StartProxy, lands_under_v1, side_by_side
from tests.fake_upstream import FakeUpstream, Seen

ENV_KEYS = ("sk-env-alpha-4711c0ffee", "sk-env-beta-0815c0ffee")
FILE_KEYS = ("sk-file-gamma-1234c0ffee", "sk-file-delta-5678c0ffee")
UPSTREAM_KEY = "sk-upstream-secret-9999c0ffee"
WRONG_KEY = "sk-wrong-0000c0ffee"
SECRETS = (*ENV_KEYS, *FILE_KEYS, UPSTREAM_KEY, WRONG_KEY)
HI = [{"role": "user", "content": "hi"}]
TIMEOUT = 10
LIMIT = 4096  # MAX_REQUEST_BYTES of file_proxy
FILE_AUTH = {"Authorization": f"Bearer {FILE_KEYS[0]}"}


def sdk(http: httpx.Client, proxy: Proxy, key: str) -> openai.OpenAI:
    """The SDK on the module's shared HTTP client (a client of its own costs a TLS context)."""
    return openai.OpenAI(base_url=proxy.v1, api_key=key, max_retries=0, timeout=TIMEOUT, http_client=http)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(http: httpx.Client, proxy: Proxy, model: str = "gpt-3.5-turbo-16k", **kwargs: Any) -> httpx.Response:
    body = {"model": model, "messages": HI, **kwargs.pop("extra", {})}
    return http.post(f"{proxy.v1}/chat/completions", json=body, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["code"] == code


def new_requests(server: FakeUpstream, before: int) -> list[Seen]:
    return server.requests[before:]


def header_names(seen: Seen) -> set[str]:
    return {name.lower() for name in seen.headers}


# --- proxies --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "proxy-api-keys"
    path.write_text("\n".join(FILE_KEYS) + "\n")  # as a mounted Kubernetes Secret holds it
    return path


@pytest.fixture(scope="module")
def own() -> FakeUpstream:
    """This module's model server, so request logs and concurrency counts are its alone."""
    server = FakeUpstream()
    server.start()
    return server


@pytest.fixture(scope="module")
def elsewhere() -> FakeUpstream:
    """A second model server the proxy is not configured for: it must never be reached."""
    server = FakeUpstream()
    server.start()
    return server


@pytest.fixture(scope="module")
def blackhole() -> Iterator[str]:
    """A loopback port whose connects hang: a listener with a full accept queue that never
    accepts makes Linux drop further SYNs, so the client waits (and retries) for the SYN-ACK."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        with pytest.raises(TimeoutError):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    yield f"http://127.0.0.1:{port}"
    for sock in (*fillers, listener):
        sock.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def proxies(
    start_proxy: StartProxy, own: FakeUpstream, keys_file: Path, blackhole: str
) -> Iterator[dict[str, Proxy]]:
    """Every proxy of this module, started side by side (each takes a second or more) and
    stopped side by side when the module is done."""
    settings: dict[str, dict[str, str]] = {
        # Client keys from PROXY_API_KEYS; no upstream key, so the client's key goes upstream.
        "env": {"PROXY_API_KEYS": ",".join(ENV_KEYS)},
        # Client keys from PROXY_API_KEYS_FILE only, an upstream key, and tight limits.
        "file": {
            "PROXY_API_KEYS_FILE": str(keys_file),
            "UPSTREAM_API_KEY": UPSTREAM_KEY,
            "MAX_REQUEST_BYTES": str(LIMIT),
            "REQUEST_TIMEOUT": "1",
            "UPSTREAM_READ_TIMEOUT": "1",
            "UPSTREAM_MAX_CONNECTIONS": "2",
        },
        # Keys from the environment and the file together, and an upstream key.
        "both": {
            "PROXY_API_KEYS": ",".join(ENV_KEYS),
            "PROXY_API_KEYS_FILE": str(keys_file),
            "UPSTREAM_API_KEY": UPSTREAM_KEY,
        },
        # An upstream whose connect never completes; only the connect limit is short.
        "connect": {
            "UPSTREAM_URL": blackhole,
            "UPSTREAM_CONNECT_TIMEOUT": "0.5",
            "UPSTREAM_READ_TIMEOUT": "30",
            "REQUEST_TIMEOUT": "30",
        },
    }
    with side_by_side(start_proxy, settings, UPSTREAM_URL=own.url, LOG_LEVEL="debug") as running:
        yield running


@pytest.fixture(scope="module")
def env_proxy(proxies: dict[str, Proxy]) -> Proxy:
    return proxies["env"]


@pytest.fixture(scope="module")
def file_proxy(proxies: dict[str, Proxy]) -> Proxy:
    return proxies["file"]


@pytest.fixture(scope="module")
def both_proxy(proxies: dict[str, Proxy]) -> Proxy:
    return proxies["both"]


@pytest.fixture(scope="module")
def connect_proxy(proxies: dict[str, Proxy]) -> Proxy:
    return proxies["connect"]


KEYED = {
    "env": ("env_proxy", ENV_KEYS),
    "file": ("file_proxy", FILE_KEYS),
    "both": ("both_proxy", ENV_KEYS + FILE_KEYS),
}


@pytest.fixture(params=list(KEYED))
def keyed(request: pytest.FixtureRequest) -> tuple[Proxy, tuple[str, ...]]:
    fixture, keys = KEYED[request.param]
    return request.getfixturevalue(fixture), keys


# --- client keys ------------------------------------------------------------------------------------


def test_every_configured_key_works_through_the_sdk(
    http: httpx.Client, keyed: tuple[Proxy, tuple[str, ...]]
) -> None:
    proxy, keys = keyed
    for key in keys:
        client = sdk(http, proxy, key)
        answer = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=HI)
        assert answer.choices[0].message.content == "reply from qwen3-4b"
        assert "gpt-3.5-turbo-16k" in {model.id for model in client.models.list()}


def test_keys_of_one_source_only_do_not_open_the_other(
    http: httpx.Client, env_proxy: Proxy, file_proxy: Proxy
) -> None:
    """Each source alone is all there is: a key from the other source is just a wrong key."""
    assert chat(http, env_proxy, headers=auth(FILE_KEYS[0])).status_code == 401
    assert chat(http, file_proxy, headers=auth(ENV_KEYS[0])).status_code == 401


def test_a_wrong_key_is_an_authentication_error_in_the_sdk(
    http: httpx.Client, keyed: tuple[Proxy, tuple[str, ...]]
) -> None:
    proxy, keys = keyed
    for key in (WRONG_KEY, keys[0][:-1], keys[0] + "x", keys[0].upper()):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(http, proxy, key).chat.completions.create(model="gpt-3.5-turbo-16k", messages=HI)
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        assert caught.value.type == "authentication_error"


def test_a_streaming_request_needs_the_key_too(http: httpx.Client, both_proxy: Proxy) -> None:
    stream = sdk(http, both_proxy, FILE_KEYS[1]).chat.completions.create(
        model="gpt-4o", messages=HI, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "reply from echo-model"
    with pytest.raises(openai.AuthenticationError):
        sdk(http, both_proxy, WRONG_KEY).chat.completions.create(model="gpt-4o", messages=HI, stream=True)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"Authorization": "Bearer"}, id="empty-bearer"),
        pytest.param({"Authorization": f"Basic {ENV_KEYS[0]}"}, id="basic"),
        pytest.param({"Authorization": ENV_KEYS[0]}, id="no-scheme"),
        pytest.param(auth(WRONG_KEY), id="wrong"),
    ],
)
def test_a_missing_or_malformed_credential_is_401_and_never_reaches_the_upstream(
    http: httpx.Client, both_proxy: Proxy, own: FakeUpstream, headers: dict[str, str]
) -> None:
    before = len(own.requests)
    every_route = [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/gpt-3.5-turbo-16k"),
        ("GET", "/v1/models/echo-model"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/anything/else"),
        ("DELETE", "/v1/files/file-1"),
    ]
    for method, path in every_route if not headers else every_route[:2]:
        body = {"model": "gpt-3.5-turbo-16k", "messages": HI, "stream": True}
        response = http.request(method, both_proxy.url + path, json=body, headers=headers)
        assert_openai_error(response, 401, "invalid_api_key")
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"].startswith("Bearer ")
        assert response.headers["x-request-id"]
    assert new_requests(own, before) == []


def test_the_api_key_header_works_like_bearer(
    http: httpx.Client, keyed: tuple[Proxy, tuple[str, ...]]
) -> None:
    proxy, keys = keyed
    for header in ("api-key", "x-api-key"):
        assert chat(http, proxy, headers={header: keys[-1]}).status_code == 200
        assert chat(http, proxy, headers={header: WRONG_KEY}).status_code == 401


def test_health_readiness_and_metrics_stay_open(
    http: httpx.Client, keyed: tuple[Proxy, tuple[str, ...]]
) -> None:
    proxy, _ = keyed
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(proxy.url + path).status_code == 200, path
    assert http.head(proxy.url + "/healthz").status_code == 200


# --- what goes upstream -----------------------------------------------------------------------------


UPSTREAM_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/chat/completions", {"model": "gpt-3.5-turbo-16k", "messages": HI}),
    ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": HI, "stream": True}),
    ("POST", "/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
    ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/gpt-3.5-turbo-16k", None),  # an alias: answered from the upstream's list
    ("GET", "/v1/models/echo-model", None),  # relayed as is
    ("GET", "/v1/files/file-1?purpose=x", None),
]


@pytest.mark.parametrize(
    ("proxy_fixture", "client_headers"),
    [
        pytest.param("file_proxy", {"Authorization": f"Bearer {FILE_KEYS[0]}"}, id="file-bearer"),
        pytest.param("file_proxy", {"api-key": FILE_KEYS[1]}, id="file-api-key"),
        pytest.param(
            "file_proxy", {"authorization": f"bearer {FILE_KEYS[0]}", "Api-Key": FILE_KEYS[1]}, id="file-both"
        ),
        pytest.param("both_proxy", {"Authorization": f"Bearer {ENV_KEYS[0]}"}, id="both-bearer"),
    ],
)
def test_the_upstream_key_replaces_the_clients_credential_on_every_path(
    http: httpx.Client,
    request: pytest.FixtureRequest,
    own: FakeUpstream,
    proxy_fixture: str,
    client_headers: dict[str, str],
) -> None:
    proxy: Proxy = request.getfixturevalue(proxy_fixture)
    before = len(own.requests)
    for method, path, body in UPSTREAM_CALLS:
        response = http.request(method, proxy.url + path, json=body, headers=client_headers)
        assert response.status_code == 200, (path, response.text)
    seen = new_requests(own, before)
    assert len(seen) == len(UPSTREAM_CALLS)
    for received in seen:
        assert received.headers.get("Authorization") == f"Bearer {UPSTREAM_KEY}", received.path
        assert "api-key" not in header_names(received), received.path
        everything = " ".join(f"{name}: {value}" for name, value in received.headers.items())
        for client_key in (*FILE_KEYS, *ENV_KEYS):
            assert client_key not in everything, received.path


def test_without_an_upstream_key_the_clients_credential_passes_through(
    http: httpx.Client, env_proxy: Proxy, own: FakeUpstream
) -> None:
    """The documented default: the upstream may check the same key."""
    assert chat(http, env_proxy, headers=auth(ENV_KEYS[1])).status_code == 200
    assert own.last("/v1/chat/completions").headers["Authorization"] == f"Bearer {ENV_KEYS[1]}"


@pytest.mark.parametrize("proxy_fixture", ["env_proxy", "file_proxy", "both_proxy"])
def test_no_key_ever_appears_in_logs_or_error_bodies(
    http: httpx.Client, request: pytest.FixtureRequest, proxy_fixture: str
) -> None:
    """Successes and failures at LOG_LEVEL=debug; then the whole log file and every answer
    to a failure are searched for every key string, configured or presented."""
    proxy: Proxy = request.getfixturevalue(proxy_fixture)
    good = ENV_KEYS[0] if proxy_fixture == "env_proxy" else FILE_KEYS[0]
    v1 = proxy.v1
    answers = [
        http.post(f"{v1}/chat/completions", json={"model": "gpt-4o", "messages": HI}, headers=auth(good)),
        http.post(
            f"{v1}/chat/completions",
            json={"model": "gpt-4o", "messages": HI, "stream": True},
            headers={"api-key": good},
        ),
    ]
    for credential in ({}, auth(WRONG_KEY), {"api-key": WRONG_KEY}, auth(UPSTREAM_KEY), auth(good + "x")):
        answers.append(http.post(f"{v1}/chat/completions", json={"model": "gpt-4o"}, headers=credential))
    answers.append(http.get(f"{v1}/models/no-such-model", headers=auth(good)))  # relayed 404
    answers.append(http.post(f"{v1}/chat/completions", content=b"{nope", headers=auth(good)))
    answers.append(http.get(f"{v1}/%2e%2e/admin", headers=auth(good)))
    answers.append(chat(http, proxy, "gpt-ratelimited", headers=auth(good)))
    answers.append(chat(http, proxy, "gpt-down", headers=auth(good)))
    failures = [answer for answer in answers if answer.status_code >= 400]
    assert {answer.status_code for answer in failures} >= {400, 401, 404, 429, 503}
    assert {answer.status_code for answer in answers} & {200}
    for answer in failures:
        shown = answer.text + " ".join(f"{k}: {v}" for k, v in answer.headers.items())
        for secret in SECRETS:
            assert secret not in shown, (answer.status_code, shown)
    time.sleep(0.2)  # the last request's log event is written after its response
    logged = proxy.log_path.read_text()
    assert '"event":"request"' in logged
    for secret in SECRETS:
        assert secret not in logged, secret


# --- not an open proxy ----------------------------------------------------------------------------------


def send_raw(proxy: Proxy, head: bytes, body: bytes = b"") -> tuple[int | None, bytes]:
    """One request written byte for byte; (status or None when closed unanswered, body)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return None, b""
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_lands_under_v1_sees_through_encodings() -> None:
    assert lands_under_v1("/v1/models/Qwen%2FQwen3-4B?x=/../..")
    assert not lands_under_v1("/v1/../admin")
    assert not lands_under_v1("/v1/%2e%2e/admin")
    assert not lands_under_v1("/v1/x/..%2f..%2fadmin")
    assert not lands_under_v1("/v1/%252e%252e/admin")
    assert not lands_under_v1("/v1/..;/admin")
    assert not lands_under_v1("/v1/%2e%2e;x/admin")


# "{other}" stands for the second upstream's host:port, known once it runs.
REQUEST_TARGETS = [
    pytest.param("http://evil.example/v1/models", id="absolute-uri"),
    pytest.param("http://{other}/v1/models", id="absolute-uri-other-port"),
    pytest.param("http://{other}/v1/chat/completions", id="absolute-uri-post"),
    pytest.param("https://{other}/v1/embeddings", id="absolute-uri-https"),
    pytest.param("/v1/../admin", id="dotdot"),
    pytest.param("/v1/./../admin", id="dot-dotdot"),
    pytest.param("/v1/%2e%2e/admin", id="encoded-dotdot"),
    pytest.param("/v1/%2E%2e/admin", id="encoded-dotdot-mixed-case"),
    pytest.param("/v1/.%2e/admin", id="half-encoded-dotdot"),
    pytest.param("/v1/%252e%252e/x", id="double-encoded-dotdot"),
    pytest.param("/v1/models/..%2f..%2fadmin", id="encoded-slash-model"),
    pytest.param("/v1/files/..%2f..%2fadmin", id="encoded-slash"),
    pytest.param("/v1/files/..%252f..%252fadmin", id="double-encoded-slash"),
    pytest.param("/v1/files/%2e%2e%2f%2e%2e%2fadmin", id="all-encoded"),
    pytest.param("/v1/files/..%5c..%5cadmin", id="backslash"),
    pytest.param("/v1/files/..%255c..%255cadmin", id="double-encoded-backslash"),
    pytest.param("/v1/files/x%00/../../admin", id="nul"),
    pytest.param("/v1/..;/admin", id="path-parameter-dotdot"),
    pytest.param("/v1/%2e%2e;/admin", id="path-parameter-encoded-dotdot"),
    pytest.param("/v1/..;jsessionid=x/admin", id="path-parameter-named"),
    pytest.param("/v1/files/x%2500", id="double-encoded-nul"),
    pytest.param("//evil.example/v1/models", id="scheme-relative"),
    pytest.param("//{other}/v1/models", id="scheme-relative-other-port"),
    pytest.param("/v1//evil.example/x", id="double-slash-inside"),
    pytest.param("/v1/%2f%2fevil.example/x", id="encoded-double-slash"),
    pytest.param("@evil.example/v1/models", id="userinfo-style"),
    pytest.param("/v1/models@{other}/x", id="at-sign"),
    pytest.param("/v1/x#/../../admin", id="fragment"),
    pytest.param("/v1/x?next=http://evil.example/../../", id="query"),
    pytest.param("/admin", id="not-v1"),
    pytest.param("/v2/models", id="v2"),
    pytest.param("/v1", id="bare-v1"),
    pytest.param("*", id="asterisk"),
]


@pytest.mark.parametrize("target", REQUEST_TARGETS)
def test_no_request_target_reaches_another_host_or_climbs_out_of_v1(
    env_proxy: Proxy, own: FakeUpstream, elsewhere: FakeUpstream, target: str
) -> None:
    """Raw request lines: either the proxy refuses (400/404, or closes unanswered) or what the
    configured upstream receives is a /v1/ path, with its own Host; the other server gets nothing."""
    request_target = target.format(other=elsewhere.url.removeprefix("http://"))
    other_seen, before = len(elsewhere.requests), len(own.requests)
    body = orjson.dumps({"model": "gpt-4o", "messages": HI})
    status, answer = send_raw(
        env_proxy,
        f"{'POST' if 'chat' in request_target else 'GET'} {request_target} HTTP/1.1\r\n".encode()
        + f"Host: {elsewhere.url.removeprefix('http://')}\r\n".encode()
        + f"Authorization: Bearer {ENV_KEYS[0]}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode(),
        body,
    )
    assert elsewhere.requests[other_seen:] == []
    forwarded = new_requests(own, before)
    upstream_host = own.url.removeprefix("http://")
    for seen in forwarded:
        assert lands_under_v1(seen.path), f"{request_target!r} reached the upstream as {seen.path!r}"
        assert seen.headers["Host"] == upstream_host
    if not forwarded:
        assert status in (None, 400, 404, 405), (status, answer)
        if status is not None:
            assert set(orjson.loads(answer)) == {"error"}


def test_an_absolute_uri_goes_to_the_configured_upstream(env_proxy: Proxy, own: FakeUpstream) -> None:
    """Not refused but not obeyed either: the host in the request line is ignored."""
    before = len(own.requests)
    status, answer = send_raw(
        env_proxy,
        b"GET http://evil.example/v1/embeddings?x=1 HTTP/1.1\r\nHost: evil.example\r\n"
        + f"Authorization: Bearer {ENV_KEYS[0]}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 200
    assert orjson.loads(answer)["path"] == "/v1/embeddings?x=1"
    [seen] = new_requests(own, before)
    assert seen.headers["Host"] == own.url.removeprefix("http://")


# --- request size ---------------------------------------------------------------------------------------


def body_of(size: int) -> bytes:
    """An embeddings request of exactly ``size`` bytes."""
    empty = orjson.dumps({"model": "plain-model", "input": ""})  # unmapped: forwarded as sent
    body = orjson.dumps({"model": "plain-model", "input": "x" * (size - len(empty))})
    assert len(body) == size
    return body


@pytest.mark.parametrize(("size", "status"), [(4000, 200), (LIMIT, 200), (LIMIT + 1, 413), (5000, 413)])
def test_max_request_bytes(
    http: httpx.Client, file_proxy: Proxy, own: FakeUpstream, size: int, status: int
) -> None:
    """MAX_REQUEST_BYTES=4096: up to the limit forwarded whole, beyond it 413 and nothing sent."""
    before = len(own.requests)
    response = http.post(
        f"{file_proxy.v1}/embeddings",
        content=body_of(size),
        headers={"Content-Type": "application/json", **FILE_AUTH},
    )
    if status == 200:
        assert response.status_code == 200
        assert response.json()["bytes"] == size
        return
    assert_openai_error(response, 413, "invalid_request")
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert new_requests(own, before) == []


def test_max_request_bytes_holds_for_a_chunked_body_without_length(
    http: httpx.Client, file_proxy: Proxy, own: FakeUpstream
) -> None:
    before = len(own.requests)
    data = body_of(5000)

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    try:
        response = http.post(
            f"{file_proxy.v1}/embeddings",
            content=pieces(),
            headers={"Content-Type": "application/json", **FILE_AUTH},
        )
    except httpx.TransportError:
        pass  # refused while the body was still being sent: also not forwarded
    else:
        assert_openai_error(response, 413, "invalid_request")
    assert new_requests(own, before) == []


# --- timeouts ---------------------------------------------------------------------------------------------


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_request_timeout_cuts_a_slowly_trickled_non_streamed_answer_with_504(
    http: httpx.Client, file_proxy: Proxy
) -> None:
    """REQUEST_TIMEOUT=1, a JSON answer (with its Content-Length) whose 6 pieces come 0.5 s
    apart: 3 s in all, every gap inside UPSTREAM_READ_TIMEOUT=1, so only the total can stop it,
    at about 1 s."""
    response, took = timed(lambda: chat(http, file_proxy, "paced-6x500", headers=FILE_AUTH))
    assert_openai_error(response, 504, "upstream_timeout")
    assert 0.8 < took < 2.5, took


def test_request_timeout_answers_504_for_a_chunked_non_streamed_answer_too(
    http: httpx.Client, file_proxy: Proxy
) -> None:
    """The same answer without Content-Length (chunked, as Ollama and other Go servers send
    large JSON bodies). The request was not streamed, so the client expects one JSON body: the
    timeout must be a 504 too, not a 200 whose body breaks off after 1 s."""
    try:
        response, took = timed(lambda: chat(http, file_proxy, "paced-6x500-chunked", headers=FILE_AUTH))
    except httpx.RemoteProtocolError as exc:
        pytest.fail(f"a 200 was sent and then cut: {exc}")
    assert_openai_error(response, 504, "upstream_timeout")
    assert 0.8 < took < 2.5, took


def read_until_cut(http: httpx.Client, proxy: Proxy, model: str) -> tuple[bytes, bool]:
    """A stream's bytes, and whether the connection broke before the body ended."""
    received = b""
    with http.stream(
        "POST",
        f"{proxy.v1}/chat/completions",
        json={"model": model, "messages": HI, "stream": True},
        headers=FILE_AUTH,
    ) as response:
        assert response.status_code == 200
        try:
            for chunk in response.iter_raw():
                received += chunk
        except httpx.RemoteProtocolError:
            return received, True
    return received, False


def test_upstream_read_timeout_cuts_a_stream_that_pauses_too_long(
    http: httpx.Client, file_proxy: Proxy
) -> None:
    """One event, then 2.5 s of silence, with UPSTREAM_READ_TIMEOUT=1: cut about 1 s in, and
    the client sees a broken stream, not a clean end."""
    (received, cut), took = timed(lambda: read_until_cut(http, file_proxy, "paced-2x2500"))
    assert cut
    assert b"piece 0" in received
    assert b"piece 1" not in received
    assert b"[DONE]" not in received
    assert 0.8 < took < 2.3, took


def stream_all(http: httpx.Client, proxy: Proxy, model: str, headers: dict[str, str]) -> bytes:
    with http.stream(
        "POST",
        f"{proxy.v1}/chat/completions",
        json={"model": model, "messages": HI, "stream": True},
        headers=headers,
    ) as response:
        assert response.status_code == 200
        return response.read()


def test_a_stream_longer_than_every_timeout_with_short_gaps_is_not_cut(
    http: httpx.Client, file_proxy: Proxy
) -> None:
    """4 events 0.6 s apart: 1.8 s in all, longer than REQUEST_TIMEOUT and UPSTREAM_READ_TIMEOUT
    (1 s each), but never silent for 1 s. Streams have no total; the gap limit is not reached."""
    data, took = timed(lambda: stream_all(http, file_proxy, "paced-4x600", FILE_AUTH))
    assert data.count(b"piece ") == 4
    assert data.endswith(b"data: [DONE]\n\n")
    assert took > 1.75


# --- the upstream connection pool -------------------------------------------------------------------------


def wait_until_idle(server: FakeUpstream) -> None:
    """Requests cut by earlier tests may still be winding down in the fake upstream."""
    deadline = time.monotonic() + 5
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.in_flight == 0


def concurrent_streams(http: httpx.Client, proxy: Proxy, count: int, headers: dict[str, str]) -> list[bytes]:
    """``count`` streams of 10 events 50 ms apart (0.5 s), all started at once."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: stream_all(http, proxy, "slow-stream-10", headers), range(count)))


def test_upstream_max_connections_bounds_concurrent_upstream_requests(
    http: httpx.Client, file_proxy: Proxy, own: FakeUpstream
) -> None:
    """UPSTREAM_MAX_CONNECTIONS=2: four 0.5 s streams at once reach the upstream two at a time;
    the others wait for a connection and then complete."""
    wait_until_idle(own)
    own.reset_peak()
    answers, took = timed(lambda: concurrent_streams(http, file_proxy, 4, FILE_AUTH))
    assert own.peak_in_flight == 2
    for data in answers:
        assert data.count(b"tick ") == 10
        assert data.endswith(b"data: [DONE]\n\n")
    assert took > 0.95  # two rounds of 0.5 s


def test_without_the_limit_the_same_streams_run_side_by_side(
    http: httpx.Client, env_proxy: Proxy, own: FakeUpstream
) -> None:
    """The control: the counter does see four at once where the pool allows it."""
    wait_until_idle(own)
    own.reset_peak()
    answers = concurrent_streams(http, env_proxy, 4, auth(ENV_KEYS[0]))
    assert all(data.endswith(b"data: [DONE]\n\n") for data in answers)
    assert own.peak_in_flight >= 4


# --- a connect that never completes ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_connect_timeout_ends_a_connect_that_never_completes(
    http: httpx.Client, connect_proxy: Proxy, stream: bool
) -> None:
    """Only UPSTREAM_CONNECT_TIMEOUT=0.5 is short here (read and total are 30 s), streams included."""
    response, took = timed(lambda: chat(http, connect_proxy, "gpt-4o", extra={"stream": stream}))
    assert_openai_error(response, 504, "upstream_timeout")
    assert 0.4 < took < 2.5, took
