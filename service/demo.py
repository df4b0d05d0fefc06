"""A tiny OpenAI-compatible server so `make run` shows a rewrite with no model server around.

It answers in the main process, on a thread of its own, on a free loopback port; its answers
name the model it was asked for, so the rewrite is visible in the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid

import orjson
from aiohttp import web

DEMO_MODEL = "demo-qwen3-4b"


def _reply(model: str) -> str:
    return f"Hello from {model}, the demo upstream: the proxy sent your request here."


async def _models(request: web.Request) -> web.Response:
    entry = {"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "demo"}
    return web.json_response({"object": "list", "data": [entry]})


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = str(body.get("model"))
    chat = request.path.endswith("chat/completions")
    base = {
        "id": f"demo-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    text = _reply(model)
    if not body.get("stream"):
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return web.json_response({**base, "choices": [{"index": 0, **choice, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk_type = "chat.completion.chunk" if chat else "text_completion"
    with contextlib.suppress(ConnectionResetError):
        for word in text.split(" "):
            piece = {"delta": {"content": word + " "}} if chat else {"text": word + " "}
            event = {**base, "object": chunk_type, "choices": [{"index": 0, **piece, "finish_reason": None}]}
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
    return response


def start_in_thread() -> str:
    """Serve the demo on 127.0.0.1 and return its base URL."""
    app = web.Application()
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _chat)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    threading.Thread(target=loop.run_forever, name="demo-upstream", daemon=True).start()
    return f"http://127.0.0.1:{port}"
