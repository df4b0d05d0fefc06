"""The demo behind `make run` is a faithful OpenAI-compatible server: real clients (the openai SDK
sync and async, LangChain, litellm) work through the proxy in --demo mode, as a newcomer runs it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service import demo
from tests.conftest import Proxy, free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
REPLY = "Hello from demo-qwen3-4b, the demo upstream: the proxy sent your request here."
HI = [{"role": "user", "content": "hi"}]


def _start(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "proxy.log"
    full_env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "UPSTREAM_URL")}
    full_env.update(LISTEN_HOST="127.0.0.1", LISTEN_PORT=str(port), SHUTDOWN_GRACE="0", **env)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--demo"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    proxy = Proxy(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until_healthy(proxy.url, process, log_path, 1)
        yield proxy.v1
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start(tmp_path_factory)


@pytest.fixture(scope="module")
def no_thinking_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start(tmp_path_factory, DISABLE_THINKING="true")


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


def test_chat_answer_carries_usage_finish_reason_and_a_think_block(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=HI)  # type: ignore[arg-type]
    assert reply.model == "demo-qwen3-4b"
    (choice,) = reply.choices
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    assert choice.message.content.startswith("<think>\n")
    assert choice.message.content.endswith("</think>\n\n" + REPLY)
    assert reply.usage is not None
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 1


@pytest.mark.parametrize("include_usage", [True, False])
def test_sync_stream_ends_with_a_finish_reason_chunk_and_usage_only_when_asked(
    client: openai.OpenAI, include_usage: bool
) -> None:
    whole = client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=HI,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    chunks = list(stream)
    if include_usage:
        *chunks, last = chunks
        assert last.choices == []
        assert last.usage is not None
        assert last.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content


def test_async_client_streams_chat_and_completions(base_url: str) -> None:
    async def run() -> tuple[str, list[str | None], str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(model="gpt-3.5-turbo-16k", messages=HI, stream=True)  # type: ignore[arg-type]
            chat = [chunk async for chunk in stream]
            completion = await sdk.completions.create(model="gpt-4-turbo", prompt="Say hi", stream=True)
            texts = [chunk async for chunk in completion]
        return (
            "".join(c.choices[0].delta.content or "" for c in chat),
            [c.choices[0].finish_reason for c in texts],
            "".join(c.choices[0].text for c in texts),
        )

    chat, finishes, text = asyncio.run(asyncio.wait_for(run(), 60))
    assert chat.endswith(REPLY)
    assert finishes[-1] == "stop"
    assert text.endswith(REPLY)


def test_completions_answer_carries_text_and_usage(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="gpt-3.5-turbo-16k", prompt="Say hi")
    assert reply.object == "text_completion"
    assert reply.choices[0].text.endswith(REPLY)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 2


def test_embeddings_in_floats_and_base64_agree(client: openai.OpenAI) -> None:
    # The SDK asks for base64 unless told otherwise and decodes it; floats come as a JSON list.
    packed = client.embeddings.create(model="text-embedding-3-small", input=["hi", "there"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["hi", "there"], encoding_format="float"
    )
    assert packed.model == floats.model == "demo-bge-m3"
    assert [d.index for d in packed.data] == [0, 1]
    for a, b in zip(packed.data, floats.data, strict=True):
        assert len(a.embedding) == demo.EMBEDDING_SIZE
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert packed.data[0].embedding != packed.data[1].embedding
    assert packed.usage.prompt_tokens == 2


def test_every_listed_model_can_be_retrieved(client: openai.OpenAI) -> None:
    listed = [model.id for model in client.models.list()]
    assert set(listed) >= {*demo.MODELS, "gpt-3.5-turbo-16k", "text-embedding-3-small"}
    for model_id in listed:
        assert client.models.retrieve(model_id).id == model_id


def test_unknown_paths_and_models_get_openai_shaped_404s(base_url: str, client: openai.OpenAI) -> None:
    answer = httpx.post(f"{base_url}/no/such/endpoint", json={"model": "gpt-4o"}, timeout=10)
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["code"] == "unknown_url"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    bad = httpx.post(f"{base_url}/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400
    assert "error" in bad.json()


def test_disable_thinking_switches_the_demo_model_off_and_strips_the_block(no_thinking_url: str) -> None:
    with openai.OpenAI(base_url=no_thinking_url, api_key="unused", max_retries=0, timeout=30) as sdk:
        reply = sdk.chat.completions.create(model="gpt-3.5-turbo-16k", messages=HI)  # type: ignore[arg-type]
        stream = sdk.chat.completions.create(model="gpt-3.5-turbo-16k", messages=HI, stream=True)  # type: ignore[arg-type]
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    expected = REPLY + " Thinking was switched off (/no_think)."
    assert reply.choices[0].message.content == expected
    assert streamed == expected


@pytest.mark.parametrize(
    ("body", "switch"),
    [
        ({"messages": HI}, None),
        ({"messages": [{"role": "user", "content": "hi /no_think"}]}, "/no_think"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x /no_think"}]}]}, "/no_think"),
        ({"messages": HI, "chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        ({"prompt": "hi /no_think"}, "/no_think"),
        ({"prompt": ["hi /no_think"]}, "/no_think"),
    ],
)
def test_demo_model_reads_both_thinking_switches(body: dict[str, Any], switch: str | None) -> None:
    text = demo.answer_text("m", body)
    if switch is None:
        assert text.startswith("<think>\nThe client")
    elif switch == "/no_think":
        assert text.startswith("<think>\n\n</think>\n\nHello from m")
    else:
        assert text.startswith("Hello from m")  # the template closes the block in the prompt
    assert "".join(demo.pieces(text)) == text


def test_langchain_chat_and_embeddings(base_url: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        model="gpt-3.5-turbo-16k", base_url=base_url, api_key="unused", timeout=30
    )
    message = chat.invoke("hi")
    assert str(message.content).endswith(REPLY)
    assert message.usage_metadata["total_tokens"] > 1
    streamed = "".join(str(chunk.content) for chunk in chat.stream("hi"))
    assert streamed.endswith(REPLY)
    # Without a tokenizer download: the default check would fetch tiktoken's vocabulary.
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=base_url, api_key="unused", check_embedding_ctx_length=False
    )
    assert len(embeddings.embed_query("hi")) == demo.EMBEDDING_SIZE


@pytest.mark.timeout(400)  # importing litellm alone can take a minute on a busy machine
@pytest.mark.filterwarnings("ignore")  # litellm's lazy imports warn (pydantic, ReadOnly TypedDicts)
def test_litellm_completion_streamed_and_not(base_url: str) -> None:
    """litellm is heavy (about 250 MB with boto3 and more), so it is not in the test extra: run
    this after `uv pip install -p .venv litellm`, with LITELLM_LOCAL_MODEL_COST_MAP=True offline."""
    litellm = pytest.importorskip("litellm")
    kwargs = {"model": "openai/gpt-3.5-turbo-16k", "api_base": base_url, "api_key": "unused", "messages": HI}
    reply = litellm.completion(**kwargs)
    assert reply.choices[0].message.content.endswith(REPLY)
    assert reply.usage.total_tokens > 1
    chunks = list(litellm.completion(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith(REPLY)
    assert chunks[-1].choices[0].finish_reason == "stop"
