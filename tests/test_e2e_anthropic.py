"""Anthropic-API clients (``POST /v1/messages``) through the proxy, with the official ``anthropic``
SDK, sync and async, streamed and not, against the aiohttp fake's Messages server."""

from __future__ import annotations

import asyncio
import json
import os

import anthropic
import httpx
import orjson
import pytest

from tests.conftest import DEFAULT_MAP, Proxy, StartProxy, eventually, scrape, total
from tests.fake_upstream import FakeUpstream

KEY = "sk-ant-proxy"
MAP = {**DEFAULT_MAP, "/claude-.*/": "qwen3-4b", "claude-linger": "linger-1500"}
MESSAGES = [{"role": "user", "content": "Wetter in Köln?"}]


@pytest.fixture(scope="module")
def messages_proxy(start_proxy: StartProxy) -> Proxy:
    return start_proxy(
        MODEL_MAP=json.dumps(MAP),
        PROXY_API_KEYS=KEY,
        MODEL_PARAMS=json.dumps({"qwen3-4b": {"defaults": {"top_k": 20}}}),
        DISABLE_THINKING="true",
        THINKING_SWITCH="both",
    )


def client(proxy: Proxy, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, timeout=10)


def requests_total(proxy: Proxy, **labels: str) -> float:
    return total(scrape(proxy), "rerouter_requests_total", **labels)


def test_sdk_message_is_rewritten_and_labelled(messages_proxy: Proxy, upstream: FakeUpstream) -> None:
    before = requests_total(messages_proxy, endpoint="messages", status_code="200")
    message = client(messages_proxy).messages.create(model="claude-x", max_tokens=64, messages=MESSAGES)
    assert message.content[0].type == "text"
    assert message.content[0].text == "reply from qwen3-4b"
    sent = upstream.last("/v1/messages")
    body = sent.json()
    assert body["model"] == "qwen3-4b"
    assert body["top_k"] == 20  # MODEL_PARAMS
    assert (
        body["messages"][0]["content"] == "Wetter in Köln? /no_think"
    )  # the suffix switch, no template flag
    assert "chat_template_kwargs" not in body
    # This SDK sends its key as a Bearer token to a base_url of its own; without UPSTREAM_API_KEY
    # the client's credential goes on.
    assert sent.headers["Authorization"] == f"Bearer {KEY}"

    def counted() -> None:
        assert requests_total(messages_proxy, endpoint="messages", status_code="200") == before + 1

    eventually(counted, 5)


def test_sdk_stream_sync_and_async(messages_proxy: Proxy) -> None:
    with client(messages_proxy).messages.stream(model="claude-y", max_tokens=64, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "reply from qwen3-4b"
        assert stream.get_final_message().stop_reason == "end_turn"

    async def run() -> str:
        async with (
            anthropic.AsyncAnthropic(
                base_url=messages_proxy.url, api_key=KEY, max_retries=0, timeout=10
            ) as sdk,
            sdk.messages.stream(model="claude-y", max_tokens=64, messages=MESSAGES) as stream,
        ):
            return "".join([text async for text in stream.text_stream])

    assert asyncio.run(run()) == "reply from qwen3-4b"


def test_stream_bytes_are_the_upstreams(messages_proxy: Proxy, upstream: FakeUpstream) -> None:
    """Sent as Claude Code does, the key in ``x-api-key`` only."""
    body = {
        "model": "qwen3-4b",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi /no_think"}],
        "stream": True,
    }
    direct = httpx.post(f"{upstream.url}/v1/messages", json=body, timeout=10).content
    with httpx.stream(
        "POST", f"{messages_proxy.v1}/messages", json=body, headers={"x-api-key": KEY}
    ) as response:
        assert response.status_code == 200
        relayed = b"".join(response.iter_raw())
    assert relayed == direct
    assert relayed.startswith(b"event: message_start\ndata: ")
    assert relayed.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_stream_left_after_message_stop_is_completed(messages_proxy: Proxy) -> None:
    """The upstream lingers 1.5 s after message_stop; a client that closes at it completed the stream."""
    rid = f"ant-{os.urandom(4).hex()}"
    body = {"model": "claude-linger", "max_tokens": 8, "messages": MESSAGES, "stream": True}
    headers = {"x-api-key": KEY, "x-request-id": rid}
    with httpx.stream(
        "POST", f"{messages_proxy.v1}/messages", json=body, headers=headers, timeout=10
    ) as response:
        received = b""
        for piece in response.iter_raw():
            received += piece
            if b"message_stop" in received and received.endswith(b"\n\n"):
                break

    logged = messages_proxy.request_event(rid)
    assert (logged["status"], logged["outcome"], logged["endpoint"]) == (200, "completed", "messages")


def test_wrong_key_is_an_anthropic_authentication_error(
    messages_proxy: Proxy, upstream: FakeUpstream
) -> None:
    seen = len(upstream.requests)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(messages_proxy, key="sk-wrong").messages.create(
            model="claude-x", max_tokens=8, messages=MESSAGES
        )
    assert caught.value.status_code == 401
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert len(upstream.requests) == seen


def test_proxy_errors_on_the_messages_path_are_anthropic_shaped(messages_proxy: Proxy) -> None:
    response = httpx.post(
        f"{messages_proxy.v1}/messages",
        content=b"{not json",
        headers={"x-api-key": KEY, "content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"type", "error"}
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error"


def test_upstream_errors_are_relayed_as_they_came(messages_proxy: Proxy) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        client(messages_proxy).messages.create(model="status-429", max_tokens=8, messages=MESSAGES)
    assert caught.value.body == {"type": "error", "error": {"type": "api_error", "message": "told to fail"}}


def test_count_tokens_is_its_own_endpoint(messages_proxy: Proxy, upstream: FakeUpstream) -> None:
    before = requests_total(messages_proxy, endpoint="messages/count_tokens")
    counted = client(messages_proxy).messages.count_tokens(model="claude-x", messages=MESSAGES)
    assert counted.input_tokens == 7
    assert upstream.last("/v1/messages/count_tokens").json()["model"] == "qwen3-4b"

    def counted() -> None:
        assert requests_total(messages_proxy, endpoint="messages/count_tokens") == before + 1

    eventually(counted, 5)


def test_upstream_key_replaces_the_clients_x_api_key(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    """With UPSTREAM_API_KEY the client's key never reaches the upstream, in any header."""
    proxy = start_proxy(PROXY_API_KEYS=KEY, UPSTREAM_API_KEY="sk-upstream", MODEL_MAP=json.dumps(MAP))
    client(proxy).messages.create(model="claude-x", max_tokens=8, messages=MESSAGES)
    sent = {name.lower(): value for name, value in upstream.last("/v1/messages").headers.items()}
    assert sent["x-api-key"] == "sk-upstream"
    assert sent["authorization"] == "Bearer sk-upstream"
    assert KEY not in orjson.dumps(sent).decode()


def test_response_model_requested_names_the_clients_model(start_proxy: StartProxy) -> None:
    proxy = start_proxy(RESPONSE_MODEL="requested", MODEL_MAP=json.dumps(MAP))
    sdk = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0, timeout=10)
    assert sdk.messages.create(model="claude-x", max_tokens=8, messages=MESSAGES).model == "claude-x"
    with sdk.messages.stream(model="claude-x", max_tokens=8, messages=MESSAGES) as stream:
        assert stream.get_final_message().model == "claude-x"
