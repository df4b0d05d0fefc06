"""End to end across named upstreams (UPSTREAMS): routing, fallbacks, retries, replicas,
the merged model list, renamed answers, per-model parameters and per-backend keys.

Three proxy processes, started side by side, serve the whole module (each start costs
seconds): ``routing`` has one URL per backend and no retries; ``replicas`` has backends of
several URLs, ``RETRIES=1``, a short ``UPSTREAM_COOLDOWN``, ``RESPONSE_MODEL=requested`` and a
default backend that is down; ``half_default`` has only a default backend of two replicas, one
down. Every upstream is a real server: ``FakeUpstream`` instances, a port that refuses
connections, and a listening socket whose full backlog leaves connections hanging. Each test
asks for model ids of its own, so what an upstream received can be told apart from other
tests' requests; counters are compared before and after.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, StartProxy, eventually
from tests.fake_upstream import FakeUpstream, Seen

MESSAGES = [{"role": "user", "content": "hi"}]
CLIENT_KEY = "sk-client-key"
BACKEND_KEY = "sk-backend-beta"
# The replicas proxy's cool-down: short to wait out, long enough for a few quick requests.
COOLDOWN = 1.0
IMPATIENT_READ_TIMEOUT = 0.5
HOLDING_CONNECT_TIMEOUT = 0.3

ROUTING_MAP: dict[str, Any] = {
    "plain": "served-by-alpha",
    "routed": {"model": "served-by-beta", "upstream": "big"},
    "/route-(\\w+)/": {"model": "\\1-on-beta", "upstream": "big"},
    # fallbacks before the first byte: (first target fails) -> (landed on big)
    "fb-connect": [
        {"model": "first-connect", "upstream": "dead"},
        {"model": "landed-connect", "upstream": "big"},
    ],
    "fb-connect-timeout": [
        {"model": "first-connect-timeout", "upstream": "holding"},
        {"model": "landed-connect-timeout", "upstream": "big"},
    ],
    "fb-503": ["status-503", {"model": "landed-503", "upstream": "big"}],
    "fb-429": ["status-429", {"model": "landed-429", "upstream": "big"}],
    "fb-timeout": [
        {"model": "hang", "upstream": "impatient"},
        {"model": "landed-timeout", "upstream": "big"},
    ],
    "fb-cut": ["cut-after-0", {"model": "landed-cut", "upstream": "big"}],
    "fb-stall": [
        {"model": "stall-after-0", "upstream": "impatient"},
        {"model": "landed-stall", "upstream": "big"},
    ],
    "fb-embed": [{"model": "embed-first", "upstream": "dead"}, {"model": "embed-landed", "upstream": "big"}],
    "listed-alias": {"model": "beta-only", "upstream": "big"},
    "fb-404": ["status-404", {"model": "never-after-404", "upstream": "big"}],
    "fb-three": [
        {"model": "first-of-three", "upstream": "dead"},
        "status-503-second-of-three",
        {"model": "landed-three", "upstream": "big"},
    ],
    # after the first byte: no fallback
    "mid-cut": ["cut-after-2", {"model": "never-after-cut", "upstream": "big"}],
    "mid-stall": [
        {"model": "stall-after-2", "upstream": "impatient"},
        {"model": "never-after-stall", "upstream": "big"},
    ],
    # every target fails: the last answer is the client's
    "all-503": ["status-503", {"model": "status-503", "upstream": "big"}],
    "all-429": ["status-429", {"model": "status-429", "upstream": "big"}],
    "last-dead": ["status-503-before-dead", {"model": "after-503", "upstream": "dead"}],
    # MODEL_PARAMS
    "params": "params-target",
    "fb-params": ["status-503-params", {"model": "landed-params", "upstream": "big"}],
    # per-backend keys
    "keyed": {"model": "keyed-model", "upstream": "keyed"},
    "fb-keys": [{"model": "status-503-keyed", "upstream": "keyed"}, "landed-keys"],
}
ROUTING_PARAMS = {
    "params-target": {
        "defaults": {"temperature": 0.3, "top_p": 0.9},
        "overrides": {"max_tokens": 64},
        "drop": ["logit_bias", "user"],
    },
    "status-503-params": {"overrides": {"seed": 1}},
    "landed-params": {"drop": ["top_p", "seed"], "defaults": {"presence_penalty": 0.5}},
}
REPLICAS_MAP: dict[str, Any] = {
    "retry-me": {"model": "retry-model", "upstream": "half"},
    "spread-me": {"model": "slow-stream", "upstream": "pair"},
    "leave-me": {"model": "slow-stream", "upstream": "pair2"},
    "quick-pair2": {"model": "quick-on-pair2", "upstream": "pair2"},
    "recover-me": {"model": "phoenix-model", "upstream": "phoenix"},
    "retry-then-fallback": [
        {"model": "status-503-rtf", "upstream": "solo"},
        {"model": "landed-rtf", "upstream": "solo"},
    ],
    "renamed": {"model": "served-name", "upstream": "solo"},
    "renamed-fb": [
        {"model": "status-503-rename", "upstream": "solo"},
        {"model": "fb-served-name", "upstream": "solo"},
    ],
}


# --- upstreams and proxies ---------------------------------------------------------------------------


def _fake(owned_by: str, models: list[str]) -> FakeUpstream:
    server = FakeUpstream(models=models, owned_by=owned_by)
    server.start()
    return server


@pytest.fixture(scope="module")
def alpha() -> Iterator[FakeUpstream]:
    server = _fake("alpha", ["alpha-only", "shared-model"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def beta() -> Iterator[FakeUpstream]:
    server = _fake("beta", ["beta-only", "shared-model"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gamma() -> Iterator[FakeUpstream]:
    server = _fake("gamma", ["gamma-only"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def refused() -> Iterator[str]:
    """A bound port that never listens: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class DownPort:
    """Refuses connections until ``release``; then a server may start on the port."""

    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> int:
        port = self.port
        self.sock.close()
        return port


