"""Tokens, STREAM_USAGE=always, Server-Timing and the proxy's overhead, end to end.

Real proxy processes in front of the fake upstream, driven by the official ``openai`` SDK (sync
and async) and by raw HTTP where bytes are compared with a request straight to the upstream.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import Proxy, Samples, StartProxy, eventually, pick, scrape, total
from tests.fake_upstream import QWEN_USAGE, FakeUpstream

MESSAGES = [{"role": "user", "content": "hi"}]
PROXY_TIMING = re.compile(r"proxy;dur=(\d+\.\d{3})")
WHOLE_TIMING = re.compile(r"proxy;dur=(\d+\.\d{3}), upstream;dur=(\d+\.\d{3})")

Tokens = dict[tuple[str, str, str], float]


def sdk(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key="sk-test", max_retries=0, timeout=15)


def async_sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-test", max_retries=0, timeout=15)


def tokens(samples: Samples) -> Tokens:
    return {
        (labels["source_model"], labels["target_model"], labels["kind"]): value
        for labels, value in pick(samples, "rerouter_tokens_total")
    }


def grown(proxy: Proxy, before: Tokens, expected: Tokens) -> None:
    """Wait until the token counters grew by exactly ``expected`` (the samples are booked just
    after each answer is written)."""

    def check() -> None:
        after = tokens(scrape(proxy))
        grew = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
        assert grew == expected

    eventually(check, 10)


def raw_stream(url: str, body: dict[str, Any]) -> tuple[httpx.Headers, bytes]:
    with httpx.stream("POST", url, content=orjson.dumps(body), timeout=15) as response:
        assert response.status_code == 200
        return response.headers, response.read()


@pytest.fixture(scope="module")
def counting(start_proxy: StartProxy) -> Proxy:
    """STREAM_USAGE at its default (client): streams are counted when the client asks."""
    return start_proxy()


@pytest.fixture(scope="module")
def always(start_proxy: StartProxy) -> Proxy:
    return start_proxy(STREAM_USAGE="always")


# -- tokens from JSON answers ------------------------------------------------------------------


def test_tokens_counted_from_json_answers(counting: Proxy) -> None:
    before = tokens(scrape(counting))
    with sdk(counting) as client:
        chat = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=MESSAGES)  # type: ignore[arg-type]
        text = client.completions.create(model="gpt-4o", prompt="hi")
        client.embeddings.create(model="text-embedding-3-small", input="hi", encoding_format="float")
        response = client.responses.with_raw_response.create(model="gpt-4.1-mini", input="hi")
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 3)
    assert text.usage is not None
    assert response.status_code == 200
    grown(
        counting,
        before,
        {
            ("gpt-3.5-turbo-16k", "qwen3-4b", "prompt"): 3,
            ("gpt-3.5-turbo-16k", "qwen3-4b", "completion"): 3,
            ("gpt-4o", "echo-model", "prompt"): 3,
            ("gpt-4o", "echo-model", "completion"): 3,
            ("text-embedding-3-small", "bge-m3", "prompt"): 4,  # embeddings: no completion series
            ("gpt-4.1-mini", "echo-model", "prompt"): 7,  # Responses API: input_tokens
            ("gpt-4.1-mini", "echo-model", "completion"): 2,  # and output_tokens
        },
    )


def test_error_answers_and_reads_of_stored_answers_count_no_tokens(counting: Proxy) -> None:
    before = tokens(scrape(counting))
    with sdk(counting) as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-ratelimited", messages=MESSAGES)  # type: ignore[arg-type]
    stored = httpx.get(f"{counting.v1}/responses/resp_123", timeout=10)
    assert stored.status_code == 200
    assert httpx.post(f"{counting.v1}/embeddings", json={"model": "x", "input": "y"}).status_code == 200
    grown(counting, before, {("x", "x", "prompt"): 4})


# -- tokens from streams -----------------------------------------------------------------------


def test_tokens_counted_from_the_usage_chunk_a_client_asked_for(counting: Proxy) -> None:
    before = tokens(scrape(counting))
    with sdk(counting) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4-sync-stream",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    async def run() -> list[Any]:
        async with async_sdk(counting) as client:
            stream = await client.completions.create(
                model="gpt-4-async-stream", prompt="hi", stream=True, stream_options={"include_usage": True}
            )
            return [chunk async for chunk in stream]

    async_chunks = asyncio.run(run())
    # The client asked: it gets its usage chunk.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert async_chunks[-1].usage is not None
    grown(
        counting,
        before,
        {
            ("gpt-4-sync-stream", "echo-model", "prompt"): 3,
            ("gpt-4-sync-stream", "echo-model", "completion"): 3,
            ("gpt-4-async-stream", "echo-model", "prompt"): 3,
            ("gpt-4-async-stream", "echo-model", "completion"): 3,
        },
    )


def test_streams_without_usage_count_nothing_by_default(counting: Proxy, upstream: FakeUpstream) -> None:
    before = tokens(scrape(counting))
    with sdk(counting) as client:
        chunks = list(
            client.chat.completions.create(model="gpt-4-no-usage", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        )
    assert all(chunk.usage is None for chunk in chunks)
    assert "stream_options" not in upstream.last("/v1/chat/completions").json()
    samples = scrape(counting)
    assert total(samples, "rerouter_streams_total", target_model="echo-model", outcome="completed") >= 1
    assert tokens(samples) == before


# -- STREAM_USAGE=always -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("chat/completions", {"messages": MESSAGES}, id="chat"),
        pytest.param("completions", {"prompt": "hi"}, id="completions"),
    ],
)
def test_always_counts_a_stream_whose_client_did_not_ask_and_hides_the_chunk(
    always: Proxy, upstream: FakeUpstream, path: str, body: dict[str, Any]
) -> None:
    """The client sees byte for byte what the upstream sends to a request without the option."""
    model = f"qwen3-instruct-always-{path.replace('/', '-')}"
    request = {"model": model, "stream": True, **body}
    _, direct = raw_stream(f"{upstream.url}/v1/{path}", request)
    assert b'"usage"' not in direct
    before = tokens(scrape(always))
    headers, proxied = raw_stream(f"{always.v1}/{path}", request)
    assert upstream.last(f"/v1/{path}").json()["stream_options"] == {"include_usage": True}
    assert proxied == direct
    assert PROXY_TIMING.fullmatch(headers["server-timing"])
    grown(
        always,
        before,
        {
            (model, model, "prompt"): QWEN_USAGE["prompt_tokens"],
            (model, model, "completion"): QWEN_USAGE["completion_tokens"],
        },
    )


def test_always_sdk_clients_see_the_chunks_they_would_see_without_the_proxy(
    always: Proxy, upstream: FakeUpstream
) -> None:
    direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="sk-test", max_retries=0, timeout=15)
    request = {"model": "qwen3-think-sdk", "messages": MESSAGES, "stream": True}
    with direct, sdk(always) as client:
        expected = [chunk.model_dump() for chunk in direct.chat.completions.create(**request)]
        seen = [chunk.model_dump() for chunk in client.chat.completions.create(**request)]

    async def run() -> list[dict[str, Any]]:
        async with async_sdk(always) as client:
            stream = await client.chat.completions.create(**request)
            return [chunk.model_dump() async for chunk in stream]

    assert upstream.last("/v1/chat/completions").json()["stream_options"] == {"include_usage": True}
    assert seen == expected
    assert asyncio.run(run()) == expected
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in seen)


def test_always_gives_a_client_that_asked_its_chunk_unchanged(always: Proxy, upstream: FakeUpstream) -> None:
    request = {
        "model": "qwen3-instruct-asked",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, direct = raw_stream(f"{upstream.url}/v1/chat/completions", request)
    _, proxied = raw_stream(f"{always.v1}/chat/completions", request)
    assert b'"choices": [], "usage"' in direct
    assert proxied == direct


def test_always_merges_with_the_clients_stream_options(always: Proxy, upstream: FakeUpstream) -> None:
    options = {"include_usage": False, "continuous_usage_stats": False}
    request = {
        "model": "qwen3-instruct-merged",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": options,
    }
    _, direct = raw_stream(f"{upstream.url}/v1/chat/completions", request)
    _, proxied = raw_stream(f"{always.v1}/chat/completions", request)
    sent = upstream.last("/v1/chat/completions").json()
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert proxied == direct


def test_always_leaves_non_streamed_requests_as_they_came(always: Proxy, upstream: FakeUpstream) -> None:
    raw = b'{"model": "qwen3-instruct-whole",  "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(
        f"{always.v1}/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=15
    )
    assert response.status_code == 200
    assert upstream.last("/v1/chat/completions").body == raw


def test_time_per_output_token_from_a_paced_stream(always: Proxy) -> None:
    """Five events 100 ms apart and five completion tokens: 0.4 s over 4 intervals."""
    labels = {"target_model": "paced-5x100"}
    before = total(scrape(always), "rerouter_time_per_output_token_seconds_count", **labels)
    with sdk(always) as client:
        chunks = list(client.chat.completions.create(model="paced-5x100", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    assert [chunk.usage for chunk in chunks] == [None] * 5

    def observed() -> Samples:
        samples = scrape(always)
        assert total(samples, "rerouter_time_per_output_token_seconds_count", **labels) == before + 1
        return samples

    samples = eventually(observed, 10)
    assert 0.05 < total(samples, "rerouter_time_per_output_token_seconds_sum", **labels) < 1.0
    assert tokens(samples)[("paced-5x100", "paced-5x100", "completion")] == 5


# -- Server-Timing and the overhead histogram ---------------------------------------------------


def test_server_timing_on_json_answers(counting: Proxy) -> None:
    with sdk(counting) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert WHOLE_TIMING.fullmatch(raw.headers["server-timing"])
    # The upstream's own time is not the proxy's: two seconds upstream, far less in the proxy.
    slow = httpx.post(
        f"{counting.v1}/chat/completions", json={"model": "paced-3x1000", "messages": MESSAGES}, timeout=30
    )
    assert slow.status_code == 200
    timing = WHOLE_TIMING.fullmatch(slow.headers["server-timing"])
    assert timing is not None
    proxy_ms, upstream_ms = (float(value) for value in timing.groups())
    assert upstream_ms >= 1900
    assert proxy_ms < upstream_ms / 2


def test_server_timing_on_streams_errors_and_model_lists(counting: Proxy) -> None:
    with sdk(counting) as client:
        stream = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )  # type: ignore[arg-type]
        assert PROXY_TIMING.fullmatch(stream.headers["server-timing"])
        list(stream.parse())
    bad = httpx.post(
        f"{counting.v1}/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
    assert PROXY_TIMING.fullmatch(bad.headers["server-timing"])  # never went upstream
    limited = httpx.post(
        f"{counting.v1}/chat/completions", json={"model": "gpt-ratelimited", "messages": MESSAGES}
    )
    assert limited.status_code == 429
    assert WHOLE_TIMING.fullmatch(limited.headers["server-timing"])
    models = httpx.get(f"{counting.v1}/models", timeout=10)
    assert WHOLE_TIMING.fullmatch(models.headers["server-timing"])


def test_overhead_histogram_counts_every_proxied_request(start_proxy: StartProxy) -> None:
    proxy = start_proxy()
    try:
        with sdk(proxy) as client:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
            client.embeddings.create(model="text-embedding-3-small", input="x", encoding_format="float")
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-ratelimited", messages=MESSAGES)  # type: ignore[arg-type]
            client.models.list()
        bad = httpx.post(
            f"{proxy.v1}/chat/completions", content=b"[", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        # A client that leaves in the middle of a stream (499) is counted too.
        body = orjson.dumps({"model": "gpt-slow", "stream": True, "messages": MESSAGES})
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")

        def settled() -> Samples:
            samples = scrape(proxy)
            assert total(samples, "rerouter_requests_total") == 7
            assert total(samples, "rerouter_requests_total", status_code="499") == 1
            return samples

        samples = eventually(settled, 15)
    finally:
        proxy.stop()
    assert total(samples, "rerouter_proxy_overhead_seconds_count") == 7
    by_endpoint = {
        labels["endpoint"]: value for labels, value in pick(samples, "rerouter_proxy_overhead_seconds_count")
    }
    assert by_endpoint == {"chat/completions": 5, "embeddings": 1, "models": 1}
    buckets = sorted(
        float(labels["le"])
        for labels, _ in pick(samples, "rerouter_proxy_overhead_seconds_bucket", endpoint="models")
    )
    assert buckets[0] == 0.00005
    assert buckets[-2] == 0.05
