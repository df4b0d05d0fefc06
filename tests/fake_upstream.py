"""A real OpenAI-compatible HTTP server for tests, on a loopback port of its own thread.

It records every request it receives (method, raw path, headers, body) and behaves by the
model it is asked for, so one server covers every case:

- any other model: answers like a model server; chat replies ``reply from <model>``, streams
  word by word (``stream: true``) with a usage chunk when ``stream_options.include_usage``;
- ``slow-stream``: an event every 50 ms for 10 s; notes when the client went away;
- ``die-mid-stream``: three events, then the connection is cut without ending the body;
- ``hang``: sleeps 30 s before any header;
- ``status-<code>``: answers that status in OpenAI's error shape, ``Retry-After: 7`` on 429.

Non-completion paths echo what they received as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

MODELS = ["echo-model", "qwen3-4b", "Qwen/Qwen3-4B"]
SLOW_EVENTS = 200
SLOW_INTERVAL = 0.05


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class FakeUpstream:
    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    slow_events_sent: list[int] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None

    def last(self, path: str | None = None) -> Seen:
        """The most recent request, optionally the most recent to this path (query excluded)."""
        for seen in reversed(self.requests):
            if path is None or seen.path.split("?", 1)[0] == path:
                return seen
        raise LookupError(f"the fake upstream saw no request to {path}")

    def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id:.+}", self._model)
        app.router.add_route("*", "/v1/chat/completions", self._completion)
        app.router.add_route("*", "/v1/completions", self._completion)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._loop = loop
        threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True).start()

    async def _record(self, request: web.Request) -> Seen:
        seen = Seen(request.method, request.raw_path, dict(request.headers), await request.read())
        self.requests.append(seen)
        return seen

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        data = [{"id": m, "object": "model", "created": 1, "owned_by": "fake"} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        await self._record(request)
        model_id = request.match_info["model_id"]
        if model_id not in MODELS:
            return _error(404, f"model {model_id} not found")
        return web.json_response({"id": model_id, "object": "model", "created": 1, "owned_by": "fake"})

    async def _echo(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        model = None
        if request.content_type == "application/json" and seen.body:
            with contextlib.suppress(ValueError):
                model = orjson.loads(seen.body).get("model")
        return web.json_response(
            {"path": seen.path, "method": seen.method, "model": model, "bytes": len(seen.body)},
            headers={"X-Upstream-Echo": "yes"},
        )

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        body = seen.json()
        model = str(body.get("model"))
        if model.startswith("status-"):
            return _error(int(model.removeprefix("status-")), "the fake upstream was told to fail")
        if model == "hang":
            await asyncio.sleep(30)
        chat = request.path.endswith("chat/completions")
        if body.get("stream"):
            return await self._stream(request, body, chat)
        text = f"reply from {model}"
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, **choice, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            }
        )

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        model = str(body["model"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if model == "slow-stream":
            return await self._slow(response, model, chat)
        words = f"reply from {model}".split(" ")
        for index, word in enumerate(words):
            await response.write(_event(model, chat, word if index == 0 else f" {word}"))
            if model == "die-mid-stream" and index == 1:
                assert request.transport is not None
                request.transport.close()
                return response
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            chunk = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _slow(self, response: web.StreamResponse, model: str, chat: bool) -> web.StreamResponse:
        sent = 0
        try:
            for _ in range(SLOW_EVENTS):
                await response.write(_event(model, chat, "tick "))
                sent += 1
                await asyncio.sleep(SLOW_INTERVAL)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects.append(time.monotonic())
            self.slow_events_sent.append(sent)
            raise
        await response.write(b"data: [DONE]\n\n")
        return response


def _event(model: str, chat: bool, text: str) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": None}
        kind = "text_completion"
    chunk = {"id": "cmpl-fake", "object": kind, "created": 1, "model": model, "choices": [choice]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": "7"} if status == 429 else {}
    error = {"error": {"message": message, "type": "fake_error", "code": str(status)}}
    return web.json_response(error, status=status, headers=headers)