@pytest.fixture(scope="module")
def phoenix_port() -> Iterator[DownPort]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    down = DownPort(sock)
    yield down
    sock.close()


@pytest.fixture(scope="module")
def holding() -> Iterator[str]:
    """A port that accepts no connection in time: its backlog is full, so SYNs go unanswered."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}"


def routing_env(alpha: FakeUpstream, beta: FakeUpstream, refused: str, holding: str) -> dict[str, str]:
    upstreams = {
        "big": beta.url,
        "dead": refused,
        "impatient": {"urls": [alpha.url], "read_timeout": IMPATIENT_READ_TIMEOUT},
        "keyed": {"urls": [beta.url + "/v1"], "api_key": BACKEND_KEY},
        "holding": {"urls": [holding], "connect_timeout": HOLDING_CONNECT_TIMEOUT},
    }
    return {
        "UPSTREAM_URL": alpha.url,
        "UPSTREAMS": orjson.dumps(upstreams).decode(),
        "MODEL_MAP": orjson.dumps(ROUTING_MAP).decode(),
        "MODEL_PARAMS": orjson.dumps(ROUTING_PARAMS).decode(),
    }


def replicas_env(
    alpha: FakeUpstream, beta: FakeUpstream, gamma: FakeUpstream, refused: str, phoenix: DownPort
) -> dict[str, str]:
    upstreams = {
        "half": {"urls": [refused, gamma.url]},
        "half-listing": {"urls": [refused + "/v1", gamma.url + "/v1"]},
        "pair": {"urls": [alpha.url, beta.url]},
        "pair2": {"urls": [alpha.url, beta.url]},
        "phoenix": {"urls": [phoenix.url, gamma.url]},
        "solo": alpha.url,
    }
    return {
        "UPSTREAM_URL": refused,  # the default backend is down
        "UPSTREAMS": orjson.dumps(upstreams).decode(),
        "MODEL_MAP": orjson.dumps(REPLICAS_MAP).decode(),
        "RETRIES": "1",
        "UPSTREAM_COOLDOWN": str(COOLDOWN),
        "RESPONSE_MODEL": "requested",
    }


def half_default_env(gamma: FakeUpstream, refused: str) -> dict[str, str | None]:
    """The default backend itself is two replicas, one of them down."""
    upstreams = {"default": {"urls": [refused, gamma.url]}}
    return {"UPSTREAM_URL": None, "UPSTREAMS": orjson.dumps(upstreams).decode(), "MODEL_MAP": "{}"}


@pytest.fixture(scope="module")
def proxies(
    start_proxy: StartProxy,
    alpha: FakeUpstream,
    beta: FakeUpstream,
    gamma: FakeUpstream,
    refused: str,
    holding: str,
    phoenix_port: DownPort,
) -> Iterator[tuple[Proxy, Proxy, Proxy]]:
    """Every proxy of the module, started side by side: a start is mostly waiting."""
    with ThreadPoolExecutor(3) as pool:
        routing = pool.submit(lambda: start_proxy(**routing_env(alpha, beta, refused, holding)))
        replicas = pool.submit(lambda: start_proxy(**replicas_env(alpha, beta, gamma, refused, phoenix_port)))
        half_default = pool.submit(lambda: start_proxy(**half_default_env(gamma, refused)))
        started = routing.result(timeout=60), replicas.result(timeout=60), half_default.result(timeout=60)
    yield started
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def routing(proxies: tuple[Proxy, Proxy, Proxy]) -> Proxy:
    """One URL per backend, RETRIES=0, RESPONSE_MODEL=upstream."""
    return proxies[0]


@pytest.fixture(scope="module")
def replicas(proxies: tuple[Proxy, Proxy, Proxy]) -> Proxy:
    """Replica pools, RETRIES=1, a short cool-down, RESPONSE_MODEL=requested, default down."""
    return proxies[1]


@pytest.fixture(scope="module")
def half_default(proxies: tuple[Proxy, Proxy, Proxy]) -> Proxy:
    """Only a default backend, of two replicas, the first one down; nothing else configured."""
    return proxies[2]


# --- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(
        timeout=httpx.Timeout(10.0), headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    ) as client:
        yield client


def sdk(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key=CLIENT_KEY, max_retries=0, timeout=10)


def chat(http: httpx.Client, proxy: Proxy, model: str, **extra: Any) -> httpx.Response:
    return http.post(f"{proxy.v1}/chat/completions", json={"model": model, "messages": MESSAGES, **extra})


def received(
    server: FakeUpstream, model: str | None = None, path: str = "/v1/chat/completions"
) -> list[Seen]:
    """The requests ``server`` got on ``path``, for ``model`` when given."""
    return [
        seen
        for seen in list(server.requests)
        if seen.path.split("?", 1)[0] == path and (model is None or seen.json().get("model") == model)
    ]


def received_models(server: FakeUpstream, since: int = 0) -> list[str]:
    """The model of every completion request ``server`` got, from its ``since``-th request on."""
    return [
        seen.json().get("model")
        for seen in list(server.requests)[since:]
        if seen.path.split("?", 1)[0] == "/v1/chat/completions"
    ]


def headers_lower(seen: Seen) -> dict[str, str]:
    return {name.lower(): value for name, value in seen.headers.items()}


def fallbacks(proxy: Proxy, source: str) -> dict[tuple[str, str, str], float]:
    """``rerouter_fallbacks_total`` for one requested model: (from, to, reason) -> count."""
    text = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rerouter_fallbacks_total" and sample.labels["source_model"] == source:
                key = (sample.labels["from_target"], sample.labels["to_target"], sample.labels["reason"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def new_fallbacks(
    before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float]
) -> dict[tuple[str, str, str], float]:
    return {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}


def assert_served_by(response: httpx.Response, backend: str, model: str) -> None:
    assert response.headers["x-rerouter-upstream"] == backend
    assert response.headers["x-rerouter-target-model"] == model


# --- 1. routing to a named backend -------------------------------------------------------------------


def test_object_target_routes_to_its_backend(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    on_alpha, on_beta = len(alpha.requests), len(beta.requests)
    routed = chat(http, routing, "routed")
    assert routed.status_code == 200
    assert routed.json()["choices"][0]["message"]["content"] == "reply from served-by-beta"
    assert_served_by(routed, "big", "served-by-beta")
    assert received_models(beta, on_beta) == ["served-by-beta"]
    assert received_models(alpha, on_alpha) == []

    plain = chat(http, routing, "plain")
    assert plain.status_code == 200
    assert_served_by(plain, "default", "served-by-alpha")
    assert received_models(alpha, on_alpha) == ["served-by-alpha"]
    assert received_models(beta, on_beta) == ["served-by-beta"]


def test_regex_target_routes_to_its_backend_streamed(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    on_alpha, on_beta = len(alpha.requests), len(beta.requests)
    body = {"model": "route-qwen", "messages": MESSAGES, "stream": True}
    with http.stream("POST", f"{routing.v1}/chat/completions", json=body) as response:
        data = response.read()
    assert response.status_code == 200
    assert_served_by(response, "big", "qwen-on-beta")
    assert data.endswith(b"data: [DONE]\n\n")
    assert b'"model":"qwen-on-beta"' in data
    assert received_models(beta, on_beta) == ["qwen-on-beta"]
    assert received_models(alpha, on_alpha) == []


# --- 2./3. fallbacks before the first byte -------------------------------------------------------------

# (requested, first target, reason, landed on big)
FALLBACKS = [
    pytest.param("fb-connect", "first-connect", "connect", "landed-connect", id="connect"),
    pytest.param(
        "fb-connect-timeout",
        "first-connect-timeout",
        "timeout",
        "landed-connect-timeout",
        id="connect-timeout",
    ),
    pytest.param("fb-503", "status-503", "http_5xx", "landed-503", id="503"),
    pytest.param("fb-429", "status-429", "http_429", "landed-429", id="429"),
    pytest.param("fb-timeout", "hang", "timeout", "landed-timeout", id="timeout-before-headers"),
    pytest.param("fb-cut", "cut-after-0", "disconnected", "landed-cut", id="cut-before-body"),
    pytest.param("fb-stall", "stall-after-0", "timeout", "landed-stall", id="stall-before-body"),
]
# First targets alpha serves (the others are on ports where no server answers).
FIRST_ON_ALPHA = {"status-503", "status-429", "hang", "cut-after-0", "stall-after-0"}


@pytest.mark.parametrize(("source", "first", "reason", "landed"), FALLBACKS)
def test_fallback_before_first_byte(
    routing: Proxy,
    alpha: FakeUpstream,
    beta: FakeUpstream,
    http: httpx.Client,
    source: str,
    first: str,
    reason: str,
    landed: str,
) -> None:
    tried_first, landed_before = len(received(alpha, first)), len(received(beta, landed))
    before = fallbacks(routing, source)
    started = time.monotonic()
    response = chat(http, routing, source)
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == f"reply from {landed}"
    assert response.json()["model"] == landed
    assert_served_by(response, "big", landed)
    assert len(received(beta, landed)) == landed_before + 1
    if first in FIRST_ON_ALPHA:
        assert len(received(alpha, first)) == tried_first + 1
    assert new_fallbacks(before, fallbacks(routing, source)) == {(first, landed, reason): 1}
    # per-backend timeouts, not the global ones (10 s connect, 600 s read), bound the first try
    assert elapsed < 5


@pytest.mark.parametrize(("source", "first", "reason", "landed"), FALLBACKS)
def test_sdk_stream_falls_back_before_first_byte(
    routing: Proxy, beta: FakeUpstream, source: str, first: str, reason: str, landed: str
) -> None:
    before = fallbacks(routing, source)
    landed_before = len(received(beta, landed))
    with sdk(routing) as client:
        raw = client.chat.completions.with_raw_response.create(model=source, messages=MESSAGES, stream=True)
        pieces: list[str] = []
        models: set[str] = set()
        with raw.parse() as stream:
            for chunk in stream:
                models.add(chunk.model)
                pieces += [choice.delta.content or "" for choice in chunk.choices]

    assert raw.headers["x-rerouter-upstream"] == "big"
    assert raw.headers["x-rerouter-target-model"] == landed
    assert raw.headers["content-type"] == "text/event-stream"
    assert "".join(pieces) == f"reply from {landed}"
    assert models == {landed}
    seen = received(beta, landed)
    assert len(seen) == landed_before + 1
    assert seen[-1].json()["stream"] is True
    assert new_fallbacks(before, fallbacks(routing, source)) == {(first, landed, reason): 1}


def test_fallback_chain_of_three(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    before = fallbacks(routing, "fb-three")
    on_alpha, on_beta = len(alpha.requests), len(beta.requests)
    response = chat(http, routing, "fb-three")
    assert response.status_code == 200
    assert_served_by(response, "big", "landed-three")
    assert received_models(alpha, on_alpha) == ["status-503-second-of-three"]
    assert received_models(beta, on_beta) == ["landed-three"]
    assert new_fallbacks(before, fallbacks(routing, "fb-three")) == {
        ("first-of-three", "status-503-second-of-three", "connect"): 1,
        ("status-503-second-of-three", "landed-three", "http_5xx"): 1,
    }


# --- the last attempt's answer is relayed --------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429])
def test_last_failing_answer_is_relayed_as_is(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client, status: int
) -> None:
    source, target = f"all-{status}", f"status-{status}"
    before = fallbacks(routing, source)
    on_alpha, on_beta = len(received(alpha, target)), len(received(beta, target))
    response = chat(http, routing, source)
    assert response.status_code == status
    assert response.json() == {
        "error": {"message": "the fake upstream was told to fail", "type": "fake_error", "code": str(status)}
    }
    if status == 429:
        assert response.headers["retry-after"] == "7"
    assert_served_by(response, "big", target)
    assert len(received(alpha, target)) == on_alpha + 1
    assert len(received(beta, target)) == on_beta + 1
    reason = "http_429" if status == 429 else "http_5xx"
    assert new_fallbacks(before, fallbacks(routing, source)) == {(target, target, reason): 1}


def test_last_target_unreachable_is_the_proxys_502(
    routing: Proxy, alpha: FakeUpstream, http: httpx.Client
) -> None:
    on_alpha = len(alpha.requests)
    response = chat(http, routing, "last-dead")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_connect"
    assert_served_by(response, "dead", "after-503")
    assert received_models(alpha, on_alpha) == ["status-503-before-dead"]


def test_client_errors_are_not_fallen_back_from(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    """A 4xx other than 429 is the upstream's verdict on the request: relayed, no fallback."""
    before = fallbacks(routing, "fb-404")
    response = chat(http, routing, "fb-404")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "404"
    assert_served_by(response, "default", "status-404")
    assert received(beta, "never-after-404") == []
    assert fallbacks(routing, "fb-404") == before


