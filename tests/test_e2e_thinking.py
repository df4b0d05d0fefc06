"""Thinking control end to end: DISABLE_THINKING, THINKING_SWITCH and THINK_OUTPUT.

The proxy runs as a real process in front of the fake upstream's Qwen3-like model
(``qwen3-think...``), which answers with an empty think block when told not to think and a full
one otherwise, and streams its text in pieces that cut the tags across events. Clients are the
official ``openai`` SDK (sync and async) and, for byte checks, raw httpx. Each configuration is
one proxy process shared by the tests of its section.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import OPTIONS
from tests.conftest import Proxy, StartProxy
from tests.fake_upstream import (
    QWEN_EMPTY_THINK,
    QWEN_FULL_THINK,
    QWEN_ID,
    QWEN_REASONING,
    QWEN_TEXT_ID,
    FakeUpstream,
    qwen_answer,
)

API_KEY = "sk-thinking-e2e"
TIMEOUT = 10
QWEN = "qwen3-think-8b"
ORG_QWEN = "org/qwen3-think-8b"  # a Qwen3 too, but /qwen3-think.*/ does not match the whole id
MODEL_MAP = {"gpt-4o": QWEN, "gpt-org": ORG_QWEN, "gpt-echo": "echo-model"}
QUESTION = "What is the capital of France?"
PROMPT = "The capital of France is"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DONE = b"data: [DONE]\n\n"
MODES = ["sync", "async"]
ENDPOINTS = [pytest.param(True, id="chat"), pytest.param(False, id="completions")]
STREAMING = [pytest.param(False, id="whole"), pytest.param(True, id="stream")]


def start(start_proxy: StartProxy, **env: str) -> Proxy:
    """A proxy with this module's map; thinking settings not given are unset, whatever the shell has."""
    settings: dict[str, str | None] = {
        "DISABLE_THINKING": None,
        "THINKING_SWITCH": None,
        "THINK_OUTPUT": None,
        "SHUTDOWN_GRACE": "0",  # no drain pause when the session stops it
    }
    return start_proxy(MODEL_MAP=orjson.dumps(MODEL_MAP).decode(), **{**settings, **env})


# --- clients -----------------------------------------------------------------------------------


@dataclass
class Answer:
    """What a client got, per choice index, from a whole response or all chunks of a stream."""

    ids: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    roles: dict[int, str] = field(default_factory=dict)
    content: dict[int, str] = field(default_factory=dict)
    reasoning: dict[int, str] = field(default_factory=dict)
    reasoning_pieces: int = 0
    finish: dict[int, str] = field(default_factory=dict)
    usage: Any = None

    def take(self, result: Any, chat: bool, whole: bool) -> None:
        self.ids.add(result.id)
        self.models.add(result.model)
        self.usage = result.usage or self.usage
        for choice in result.choices:
            holder = (choice.message if whole else choice.delta) if chat else choice
            text = holder.content if chat else holder.text
            self.content[choice.index] = self.content.get(choice.index, "") + (text or "")
            if chat and holder.role:
                self.roles[choice.index] = holder.role
            reasoning = getattr(holder, "reasoning_content", None)
            if reasoning:
                self.reasoning[choice.index] = self.reasoning.get(choice.index, "") + reasoning
                self.reasoning_pieces += 1
            if choice.finish_reason:
                self.finish[choice.index] = choice.finish_reason


def request_for(chat: bool, stream: bool, **kwargs: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 64}
    if chat:
        request["messages"] = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": QUESTION},
        ]
    else:
        request["prompt"] = PROMPT
    if stream:
        request |= {"stream": True, "stream_options": {"include_usage": True}}
    return {**request, **kwargs}


def ask(proxy: Proxy, mode: str, chat: bool, stream: bool = False, **kwargs: Any) -> Answer:
    """One request through the official SDK (``mode`` sync or async); ``kwargs`` override."""
    request = request_for(chat, stream, **kwargs)
    if mode == "sync":
        return _ask_sync(proxy, chat, request)
    return asyncio.run(_ask_async(proxy, chat, request))


