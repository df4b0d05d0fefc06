"""A deterministic OpenAI-compatible upstream for the soak test, run as its own process.

    python -m tests.soak_upstream --port N

A separate process, so the load generator in the pytest process does not share a GIL with the
server it measures against. Every answer's bytes depend only on the request's path and body
(``answer``), so the test can ask this server directly for the bytes the proxy must relay, and
check them against ``answer`` itself:

- ``POST /v1/chat/completions`` and ``/v1/completions``: the body's canonical JSON (parsed and
  re-encoded with its key order kept) is hashed; the reply's id and text come from that hash and
  its ``model`` echoes the request's. With ``"stream": true`` the answer is an event stream of
  ``soak_events`` content events (default 20), one finish event and ``data: [DONE]``, each
  written separately, ``soak_gap_ms`` apart (default 0, at most 100); otherwise one JSON body
  with a Content-Length, its text about 0.1 to 6 KB long and partly non-ASCII. A change to any
  value in the body the upstream receives changes the hash, and with it the answer's bytes.
- ``GET /v1/models``: a fixed list.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from typing import Any

import orjson
from aiohttp import web

DEFAULT_EVENTS = 20
MAX_EVENTS = 1000
_WORDS = ("soak", "proxy", "byte", "stream", "élan", "naïve", "ünïcode", "→", "数据", "🙂")


def canonical_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body)).hexdigest()


def _text(digest: str, index: int, length: int) -> str:
    """Deterministic text of about ``length`` characters from ``digest``."""
    words: list[str] = []
    size = 0
    step = 0
    while size < length:
        byte = int(digest[(index + step) % 32 * 2 : (index + step) % 32 * 2 + 2], 16)
        word = f"{_WORDS[byte % len(_WORDS)]}{byte}"
        words.append(word)
        size += len(word) + 1
        step += 1
    return " ".join(words)


def answer(path: str, raw: bytes) -> tuple[str, list[bytes]]:
    """The content type and the body chunks, in the order written, for a completion request."""
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        error = {"error": {"message": "body must be a JSON object", "type": "invalid_request_error"}}
        return "application/json", [orjson.dumps(error)]
    digest = canonical_digest(body)
    model = body.get("model")
    chat = path.rstrip("/").endswith("/chat/completions")
    ident = ("chatcmpl-" if chat else "cmpl-") + digest[:24]
    created = int(digest[24:32], 16)
    if body.get("stream") is True:
        events = body.get("soak_events", DEFAULT_EVENTS)
        events = events if isinstance(events, int) and 0 <= events <= MAX_EVENTS else DEFAULT_EVENTS
        kind = "chat.completion.chunk" if chat else "text_completion"
        envelope = {"id": ident, "object": kind, "created": created, "model": model}
        chunks = []
        for index in range(events):
            text = _text(digest, index, 4 + index % 7 * 3)
            text = text if index == 0 else " " + text
            fields: dict[str, Any] = {"delta": {"content": text}} if chat else {"text": text}
            choice = {"index": 0, **fields, "logprobs": None, "finish_reason": None}
            chunks.append(b"data: " + orjson.dumps({**envelope, "choices": [choice]}) + b"\n\n")
        last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        choice = {"index": 0, **last, "logprobs": None, "finish_reason": "stop"}
        chunks.append(b"data: " + orjson.dumps({**envelope, "choices": [choice]}) + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return "text/event-stream", chunks
    text = _text(digest, 0, 100 + int(digest[:4], 16) % 6000)
    fields = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    whole = {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, **fields, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": len(raw), "completion_tokens": len(text), "total_tokens": 0},
    }
    return "application/json", [orjson.dumps(whole)]


async def _completion(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        content_type, chunks = answer(request.path, raw)
    except orjson.JSONDecodeError:
        return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
    if content_type != "text/event-stream":
        return web.Response(body=chunks[0], content_type=content_type)
    gap = orjson.loads(raw).get("soak_gap_ms", 0)
    gap = gap / 1000 if isinstance(gap, int) and 0 <= gap <= 100 else 0
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index, chunk in enumerate(chunks):
        if index and gap:
            await asyncio.sleep(gap)
        await response.write(chunk)
    await response.write_eof()
    return response


async def _models(request: web.Request) -> web.Response:
    data = [{"id": "soak-target", "object": "model", "created": 1, "owned_by": "soak"}]
    return web.json_response({"object": "list", "data": data})


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _completion)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_get("/v1/models", _models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(build_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port, backlog=1024).start()
        print(f"soak upstream listening on http://{args.host}:{args.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