def test_fallback_on_another_endpoint(routing: Proxy, beta: FakeUpstream, http: httpx.Client) -> None:
    """Not only completions: an embeddings body is rewritten for the target it goes to."""
    response = http.post(f"{routing.v1}/embeddings", json={"model": "fb-embed", "input": "hi"})
    assert response.status_code == 200
    assert response.json()["model"] == "embed-landed"  # the fake echoes what it received
    assert_served_by(response, "big", "embed-landed")
    assert received(beta, path="/v1/embeddings")[-1].json() == {"model": "embed-landed", "input": "hi"}


# --- 4. no fallback once bytes were sent ---------------------------------------------------------------


def _drain(stream: openai.Stream[ChatCompletionChunk], pieces: list[str]) -> None:
    for chunk in stream:
        pieces += [choice.delta.content or "" for choice in chunk.choices]


@pytest.mark.parametrize(
    ("source", "never"),
    [("mid-cut", "never-after-cut"), ("mid-stall", "never-after-stall")],
    ids=["cut", "stall"],
)
def test_no_fallback_after_the_first_byte(
    routing: Proxy, beta: FakeUpstream, source: str, never: str
) -> None:
    before = fallbacks(routing, source)
    pieces: list[str] = []
    with sdk(routing) as client:
        stream = client.chat.completions.create(model=source, messages=MESSAGES, stream=True)
        with stream, pytest.raises(openai.APIConnectionError) as caught:
            _drain(stream, pieces)
    # a broken stream, not a clean end, and not a second answer glued on
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert pieces == ["piece 0 ", "piece 1 "]
    assert received(beta, never) == []
    assert fallbacks(routing, source) == before


