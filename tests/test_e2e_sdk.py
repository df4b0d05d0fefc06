"""End to end through the official ``openai`` SDK: client -> proxy process -> fake upstream.

Each test drives the real SDK (sync ``OpenAI`` and async ``AsyncOpenAI``) against the proxy
running as a subprocess, then checks what the fake upstream actually received.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from tests.conftest import DEFAULT_MAP, Proxy, StartProxy
from tests.fake_upstream import MODELS, FakeUpstream

API_KEY = "sk-e2e-test-key"

# (what the client asks for, what the upstream must be asked for)
ROUTES = [
    pytest.param("gpt-3.5-turbo-16k", "qwen3-4b", id="exact"),
    pytest.param("gpt-4o", "echo-model", id="regex"),
    pytest.param("llama-70b", "llama-70-served", id="regex-groups"),
    pytest.param("mistral-7b-instruct", "mistral-7b-instruct", id="unmapped"),
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
# Fields the SDK does not know: they must reach the upstream exactly as sent.
EXTRA = {
    "top_k": 20,
    "chat_template_kwargs": {"enable_thinking": False},
    "guided_choice": ["oui", "non", "peut-être"],
    "repetition_penalty": 1.05,
    "nothing": None,
}


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=10)


def async_sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=10)


def completion_kwargs(endpoint: str, model: str, stream: bool) -> dict[str, Any]:
    """The request the test makes; also what the upstream must see (bar the model)."""
    kwargs: dict[str, Any] = {"model": model, "temperature": 0.25, "n": 2, "max_tokens": 17}
    if endpoint == "chat":
        kwargs["messages"] = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Wetter in Köln?"},
        ]
        kwargs["tools"] = TOOLS
        kwargs["tool_choice"] = "auto"
    else:
        kwargs["prompt"] = "Once upon a time"
        kwargs["echo"] = False
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def _collect_sync(client: openai.OpenAI, endpoint: str, kwargs: dict[str, Any]) -> tuple[str, set[str], Any]:
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    if not kwargs.get("stream"):
        result = create(**kwargs, extra_body=EXTRA)
        return _text(endpoint, result), {result.model}, result.usage
    pieces: list[str] = []
    models: set[str] = set()
    usage = None
    with create(**kwargs, extra_body=EXTRA) as stream:
        for chunk in stream:
            models.add(chunk.model)
            pieces += [_piece(endpoint, choice) for choice in chunk.choices]
            usage = chunk.usage or usage
    return "".join(pieces), models, usage


async def _collect_async(base_url: str, endpoint: str, kwargs: dict[str, Any]) -> tuple[str, set[str], Any]:
    async with async_sdk(base_url) as client:
        create = client.chat.completions.create if endpoint == "chat" else client.completions.create
        if not kwargs.get("stream"):
            result = await create(**kwargs, extra_body=EXTRA)
            return _text(endpoint, result), {result.model}, result.usage
        pieces: list[str] = []
        models: set[str] = set()
        usage = None
        stream = await create(**kwargs, extra_body=EXTRA)
        async with stream:
            async for chunk in stream:
                models.add(chunk.model)
                pieces += [_piece(endpoint, choice) for choice in chunk.choices]
                usage = chunk.usage or usage
        return "".join(pieces), models, usage


def _text(endpoint: str, result: Any) -> str:
    choice = result.choices[0]
    return choice.message.content if endpoint == "chat" else choice.text


def _piece(endpoint: str, choice: Any) -> str:
    return (choice.delta.content or "") if endpoint == "chat" else choice.text


@pytest.mark.parametrize(("source", "target"), ROUTES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_completion_model_rewritten_and_other_fields_untouched(
    proxy: Proxy, upstream: FakeUpstream, endpoint: str, mode: str, stream: bool, source: str, target: str
) -> None:
    kwargs = completion_kwargs(endpoint, source, stream)
    if mode == "sync":
        with sdk(proxy.v1) as client:
            text, models, usage = _collect_sync(client, endpoint, kwargs)
    else:
        text, models, usage = asyncio.run(_collect_async(proxy.v1, endpoint, kwargs))

    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    seen = upstream.last(path)
    assert seen.method == "POST"
    assert json.loads(seen.body) == {**kwargs, **EXTRA, "model": target}
    assert {k.lower(): v for k, v in seen.headers.items()}["authorization"] == f"Bearer {API_KEY}"
    # the fake answers as the model it was asked for, so the reply proves the routing too
    assert text == f"reply from {target}"
    assert models == {target}
    assert usage is not None
    assert usage.total_tokens == 6


@pytest.mark.parametrize("model", ["gpt-4o", "unmapped-model"])
def test_integers_beyond_64_bits_survive_a_rewrite(proxy: Proxy, upstream: FakeUpstream, model: str) -> None:
    """JSON allows any integer; a rewritten body must not turn a big one into a float."""
    big = {"seed_list": [123456789012345678901234567890, -9223372036854775809], "ok": 18446744073709551615}
    with sdk(proxy.v1) as client:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_body=big
        )
    seen = upstream.last("/v1/chat/completions")
    sent = json.loads(seen.body)  # the standard library keeps big integers exact
    assert sent["model"] == ("echo-model" if model == "gpt-4o" else model)
    assert sent["seed_list"] == [123456789012345678901234567890, -9223372036854775809]
    assert sent["ok"] == 18446744073709551615


# --- /v1/models through the SDK ----------------------------------------------------------------


def test_sdk_models_list_has_upstream_models_and_exact_aliases(proxy: Proxy) -> None:
    with sdk(proxy.v1) as client:
        ids = [model.id for model in client.models.list()]
    exact_aliases = [key for key in DEFAULT_MAP if not key.startswith("/")]
    assert ids == MODELS + exact_aliases
    assert len(ids) == len(set(ids))
    assert not any(i.startswith("/") for i in ids)


def test_sdk_models_retrieve_alias_unmapped_and_missing(proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(proxy.v1) as client:
        alias = client.models.retrieve("gpt-3.5-turbo-16k")
        assert alias.id == "gpt-3.5-turbo-16k"
        assert alias.owned_by == "fake"  # described by its target's upstream entry

        # the SDK sends "Qwen/Qwen3-4B" as /v1/models/Qwen%2FQwen3-4B: relayed untouched
        direct = client.models.retrieve("Qwen/Qwen3-4B")
        assert direct.id == "Qwen/Qwen3-4B"
        assert upstream.last().path == "/v1/models/Qwen%2FQwen3-4B"

        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("gpt-missing")
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found"
    assert missing.value.type == "not_found_error"
    assert "not-listed-anywhere" in missing.value.message


def test_async_sdk_models(proxy: Proxy) -> None:
    async def run() -> tuple[list[str], str]:
        async with async_sdk(proxy.v1) as client:
            ids = [model.id async for model in client.models.list()]
            one = await client.models.retrieve("gpt-3.5-turbo-16k")
            return ids, one.id

    ids, retrieved = asyncio.run(run())
    assert ids == MODELS + [key for key in DEFAULT_MAP if not key.startswith("/")]
    assert retrieved == "gpt-3.5-turbo-16k"


# --- other endpoints through the SDK --------------------------------------------------------------


def test_sdk_embeddings_model_rewritten(proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(proxy.v1) as client:
        result = client.embeddings.create(
            model="text-embedding-3-small",
            input=["first text", "zweiter Text"],
            encoding_format="float",
            dimensions=256,
            extra_body={"truncate_prompt_tokens": 512},
        )
    seen = upstream.last("/v1/embeddings")
    assert seen.json() == {
        "model": "bge-m3",
        "input": ["first text", "zweiter Text"],
        "encoding_format": "float",
        "dimensions": 256,
        "truncate_prompt_tokens": 512,
    }
    # the fake echoes what it received: the SDK parsed the proxied answer
    assert result.model == "bge-m3"


def test_async_sdk_embeddings_model_rewritten(proxy: Proxy, upstream: FakeUpstream) -> None:
    async def run() -> str:
        async with async_sdk(proxy.v1) as client:
            result = await client.embeddings.create(
                model="text-embedding-3-small", input="hello", encoding_format="float"
            )
            return result.model

    assert asyncio.run(run()) == "bge-m3"
    assert upstream.last("/v1/embeddings").json()["model"] == "bge-m3"


def test_sdk_responses_model_rewritten(proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(proxy.v1) as client:
        raw = client.responses.with_raw_response.create(
            model="gpt-4.1-mini", input="hi there", temperature=0.5, extra_body={"top_k": 3}
        )
    assert raw.status_code == 200
    seen = upstream.last("/v1/responses")
    assert seen.json() == {"model": "echo-model", "input": "hi there", "temperature": 0.5, "top_k": 3}
    assert raw.http_response.json()["model"] == "echo-model"


def test_sdk_moderations_model_rewritten(proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(proxy.v1) as client:
        result = client.moderations.create(model="llama-8b", input="some text")
    assert upstream.last("/v1/moderations").json() == {"model": "llama-8-served", "input": "some text"}
    assert result.model == "llama-8-served"


# Bytes that are not UTF-8, NULs, CRLFs and a fake delimiter: a file part must pass untouched.
AUDIO = (
    b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00"
    + bytes(range(256))
    + b'\r\n--not-the-boundary\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    + b"\xff\xfe\xfd\x00\x80\x81\r\n\r\n\xc3\x28"
)


def _multipart_parts(body: bytes, content_type: str) -> dict[str, tuple[bytes, bytes]]:
    """name -> (part headers, part content) of a multipart body, parsed by hand."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    chunks = body.split(b"--" + boundary)
    assert chunks[-1] in (b"--\r\n", b"--")
    parts = {}
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        assert chunk.endswith(b"\r\n")
        head, _, content = chunk[2:-2].partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        parts[name] = (head, content)
    return parts