def _ask_sync(proxy: Proxy, chat: bool, request: dict[str, Any]) -> Answer:
    answer = Answer()
    with openai.OpenAI(base_url=proxy.v1, api_key=API_KEY, max_retries=0, timeout=TIMEOUT) as client:
        create: Callable[..., Any] = client.chat.completions.create if chat else client.completions.create
        if not request.get("stream"):
            answer.take(create(**request), chat, whole=True)
            return answer
        with create(**request) as stream:
            for chunk in stream:
                answer.take(chunk, chat, whole=False)
    return answer


async def _ask_async(proxy: Proxy, chat: bool, request: dict[str, Any]) -> Answer:
    answer = Answer()
    async with openai.AsyncOpenAI(
        base_url=proxy.v1, api_key=API_KEY, max_retries=0, timeout=TIMEOUT
    ) as client:
        create: Callable[..., Any] = client.chat.completions.create if chat else client.completions.create
        if not request.get("stream"):
            answer.take(await create(**request), chat, whole=True)
            return answer
        stream = await create(**request)
        async with stream:
            async for chunk in stream:
                answer.take(chunk, chat, whole=False)
    return answer


def post_raw(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """POST these exact bytes and read the whole answer, streamed or not."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream("POST", url, content=body, headers=headers) as response,
    ):
        return response.status_code, dict(response.headers), response.read()


def sse_events(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n\n"), data[-200:]
    return [event + b"\n\n" for event in data[:-2].split(b"\n\n")]


def sse_chunks(data: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a stream that must end with [DONE] (and carry nothing after it)."""
    events = sse_events(data)
    assert events[-1] == DONE
    assert all(event.startswith(b"data: {") for event in events[:-1]), events
    return [orjson.loads(event.removeprefix(b"data: ")) for event in events[:-1]]


def seen_by_upstream(upstream: FakeUpstream, chat: bool) -> dict[str, Any]:
    return upstream.last(CHAT if chat else COMPLETIONS).json()


def user_text(seen: dict[str, Any], chat: bool) -> str:
    return seen["messages"][-1]["content"] if chat else seen["prompt"]


def answers(model: str, n: int = 1, think: str = "") -> dict[int, str]:
    return {index: think + qwen_answer(model, index) for index in range(n)}


# --- DISABLE_THINKING=true: default switch (suffix) and output (strip) ---------------------------


@pytest.fixture(scope="module")
def disabled(start_proxy: StartProxy) -> Proxy:
    return start(start_proxy, DISABLE_THINKING="true")


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_disabled_whole_answers_are_exactly_the_answer(
    disabled: Proxy, upstream: FakeUpstream, mode: str, chat: bool
) -> None:
    answer = ask(disabled, mode, chat, n=2, temperature=0.5)

    assert answer.content == answers(QWEN, 2)
    assert answer.reasoning == {}
    assert answer.ids == {QWEN_ID if chat else QWEN_TEXT_ID}
    assert answer.models == {QWEN}
    assert answer.finish == {0: "stop", 1: "stop"}
    assert answer.roles == ({0: "assistant", 1: "assistant"} if chat else {})
    assert answer.usage is not None
    assert answer.usage.total_tokens == 14
    seen = seen_by_upstream(upstream, chat)
    assert user_text(seen, chat) == f"{QUESTION if chat else PROMPT} /no_think"
    assert "chat_template_kwargs" not in seen
    assert (seen["model"], seen["n"], seen["temperature"]) == (QWEN, 2, 0.5)
    if chat:
        assert seen["messages"][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_disabled_streams_are_exactly_the_answer(
    disabled: Proxy, upstream: FakeUpstream, mode: str, chat: bool, n: int
) -> None:
    answer = ask(disabled, mode, chat, stream=True, n=n)

    assert answer.content == answers(QWEN, n)
    assert answer.reasoning == {}
    assert answer.ids == {QWEN_ID if chat else QWEN_TEXT_ID}
    assert answer.models == {QWEN}
    assert answer.finish == dict.fromkeys(range(n), "stop")
    assert answer.roles == (dict.fromkeys(range(n), "assistant") if chat else {})
    assert answer.usage is not None
    assert answer.usage.total_tokens == 14
    seen = seen_by_upstream(upstream, chat)
    assert user_text(seen, chat) == f"{QUESTION if chat else PROMPT} /no_think"
    assert seen["stream"] is True


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_disabled_stream_bytes_are_clean_sse_ending_in_done(
    disabled: Proxy, upstream: FakeUpstream, chat: bool
) -> None:
    """Raw bytes: no tag fragment anywhere, and the events the filter leaves alone (role,
    finish_reason, usage, [DONE]) are the upstream's own bytes."""
    body = orjson.dumps(request_for(chat, stream=True, n=2))
    path = CHAT if chat else COMPLETIONS
    status, headers, data = post_raw(disabled.v1 + path.removeprefix("/v1"), body)

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    forwarded = upstream.last(path)
    assert forwarded.headers["Accept-Encoding"] == "identity"
    for fragment in (b"<th", b"ink>", b"</", b"think>", b"Let me"):
        assert fragment not in data
    chunks = sse_chunks(data)
    key = "delta" if chat else None
    text: dict[int, str] = {}
    for chunk in chunks:
        assert chunk["id"] == (QWEN_ID if chat else QWEN_TEXT_ID)
        for choice in chunk["choices"]:
            holder = choice[key] if key else choice
            text[choice["index"]] = text.get(choice["index"], "") + holder.get(
                "content" if chat else "text", ""
            )
    assert text == answers(QWEN, 2)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 14

    _, _, direct = post_raw(upstream.url + path, forwarded.body)
    untouched = [event for event in sse_events(direct) if event == DONE or _says_no_text(event)]
    assert len(untouched) == (2 if chat else 0) + 2 + 1 + 1  # roles, finish_reasons, usage, [DONE]
    relayed = sse_events(data)
    assert [event for event in relayed if event in untouched] == untouched


def _says_no_text(event: bytes) -> bool:
    """A role, finish_reason or usage event: nothing in it for a think filter to change."""
    chunk = orjson.loads(event.removeprefix(b"data: "))
    texts = [c.get("delta", {}).get("content") or c.get("text") for c in chunk["choices"]]
    return not any(texts)


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("model", ["echo-model", "qwen3-instruct-8b"])
def test_an_answer_without_tags_is_relayed_byte_for_byte(
    disabled: Proxy, upstream: FakeUpstream, model: str, chat: bool, stream: bool
) -> None:
    """DISABLE_THINKING=true strips every model's answers, but one with no think block comes out
    exactly as the upstream sent it, spaced JSON and all (nothing re-encoded)."""
    body = orjson.dumps(request_for(chat, stream, model=model, n=2))
    path = CHAT if chat else COMPLETIONS
    status, headers, data = post_raw(disabled.v1 + path.removeprefix("/v1"), body)

    assert status == 200
    forwarded = upstream.last(path)
    assert forwarded.json()["model"] == model
    assert user_text(forwarded.json(), chat).endswith(" /no_think")
    assert forwarded.headers["Accept-Encoding"] == "identity"
    direct_status, direct_headers, direct = post_raw(upstream.url + path, forwarded.body)
    assert direct_status == 200
    assert data == direct
    assert headers["content-type"] == direct_headers["content-type"]
    if stream:
        assert data.endswith(DONE)
        assert len(sse_chunks(data)) >= 3


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_disabled_whole_answer_of_unknown_length_is_stripped_too(
    disabled: Proxy, upstream: FakeUpstream, chat: bool
) -> None:
    """A non-streamed JSON answer sent chunked (no Content-Length, as Go servers such as Ollama do
    for bodies over 2 KB) is as much a whole answer as one with a length."""
    model = "qwen3-think-chunked"
    answer = ask(disabled, "sync" if chat else "async", chat, model=model)

    assert user_text(seen_by_upstream(upstream, chat), chat).endswith(" /no_think")
    assert answer.content == answers(model)


# --- THINK_OUTPUT=reasoning, DISABLE_THINKING=false ----------------------------------------------


@pytest.fixture(scope="module")
def reasoning(start_proxy: StartProxy) -> Proxy:
    return start(start_proxy, DISABLE_THINKING="false", THINK_OUTPUT="reasoning")


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_reasoning_output_moves_the_block_to_reasoning_content(
    reasoning: Proxy, upstream: FakeUpstream, mode: str, chat: bool, stream: bool
) -> None:
    """An explicit THINK_OUTPUT applies although thinking was not switched off for the model."""
    answer = ask(reasoning, mode, chat, stream=stream)

    assert answer.content == answers(QWEN)
    assert answer.reasoning == {0: QWEN_REASONING}
    if stream:
        assert answer.reasoning_pieces > 1, "reasoning is streamed as it comes, not held to the end"
        assert answer.usage is not None
    assert answer.finish == {0: "stop"}
    seen = seen_by_upstream(upstream, chat)
    assert user_text(seen, chat) == (QUESTION if chat else PROMPT)
    assert "/no_think" not in orjson.dumps(seen).decode()
    assert "chat_template_kwargs" not in seen


def test_reasoning_message_field_as_the_sdk_shows_it(reasoning: Proxy) -> None:
    with openai.OpenAI(base_url=reasoning.v1, api_key=API_KEY, max_retries=0, timeout=TIMEOUT) as client:
        completion = client.chat.completions.create(**request_for(True, stream=False))
    message = completion.choices[0].message
    assert message.content == qwen_answer(QWEN, 0)
    assert message.model_extra is not None
    assert message.model_extra["reasoning_content"] == QWEN_REASONING


def test_reasoning_output_leaves_answers_without_a_block_alone(reasoning: Proxy) -> None:
    answer = ask(reasoning, "sync", True, stream=True, model="gpt-echo")
    assert answer.content == {0: "reply from echo-model"}
    assert answer.reasoning == {}


# --- DISABLE_THINKING=/qwen3-think.*/: the whole TARGET id must match ----------------------------


@pytest.fixture(scope="module")
def scoped(start_proxy: StartProxy) -> Proxy:
    return start(start_proxy, DISABLE_THINKING="/qwen3-think.*/")


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("mode", MODES)
def test_scope_matches_the_target_not_the_requested_model(
    scoped: Proxy, upstream: FakeUpstream, mode: str, stream: bool
) -> None:
    answer = ask(scoped, mode, True, stream=stream, model="gpt-4o")

    assert answer.content == answers(QWEN)
    assert upstream.last(CHAT).json()["messages"][-1]["content"] == f"{QUESTION} /no_think"


@pytest.mark.parametrize("stream", STREAMING)
def test_scope_is_a_whole_id_match(scoped: Proxy, upstream: FakeUpstream, stream: bool) -> None:
    """``org/qwen3-think-8b`` contains a match but is not one: no switch, and (output left at its
    default) the think block reaches the client as the model wrote it."""
    answer = ask(scoped, "sync", True, stream=stream, model="gpt-org")

    assert answer.content == answers(ORG_QWEN, think=QWEN_FULL_THINK)
    seen = upstream.last(CHAT)
    assert seen.json()["messages"][-1]["content"] == QUESTION
    assert seen.headers.get("Accept-Encoding") != "identity"


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_scope_forwards_other_targets_byte_for_byte(
    scoped: Proxy, upstream: FakeUpstream, chat: bool
) -> None:
    if chat:
        raw = b'{ "model" :"echo-model",\n\t"messages": [ {"role":"user",  "content":"hi"} ] ,"n" : 1 }'
    else:
        raw = b'{\n  "model":   "echo-model" , "prompt" :"hi",\t"max_tokens":\n5}'
    path = CHAT if chat else COMPLETIONS
    status, _, data = post_raw(scoped.v1 + path.removeprefix("/v1"), raw)

    assert status == 200
    assert upstream.last(path).body == raw
    assert orjson.loads(data)["model"] == "echo-model"


# --- THINKING_SWITCH=template ------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(start_proxy: StartProxy) -> Proxy:
    return start(start_proxy, DISABLE_THINKING="true", THINKING_SWITCH="template")


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("mode", MODES)
def test_template_switch_merges_with_the_clients_kwargs(
    template: Proxy, upstream: FakeUpstream, mode: str, stream: bool
) -> None:
    extra = {"chat_template_kwargs": {"foo": 1}, "top_k": 20}
    answer = ask(template, mode, True, stream=stream, extra_body=extra)

    assert answer.content == answers(QWEN)
    seen = upstream.last(CHAT).json()
    assert seen["chat_template_kwargs"] == {"foo": 1, "enable_thinking": False}
    assert seen["top_k"] == 20
    assert seen["messages"][-1]["content"] == QUESTION


@pytest.mark.parametrize("mode", MODES)
def test_template_switch_adds_nothing_to_completions(
    template: Proxy, upstream: FakeUpstream, mode: str
) -> None:
    """Completions have no template: nothing is added, yet the output is still stripped."""
    answer = ask(template, mode, False, stream=mode == "async")

    assert answer.content == answers(QWEN)
    seen = upstream.last(COMPLETIONS).json()
    assert seen["prompt"] == PROMPT
    assert "chat_template_kwargs" not in seen


def test_template_switch_keeps_completion_bytes(template: Proxy, upstream: FakeUpstream) -> None:
    raw = b'{ "model":"qwen3-think-8b",  "prompt" : "The capital of France is" }'
    status, _, data = post_raw(template.v1 + "/completions", raw)

    assert status == 200
    assert upstream.last(COMPLETIONS).body == raw
    assert orjson.loads(data)["choices"][0]["text"] == qwen_answer(QWEN, 0)


# --- THINKING_SWITCH=both with THINK_OUTPUT=keep -----------------------------------------------


@pytest.fixture(scope="module")
def both_keep(start_proxy: StartProxy) -> Proxy:
    return start(start_proxy, DISABLE_THINKING="true", THINKING_SWITCH="both", THINK_OUTPUT="keep")


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_both_switches_and_the_block_kept(
    both_keep: Proxy, upstream: FakeUpstream, mode: str, chat: bool, stream: bool
) -> None:
    extra = {"chat_template_kwargs": {"foo": 1}} if chat else {}
    answer = ask(both_keep, mode, chat, stream=stream, extra_body=extra)

    assert answer.content == answers(QWEN, think=QWEN_EMPTY_THINK)
    assert answer.reasoning == {}
    seen = seen_by_upstream(upstream, chat)
    assert user_text(seen, chat) == f"{QUESTION if chat else PROMPT} /no_think"
    if chat:
        assert seen["chat_template_kwargs"] == {"foo": 1, "enable_thinking": False}
    else:
        assert "chat_template_kwargs" not in seen


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("chat", ENDPOINTS)
def test_keep_relays_the_upstreams_bytes(
    both_keep: Proxy, upstream: FakeUpstream, chat: bool, stream: bool
) -> None:
    body = orjson.dumps(request_for(chat, stream, n=2))
    path = CHAT if chat else COMPLETIONS
    status, _, data = post_raw(both_keep.v1 + path.removeprefix("/v1"), body)

    assert status == 200
    assert b"<think>" in data or (b'"<th"' in data and b'"think>"' in data)
    forwarded = upstream.last(path)
    assert forwarded.json()["model"] == QWEN
    _, _, direct = post_raw(upstream.url + path, forwarded.body)
    assert data == direct


# --- metrics -----------------------------------------------------------------------------------


def stripped_total(proxy: Proxy, target: str) -> float:
    with httpx.Client(timeout=TIMEOUT) as client:
        text = client.get(f"{proxy.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rerouter_thinking_stripped_total" and sample.labels.get("target_model") == target
    )


def test_stripped_blocks_are_counted_per_target(disabled: Proxy) -> None:
    before = {model: stripped_total(disabled, model) for model in (QWEN, "echo-model")}
    ask(disabled, "sync", True, n=2)  # 2
    ask(disabled, "sync", True, stream=True, n=2)  # 2
    ask(disabled, "async", False)  # 1
    ask(disabled, "async", False, stream=True)  # 1
    ask(disabled, "sync", True, stream=True, model="gpt-echo")  # no block: 0

    deadline = time.monotonic() + 10  # a stream's metrics land just after its last byte
    while stripped_total(disabled, QWEN) - before[QWEN] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stripped_total(disabled, QWEN) - before[QWEN] == 6
    assert stripped_total(disabled, "echo-model") == before["echo-model"] == 0


# --- invalid settings --------------------------------------------------------------------------


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A port already listened on: a proxy that accepted its settings would fail differently."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param(("DISABLE_THINKING", "/(/"), id="regex"),
        pytest.param(("THINKING_SWITCH", "x"), id="switch"),
        pytest.param(("THINK_OUTPUT", "x"), id="output"),
    ],
)
def test_invalid_thinking_setting_exits_2_naming_it(occupied_port: int, setting: tuple[str, str]) -> None:
    name, value = setting
    names = {option.env for option in OPTIONS} | {"PROMETHEUS_MULTIPROC_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env |= {
        "UPSTREAM_URL": "http://127.0.0.1:9",
        "LISTEN_HOST": "127.0.0.1",
        "LISTEN_PORT": str(occupied_port),
        name: value,
    }
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"openai-model-rerouter: {name}: "), line
    assert result.stdout == ""