def test_no_fallback_after_the_first_byte_raw(routing: Proxy, beta: FakeUpstream, http: httpx.Client) -> None:
    body = {"model": "mid-cut", "messages": MESSAGES, "stream": True}
    chunks: list[bytes] = []
    with http.stream("POST", f"{routing.v1}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert_served_by(response, "default", "cut-after-2")
        with pytest.raises(httpx.RemoteProtocolError):
            chunks.extend(response.iter_raw())
    data = b"".join(chunks)
    assert data.count(b"data: ") == 2
    assert b"[DONE]" not in data
    assert b"never-after-cut" not in data
    assert received(beta, "never-after-cut") == []


# --- 5. retries across replicas -------------------------------------------------------------------------


def test_retry_moves_to_the_other_replica_after_a_short_backoff(
    replicas: Proxy, gamma: FakeUpstream, http: httpx.Client
) -> None:
    """``half`` is [refused, gamma]: every request succeeds; one that met the dead replica first
    (the first after each cool-down) was retried on gamma after 0.125-0.25 s."""
    timings: list[tuple[float, int]] = []

    def one() -> tuple[float, int]:
        before = fallbacks(replicas, "retry-me")
        started = time.monotonic()
        response = chat(http, replicas, "retry-me")
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "reply from retry-model"
        assert_served_by(response, "half", "retry-model")
        added = new_fallbacks(before, fallbacks(replicas, "retry-me"))
        assert added in ({}, {("retry-model", "retry-model", "connect"): 1})
        timings.append((elapsed, len(added)))
        return timings[-1]

    def retried() -> None:
        assert one()[1] == 1

    served = len(received(gamma, "retry-model"))
    eventually(retried, timeout=COOLDOWN + 5, interval=0.1)
    retried_elapsed = timings[-1][0]
    assert 0.12 <= retried_elapsed < 3, f"a retry took {retried_elapsed:.3f} s"
    # inside the cool-down the dead replica is skipped: straight to gamma, no retry
    assert one()[1] == 0
    assert len(received(gamma, "retry-model")) == served + len(timings)


def test_retries_then_fallback(replicas: Proxy, alpha: FakeUpstream, http: httpx.Client) -> None:
    """RETRIES=1: each target is tried twice before the next one."""
    before = fallbacks(replicas, "retry-then-fallback")
    response = chat(http, replicas, "retry-then-fallback")
    assert response.status_code == 200
    assert_served_by(response, "solo", "landed-rtf")
    assert len(received(alpha, "status-503-rtf")) == 2
    assert len(received(alpha, "landed-rtf")) == 1
    assert new_fallbacks(before, fallbacks(replicas, "retry-then-fallback")) == {
        ("status-503-rtf", "status-503-rtf", "http_5xx"): 1,
        ("status-503-rtf", "landed-rtf", "http_5xx"): 1,
    }


# --- 6. replica spreading, failure and recovery ---------------------------------------------------------


def _open_streams(
    stack: ExitStack, http: httpx.Client, proxy: Proxy, model: str, count: int
) -> list[Iterator[bytes]]:
    """``count`` streams, each opened after the one before sent its first event, left open
    until ``stack`` closes; the readers are returned to keep them open (a reader dropped
    closes its response)."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    readers = []
    for _ in range(count):
        response = stack.enter_context(http.stream("POST", f"{proxy.v1}/chat/completions", json=body))
        assert response.status_code == 200
        reader = response.iter_raw()
        assert next(reader).startswith(b"data: ")
        readers.append(reader)
    return readers


def test_streams_spread_by_least_in_flight(
    replicas: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    on_alpha, on_beta = len(alpha.requests), len(beta.requests)
    with ExitStack() as stack:
        readers = _open_streams(stack, http, replicas, "spread-me", 4)
        assert received_models(alpha, on_alpha) == ["slow-stream"] * 2
        assert received_models(beta, on_beta) == ["slow-stream"] * 2
        assert alpha.in_flight == beta.in_flight == 2
        assert all(next(reader).startswith(b"data: ") for reader in readers)  # all still flowing
    eventually(lambda: _assert_idle(alpha, beta), timeout=5)


def _assert_idle(*servers: FakeUpstream) -> None:
    assert all(server.in_flight == 0 for server in servers)


def test_client_leaving_a_stream_does_not_cool_its_replica_down(
    replicas: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    """A client that goes away mid-stream says nothing about the replica: both replicas of
    ``pair2`` must keep taking turns right after."""
    with ExitStack() as stack:
        readers = _open_streams(stack, http, replicas, "leave-me", 2)
        assert alpha.in_flight == beta.in_flight == 1
        assert all(next(reader).startswith(b"data: ") for reader in readers)
    eventually(lambda: _assert_idle(alpha, beta), timeout=5)
    time.sleep(0.1)  # the proxy books the end of the streams just after the upstream sees it
    on_alpha, on_beta = len(alpha.requests), len(beta.requests)
    for _ in range(4):
        assert chat(http, replicas, "quick-pair2").status_code == 200
    assert received_models(alpha, on_alpha) == ["quick-on-pair2"] * 2
    assert received_models(beta, on_beta) == ["quick-on-pair2"] * 2


def test_dead_replica_cools_down_is_tried_again_and_recovers(
    replicas: Proxy, gamma: FakeUpstream, phoenix_port: DownPort, http: httpx.Client
) -> None:
    """``phoenix`` is [down port, gamma]: requests keep succeeding; the down replica is skipped
    for the cool-down, then tried again; once a server listens there, it gets traffic again."""

    def request() -> int:
        before = fallbacks(replicas, "recover-me")
        response = chat(http, replicas, "recover-me")
        assert response.status_code == 200, response.text
        assert_served_by(response, "phoenix", "phoenix-model")
        return sum(new_fallbacks(before, fallbacks(replicas, "recover-me")).values())

    def tries_the_down_replica() -> None:
        assert request() == 1

    eventually(tries_the_down_replica, timeout=COOLDOWN + 5, interval=0.1)
    failed_at = time.monotonic()
    assert request() == 0  # skipped while cooling down
    eventually(tries_the_down_replica, timeout=COOLDOWN + 5, interval=0.1)  # then tried again
    assert time.monotonic() - failed_at >= COOLDOWN - 0.1

    revived = FakeUpstream(models=["phoenix-only"], owned_by="phoenix")
    revived.start(phoenix_port.release())
    try:

        def back_in_rotation() -> None:
            assert request() == 0
            assert received(revived, "phoenix-model")

        eventually(back_in_rotation, timeout=COOLDOWN + 5, interval=0.1)
        # healthy again: the two replicas take turns
        on_revived, on_gamma = len(received(revived)), len(received(gamma, "phoenix-model"))
        for _ in range(4):
            assert request() == 0
        assert len(received(revived)) == on_revived + 2
        assert len(received(gamma, "phoenix-model")) == on_gamma + 2
    finally:
        revived.stop()


# --- 7. the merged model list ---------------------------------------------------------------------------


def test_models_list_merges_backends_and_aliases(
    routing: Proxy, beta: FakeUpstream, http: httpx.Client
) -> None:
    """``dead`` refuses and ``holding`` never connects: both left out, the rest listed."""
    listed_by_beta = len(received(beta, path="/v1/models"))
    response = http.get(f"{routing.v1}/models")
    assert response.status_code == 200
    assert response.headers["x-rerouter-upstream"] == "default,big,impatient,keyed"
    data = response.json()["data"]
    ids = [entry["id"] for entry in data]
    aliases = [key for key in ROUTING_MAP if not key.startswith("/")]
    assert ids == ["alpha-only", "shared-model", "beta-only", *aliases]
    owners = {entry["id"]: entry["owned_by"] for entry in data}
    assert owners["shared-model"] == "alpha"  # the first backend naming an id describes it
    assert owners["beta-only"] == "beta"
    assert owners["plain"] == "openai-model-rerouter"
    # beta is asked as ``big`` with the client's key and as ``keyed`` with its own
    asked = received(beta, path="/v1/models")[listed_by_beta:]
    assert sorted(headers_lower(seen)["authorization"] for seen in asked) == [
        f"Bearer {BACKEND_KEY}",
        f"Bearer {CLIENT_KEY}",
    ]

    with sdk(routing) as client:
        assert [model.id for model in client.models.list()] == ids


def test_models_list_uses_a_live_replica_of_a_backend(
    replicas: Proxy, gamma: FakeUpstream, http: httpx.Client
) -> None:
    """``half-listing`` is [refused, gamma]: one replica is up, so the backend is reachable and
    its models are listed every time, whichever replica the listing tried first. (The first
    listing of this proxy in this module tries the down replica first: keep this test ahead of
    other listings of it.)"""
    for _ in range(2):
        response = http.get(f"{replicas.v1}/models")
        assert response.status_code == 200
        assert "half-listing" in response.headers["x-rerouter-upstream"].split(",")
        assert "gamma-only" in [entry["id"] for entry in response.json()["data"]]


def test_models_retrieve_alias_from_its_targets_backend(routing: Proxy, http: httpx.Client) -> None:
    response = http.get(f"{routing.v1}/models/listed-alias")
    assert response.status_code == 200
    assert response.json() == {"id": "listed-alias", "object": "model", "created": 1, "owned_by": "beta"}
    assert_served_by(response, "big", "beta-only")


def test_ready_while_a_default_replica_answers(half_default: Proxy, http: httpx.Client) -> None:
    """/readyz: 200 while the default backend answers; one of its two replicas does. This is
    the proxy's first probe, and it starts with the down replica."""
    response = http.get(f"{half_default.url}/readyz")
    assert response.status_code == 200, response.text


def test_models_list_of_a_default_backend_with_a_down_replica(
    half_default: Proxy, http: httpx.Client
) -> None:
    """The only backend has a live replica: the listing must not depend on which one is picked."""
    for _ in range(2):
        response = http.get(f"{half_default.v1}/models")
        assert response.status_code == 200, response.text
        assert response.headers["x-rerouter-upstream"] == "default"
        assert [entry["id"] for entry in response.json()["data"]] == ["gamma-only"]


def test_models_list_without_the_default_backend(replicas: Proxy, http: httpx.Client) -> None:
    """The replicas proxy's default backend is down: still 200 with every other backend's models."""
    response = http.get(f"{replicas.v1}/models")
    assert response.status_code == 200
    answered = response.headers["x-rerouter-upstream"].split(",")
    assert "default" not in answered
    assert {"pair", "pair2", "solo"} <= set(answered)
    ids = [entry["id"] for entry in response.json()["data"]]
    assert len(ids) == len(set(ids))
    # replicas of a backend serve the same models: one replica's list stands for the backend
    assert "shared-model" in ids
    assert {"alpha-only", "beta-only"} & set(ids)
    assert set(REPLICAS_MAP) <= set(ids)


# --- 8. RESPONSE_MODEL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "served"), [("renamed", "served-name"), ("renamed-fb", "fb-served-name")])
def test_response_model_requested_through_the_sdk(
    replicas: Proxy, alpha: FakeUpstream, source: str, served: str
) -> None:
    with sdk(replicas) as client:
        raw = client.chat.completions.with_raw_response.create(model=source, messages=MESSAGES)
        whole = raw.parse()
        assert whole.model == source
        assert whole.choices[0].message.content == f"reply from {served}"
        assert raw.headers["x-rerouter-target-model"] == served

        chunks = list(
            client.chat.completions.create(
                model=source, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        text = client.completions.create(model=source, prompt="once")
        assert text.model == source
        streamed_text = list(client.completions.create(model=source, prompt="once", stream=True))
    assert len(chunks) == 4  # three words and the usage chunk
    assert [chunk.model for chunk in chunks] == [source] * 4
    assert chunks[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"reply from {served}"
    assert [chunk.model for chunk in streamed_text] == [source] * 3
    assert received(alpha, served)[-1].json()["model"] == served


def test_response_model_defaults_to_the_served_model(routing: Proxy) -> None:
    with sdk(routing) as client:
        whole = client.chat.completions.create(model="routed", messages=MESSAGES)
        chunks = list(client.chat.completions.create(model="routed", messages=MESSAGES, stream=True))
    assert whole.model == "served-by-beta"
    assert [chunk.model for chunk in chunks] == ["served-by-beta"] * 3


# --- 9. MODEL_PARAMS ------------------------------------------------------------------------------------


def test_model_params_defaults_overrides_drop(routing: Proxy, alpha: FakeUpstream) -> None:
    with sdk(routing) as client:
        client.chat.completions.create(
            model="params",
            messages=MESSAGES,
            temperature=0.7,
            max_tokens=5,
            logit_bias={"50256": -100},
            user="someone",
            seed=3,
        )
    sent = received(alpha, "params-target")[-1].json()
    assert sent == {
        "model": "params-target",
        "messages": MESSAGES,
        "temperature": 0.7,  # the client's own value beats a default
        "top_p": 0.9,
        "max_tokens": 64,
        "seed": 3,
    }


def test_model_params_of_each_fallback_target_apply_to_its_own_attempt(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    response = chat(http, routing, "fb-params", top_p=0.2, seed=7, stream=False)
    assert response.status_code == 200
    assert_served_by(response, "big", "landed-params")
    first = received(alpha, "status-503-params")[-1].json()
    assert first == {
        "model": "status-503-params",
        "messages": MESSAGES,
        "top_p": 0.2,
        "seed": 1,
        "stream": False,
    }
    second = received(beta, "landed-params")[-1].json()
    assert second == {
        "model": "landed-params",
        "messages": MESSAGES,
        "presence_penalty": 0.5,
        "stream": False,
    }


# --- 10. per-backend API keys ---------------------------------------------------------------------------


def test_backend_api_key_replaces_the_clients(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    response = http.post(
        f"{routing.v1}/chat/completions",
        json={"model": "keyed", "messages": MESSAGES},
        headers={"api-key": CLIENT_KEY},
    )
    assert response.status_code == 200
    assert_served_by(response, "keyed", "keyed-model")
    headers = headers_lower(received(beta, "keyed-model")[-1])
    assert headers["authorization"] == f"Bearer {BACKEND_KEY}"
    assert "api-key" not in headers

    # a backend without a key of its own gets the client's credentials as sent
    assert chat(http, routing, "plain").status_code == 200
    assert headers_lower(received(alpha, "served-by-alpha")[-1])["authorization"] == f"Bearer {CLIENT_KEY}"


def test_each_fallback_attempt_carries_its_backends_key(
    routing: Proxy, alpha: FakeUpstream, beta: FakeUpstream, http: httpx.Client
) -> None:
    response = chat(http, routing, "fb-keys")
    assert response.status_code == 200
    assert_served_by(response, "default", "landed-keys")
    assert headers_lower(received(beta, "status-503-keyed")[-1])["authorization"] == f"Bearer {BACKEND_KEY}"
    assert headers_lower(received(alpha, "landed-keys")[-1])["authorization"] == f"Bearer {CLIENT_KEY}"


# --- start-up ---------------------------------------------------------------------------------------------


# (MODEL_MAP, UPSTREAMS, the one line the proxy must exit with)
BAD_SETTINGS = [
    (
        {"gpt-4o": {"model": "m", "upstream": "nowhere"}},
        {"big": "http://127.0.0.1:9"},
        "MODEL_MAP: key 'gpt-4o': unknown upstream 'nowhere' (UPSTREAMS names: big, default)",
    ),
    (
        {"/gpt-.*/": ["m", {"model": "n", "upstream": "bigg"}]},
        {"big": "http://127.0.0.1:9"},
        "MODEL_MAP: key '/gpt-.*/': unknown upstream 'bigg' (UPSTREAMS names: big, default)",
    ),
    (
        {"gpt-4o": "m"},
        {"big": {"url": "http://127.0.0.1:9"}},
        "UPSTREAMS: key 'big': unknown key 'url' (allowed: api_key, connect_timeout, read_timeout, urls)",
    ),
]


def test_unknown_backend_fails_start_up() -> None:
    """Exit 2 with one line naming the key, before anything binds; the cases run side by side."""
    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    base.update(UPSTREAM_URL="http://127.0.0.1:9", LISTEN_HOST="127.0.0.1", LISTEN_PORT="0")
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "service"],
            env={
                **base,
                "MODEL_MAP": orjson.dumps(model_map).decode(),
                "UPSTREAMS": orjson.dumps(upstreams).decode(),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        for model_map, upstreams, _ in BAD_SETTINGS
    ]
    try:
        outputs = [run.communicate(timeout=30) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    for run, (out, err), (_, _, message) in zip(runs, outputs, BAD_SETTINGS, strict=True):
        assert run.returncode == 2, err.decode()
        assert err.decode().splitlines() == [f"openai-model-rerouter: {message}"]
        assert out == b""