def test_sdk_transcription_multipart_model_rewritten_file_untouched(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    with sdk(proxy.v1) as client:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=("speech.wav", AUDIO, "audio/wav"),
            language="de",
            temperature=0.2,
        )
    seen = upstream.last("/v1/audio/transcriptions")
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(headers["content-length"]) == len(seen.body)
    parts = _multipart_parts(seen.body, headers["content-type"])
    assert parts["model"][1] == b"whisper-large-v3"
    assert parts["file"][1] == AUDIO
    assert b'filename="speech.wav"' in parts["file"][0]
    assert parts["language"][1] == b"de"
    assert parts["temperature"][1] == b"0.2"


def test_async_sdk_transcription_multipart(proxy: Proxy, upstream: FakeUpstream) -> None:
    async def run() -> None:
        async with async_sdk(proxy.v1) as client:
            await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"))

    asyncio.run(run())
    seen = upstream.last("/v1/audio/transcriptions")
    parts = _multipart_parts(seen.body, {k.lower(): v for k, v in seen.headers.items()}["content-type"])
    assert parts["model"][1] == b"whisper-large-v3"
    assert parts["file"][1] == AUDIO


# --- DISABLE_THINKING=true --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_proxy(start_proxy: StartProxy) -> Proxy:
    return start_proxy(DISABLE_THINKING="true")


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("last_user_content", "expected"),
    [
        pytest.param("Hallo", "Hallo /no_think", id="string"),
        pytest.param("already /no_think", "already /no_think", id="string-already"),
        pytest.param(
            [{"type": "text", "text": "look"}, IMAGE, {"type": "text", "text": "what is it?"}],
            [{"type": "text", "text": "look"}, IMAGE, {"type": "text", "text": "what is it? /no_think"}],
            id="list-last-text-part",
        ),
        pytest.param([IMAGE], [IMAGE, {"type": "text", "text": "/no_think"}], id="list-image-only"),
        pytest.param(
            [{"type": "text", "text": "x /no_think"}, IMAGE],
            [{"type": "text", "text": "x /no_think"}, IMAGE],
            id="list-already",
        ),
    ],
)
def test_disable_thinking_chat(
    thinking_proxy: Proxy, upstream: FakeUpstream, last_user_content: Any, expected: Any
) -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": last_user_content},
    ]
    with sdk(thinking_proxy.v1) as client:
        reply = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=messages)
    assert reply.choices[0].message.content == "reply from qwen3-4b"
    sent = upstream.last("/v1/chat/completions").json()
    assert sent["model"] == "qwen3-4b"
    assert sent["messages"][:3] == messages[:3]  # only the last user message changes
    assert sent["messages"][3] == {"role": "user", "content": expected}


def test_disable_thinking_chat_streaming_unmapped(thinking_proxy: Proxy, upstream: FakeUpstream) -> None:
    with sdk(thinking_proxy.v1) as client:
        stream = client.chat.completions.create(
            model="some-local-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with stream:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "reply from some-local-model"
    assert upstream.last("/v1/chat/completions").json()["messages"] == [
        {"role": "user", "content": "hi /no_think"}
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        pytest.param("Write a poem", "Write a poem /no_think", id="string"),
        pytest.param("done /no_think", "done /no_think", id="string-already"),
        pytest.param(
            ["one", "two /no_think", "three"], ["one /no_think", "two /no_think", "three /no_think"]
        ),
    ],
)
def test_disable_thinking_completions(
    thinking_proxy: Proxy, upstream: FakeUpstream, prompt: Any, expected: Any
) -> None:
    async def run() -> str:
        async with async_sdk(thinking_proxy.v1) as client:
            result = await client.completions.create(model="gpt-4o", prompt=prompt, max_tokens=5)
            return result.choices[0].text

    assert asyncio.run(run()) == "reply from echo-model"
    sent = upstream.last("/v1/completions").json()
    assert sent == {"model": "echo-model", "prompt": expected, "max_tokens": 5}
