"""A small OpenAI-compatible server so `make run` shows the proxy at work with no model server.

It answers in the main process, on a thread of its own, on a free loopback port. It is faithful
enough for real clients (the openai SDK, LangChain, litellm, the `llm` CLI): answers carry
`usage`, streams end with a `finish_reason` chunk (and a usage chunk when
`stream_options.include_usage` asks), every listed model has a `/v1/models/{id}` entry, and
errors have OpenAI's shape. Its chat model thinks aloud in `<think>` as Qwen3 does, and obeys
the two switches the proxy sends (`/no_think`, `chat_template_kwargs.enable_thinking=false`),
so `DISABLE_THINKING=true` shows the switch and the stripping. Any model id is answered, so an
unmapped id shows that it was passed through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

DEMO_MODEL = "demo-qwen3-4b"
DEMO_EMBEDDING_MODEL = "demo-bge-m3"
MODELS = (DEMO_MODEL, DEMO_EMBEDDING_MODEL)
EMBEDDING_SIZE = 16
WORD_DELAY = 0.03
_JSON = "application/json"


def _error(status: int, message: str, kind: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON)


def _json(payload: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def thinking_off(body: dict[str, Any]) -> str | None:
    """Which switch turned thinking off, as Qwen3 reads them; None while it is on."""
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False:
        return "chat_template_kwargs.enable_thinking=false"
    texts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(item for item in prompt if isinstance(item, str))
    users = [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"]
    if users:
        content = users[-1].get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "/no_think" if any(text.rstrip().endswith("/no_think") for text in texts) else None


def answer_text(model: str, body: dict[str, Any]) -> str:
    """The whole completion text, think block included. The template switch leaves no block at
    all (Qwen3's chat template then closes an empty one in the prompt); /no_think an empty one."""
    reply = f"Hello from {model}, the demo upstream: the proxy sent your request here."
    switch = thinking_off(body)
    if switch is None:
        reasoning = f"The client's request reached me as {model}. I will say where it landed."
        return f"<think>\n{reasoning}\n</think>\n\n{reply}"
    reply += f" Thinking was switched off ({switch})."
    if switch == "/no_think":
        return f"<think>\n\n</think>\n\n{reply}"
    return reply


def count_tokens(body: dict[str, Any]) -> int:
    """A rough prompt size in words, enough for a plausible `usage`."""
    words = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            words += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        words += len(prompt.split())
    elif isinstance(prompt, list):
        words += sum(len(item.split()) for item in prompt if isinstance(item, str))
    return max(words, 1)


def pieces(text: str) -> list[str]:
    """The text cut the way a stream carries it: each word with the space after it."""
    return re.findall(r"\s*\S+\s*", text)


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "request body is not valid JSON", "invalid_request_error", "invalid_json")
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object", "invalid_request_error", "invalid_json")
    return body


async def _models(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": [_model_entry(model) for model in MODELS]})


def _model_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "demo"}


async def _model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    if model not in MODELS:
        message = f"The model `{model}` does not exist."
        return _error(404, message, "invalid_request_error", "model_not_found")
    return _json(_model_entry(model))


async def _completion(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    model = str(body.get("model"))
    chat = request.path.endswith("chat/completions")
    text = answer_text(model, body)
    prompt_tokens = count_tokens(body)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(text.split()),
        "total_tokens": prompt_tokens + len(text.split()),
    }
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-demo{uuid.uuid4().hex[:12]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if not body.get("stream"):
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices = [{"index": 0, **choice, "logprobs": None, "finish_reason": "stop"}]
        return _json({**base, "choices": choices, "usage": usage})
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    return await _stream(request, base, chat, text, usage if with_usage else None)


async def _stream(
    request: web.Request, base: dict[str, Any], chat: bool, text: str, usage: dict[str, int] | None
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if usage is not None else {}

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra, **more}) + b"\n\n"

    def choice(piece: str | None, finish: str | None = None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}

    with contextlib.suppress(ConnectionResetError):
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            await response.write(event([{**role, "finish_reason": None}]))
        for piece in pieces(text):
            await response.write(event([choice(piece)]))
            await asyncio.sleep(WORD_DELAY)
        await response.write(event([choice(None, "stop")]))
        if usage is not None:
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
    return response


def embedding(text: str) -> list[float]:
    """A deterministic unit-length vector per text: equal texts embed equally."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [byte / 127.5 - 1.0 for byte in digest[:EMBEDDING_SIZE]]
    norm = sum(value * value for value in raw) ** 0.5 or 1.0
    return [value / norm for value in raw]


async def _embeddings(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    given = body.get("input")
    inputs: list[Any] = given if isinstance(given, list) and given and not _is_tokens(given) else [given]
    if any(not isinstance(item, str) and not _is_tokens(item) for item in inputs):
        message = "input must be a string, a list of strings, or token arrays"
        return _error(400, message, "invalid_request_error", "invalid_input")
    data = []
    for index, item in enumerate(inputs):
        vector = embedding(item if isinstance(item, str) else " ".join(map(str, item)))
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": str(body.get("model")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, int) for item in value)


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404 and 405 are plain text: answer them as an OpenAI server would."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        message = f"Unknown request URL: {request.method} {request.path}."
        return _error(404, message, "invalid_request_error", "unknown_url")
    except web.HTTPMethodNotAllowed:
        message = f"Method {request.method} is not allowed on {request.path}."
        return _error(405, message, "invalid_request_error", "method_not_allowed")


def build_app() -> web.Application:
    app = web.Application(middlewares=[_openai_errors])
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model)
    app.router.add_post("/v1/chat/completions", _completion)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_post("/v1/embeddings", _embeddings)
    return app


def start_in_thread() -> str:
    """Serve the demo on 127.0.0.1 and return its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(), access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    threading.Thread(target=loop.run_forever, name="demo-upstream", daemon=True).start()
    return f"http://127.0.0.1:{port}"
