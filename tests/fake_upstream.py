"""A real OpenAI-compatible HTTP server for tests, on a loopback port of its own thread.

It records every request it receives (method, raw path, headers, body) and behaves by the
model it is asked for, so one server covers every case:

- any other model: answers like a model server; chat replies ``reply from <model>``, streams
  word by word (``stream: true``) with a usage chunk when ``stream_options.include_usage``;
- ``slow-stream``: an event every 50 ms for 10 s; notes when the client went away;
  ``slow-stream-<n>``: the same with n events;
- ``die-mid-stream``: three events, then the connection is cut without ending the body;
- ``hang``: sleeps 30 s before any header;
- ``status-<code>``: answers that status in OpenAI's error shape, ``Retry-After: 7`` on 429;
  ``status-<code>-<anything>`` the same, so tests can tell such requests apart;
- ``cut-after-<n>``: streamed, n events then the connection is cut without ending the body
  (``cut-after-0``: right after the headers); not streamed, the headers with the whole answer's
  Content-Length, half the body, then the cut;
- ``stall-after-<n>``: the same, but instead of the cut 30 s of silence;
- ``qwen3-think...`` (also after an ``org/`` prefix): a Qwen3-like thinking model. Choice ``i``
  answers ``QWEN_EMPTY_THINK`` + ``answer <i> from <model>`` when thinking is off (the last user
  message, or the prompt, ends with ``/no_think``, or ``chat_template_kwargs.enable_thinking`` is
  false), else ``QWEN_FULL_THINK`` + that answer. Honours ``n`` and chat or completions. Streams
  cut the text into small pieces that split the tags across events (``QWEN_PIECES``): a role
  chunk per choice first (chat), choices interleaved by index, a finish_reason chunk per choice,
  a usage chunk when ``stream_options.include_usage``, then ``[DONE]``; every byte is
  deterministic so two identical requests get identical answers, and its JSON is spaced
  (``{"id": ...``) so anything that re-encodes an event shows. ``qwen3-think...-chunked``
  sends its non-streamed JSON without Content-Length, in chunked transfer encoding (as Go's
  net/http does for bodies over 2 KB, e.g. Ollama);
- ``qwen3-think...-tag-<name>``: the same, with its block named ``<name>`` (``<thinking>``)
  instead of ``<think>``;
- ``qwen3-instruct...``: the same model without thinking: the same answers and events, no tags;
- ``paced-<n>x<ms>``: paced answers for timeout tests. Streamed: ``n`` events with ``ms``
  milliseconds of silence between them, a usage chunk (``n`` completion tokens) when
  ``stream_options.include_usage``, then ``[DONE]``. Not streamed: the JSON answer, sent
  with its Content-Length in ``n`` pieces ``ms`` apart; ``paced-<n>x<ms>-chunked`` without a
  Content-Length (chunked).

- ``linger-<ms>``: streamed like any other model, then ``ms`` milliseconds between ``[DONE]``
  and the end of the body (as LiteLLM and others do), so a client that closes at ``[DONE]``
  leaves before the proxy sees the end;
- ``qwen3-think...-slow``: the thinker, streamed with 0.2 s between events.

``POST /v1/messages`` answers like an Anthropic Messages server (vLLM, llama.cpp, LiteLLM):
``reply from <model>`` as one text block, or streamed (``event:`` + ``data:`` lines, ``ping``
included, ending in ``message_stop``); ``status-<code>`` fails in Anthropic's error shape;
``linger-<ms>`` lingers after ``message_stop``. ``POST /v1/messages/count_tokens`` answers
``{"input_tokens": 7}``.

A request header ``X-Fake-Answer-Headers`` holding a JSON object adds those headers to the
answer (a ``null`` value removes the header, Content-Type included), whatever the path.

Non-completion paths echo what they received as JSON; a POST to ``/v1/embeddings`` or
``/v1/responses`` adds the usage such an answer carries (``ECHO_USAGE``). ``in_flight`` counts
the requests being answered right now (streams until their last byte) and ``peak_in_flight`` the most at once.
``models`` is what ``/v1/models`` lists (``MODELS`` unless given), each ``owned_by`` the server's
``owned_by``; ``start(port)`` may ask for a given port, and ``stop()`` closes the server again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

MODELS = ["echo-model", "qwen3-4b", "Qwen/Qwen3-4B"]
SLOW_EVENTS = 200
SLOW_INTERVAL = 0.05
QWEN_EMPTY_THINK = "<think>\n\n</think>\n\n"
QWEN_FULL_THINK = "<think>\nLet me think about it.\n</think>\n\n"
QWEN_REASONING = "\nLet me think about it.\n"
QWEN_ID = "chatcmpl-qwen-fake"
QWEN_TEXT_ID = "cmpl-qwen-fake"
# The sizes the text is cut into, in turn: "<th", "ink>", "\n\n</", "think>", "\n\n", ...
QWEN_PIECES = (3, 4, 4, 6, 2, 5)
QWEN_USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
ECHO_USAGE = {
    "/v1/embeddings": {"prompt_tokens": 4, "total_tokens": 4},
    "/v1/responses": {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9},
}


def is_qwen_thinker(model: str) -> bool:
    return model.rsplit("/", 1)[-1].startswith("qwen3-think")


def is_qwen(model: str) -> bool:
    return is_qwen_thinker(model) or model.rsplit("/", 1)[-1].startswith("qwen3-instruct")


def qwen_answer(model: str, index: int) -> str:
    """The text after the think block of choice ``index``."""
    return f"answer {index} from {model}"


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
    in_flight: int = 0
    peak_in_flight: int = 0
    models: list[str] = field(default_factory=lambda: list(MODELS))
    owned_by: str = "fake"
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    def last(self, path: str | None = None) -> Seen:
        """The most recent request, optionally the most recent to this path (query excluded)."""
        for seen in reversed(self.requests):
            if path is None or seen.path.split("?", 1)[0] == path:
                return seen
        raise LookupError(f"the fake upstream saw no request to {path}")

    def reset_peak(self) -> None:
        """Start counting ``peak_in_flight`` afresh from the requests open now."""
        self.peak_in_flight = self.in_flight

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._count])
        app.on_response_prepare.append(_answer_headers)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id:.+}", self._model)
        app.router.add_route("*", "/v1/chat/completions", self._completion)
        app.router.add_route("*", "/v1/completions", self._completion)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", port)
        loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._loop = loop
        self._runner = runner
        threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True).start()

    def stop(self) -> None:
        """Close the listening socket and every open connection, then end the server's thread."""
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._loop = self._runner = None

    async def _record(self, request: web.Request) -> Seen:
        seen = Seen(request.method, request.raw_path, dict(request.headers), await request.read())
        self.requests.append(seen)
        return seen

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        data = [{"id": m, "object": "model", "created": 1, "owned_by": self.owned_by} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        await self._record(request)
        model_id = request.match_info["model_id"]
        if model_id not in self.models:
            return _error(404, f"model {model_id} not found")
        return web.json_response({"id": model_id, "object": "model", "created": 1, "owned_by": self.owned_by})

    async def _echo(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        model = None
        if request.content_type == "application/json" and seen.body:
            with contextlib.suppress(ValueError):
                model = orjson.loads(seen.body).get("model")
        answer = {"path": seen.path, "method": seen.method, "model": model, "bytes": len(seen.body)}
        if request.method == "POST" and request.path in ECHO_USAGE:
            answer["usage"] = ECHO_USAGE[request.path]
        return web.json_response(answer, headers={"X-Upstream-Echo": "yes"})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        body = seen.json()
        model = str(body.get("model"))
        if model.startswith("status-"):
            code = model.removeprefix("status-").split("-", 1)[0]
            return _error(int(code), "the fake upstream was told to fail")
        if model == "hang":
            await asyncio.sleep(30)
        chat = request.path.endswith("chat/completions")
        if model.startswith(("cut-after-", "stall-after-")):
            return await _broken(request, model, chat, bool(body.get("stream")))
        if model.startswith("paced-"):
            return await _paced(request, body, chat)
        if is_qwen(model):
            return await self._qwen(request, body, chat)
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
        if model.startswith("slow-stream"):
            count = model.removeprefix("slow-stream").removeprefix("-")
            return await self._slow(response, model, chat, int(count or SLOW_EVENTS))
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
        await _linger(model)
        return response

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = (await self._record(request)).json()
        model = str(body.get("model"))
        if model.startswith("status-"):
            status = int(model.removeprefix("status-").split("-", 1)[0])
            error = {"type": "error", "error": {"type": "api_error", "message": "told to fail"}}
            return web.json_response(error, status=status)
        text = f"reply from {model}"
        usage = {"input_tokens": 3, "output_tokens": 3}
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model}
        if not body.get("stream"):
            content = [{"type": "text", "text": text}]
            return web.json_response(
                {
                    **message,
                    "content": content,
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await response.write(
                b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps({"type": kind, **data}))
            )

        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        await send("message_start", {"message": start})
        await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await send("ping", {})
        for index, word in enumerate(text.split(" ")):
            delta = {"type": "text_delta", "text": word if index == 0 else f" {word}"}
            await send("content_block_delta", {"index": 0, "delta": delta})
        await send("content_block_stop", {"index": 0})
        await send(
            "message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": usage}
        )
        await send("message_stop", {})
        await _linger(model)
        return response

    async def _count_tokens(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"input_tokens": 7})

    async def _qwen(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        model = str(body["model"])
        n = body["n"] if isinstance(body.get("n"), int) else 1
        think = QWEN_FULL_THINK if _thinking_on(body, chat) else QWEN_EMPTY_THINK
        if not is_qwen_thinker(model):
            think = ""
        _, tagged, tag = model.removesuffix("-chunked").rpartition("-tag-")
        if tagged:
            think = think.replace("think>", f"{tag}>")
        texts = [think + qwen_answer(model, index) for index in range(n)]
        envelope = {
            "id": QWEN_ID if chat else QWEN_TEXT_ID,
            "object": "chat.completion" if chat else "text_completion",
            "created": 1,
            "model": model,
        }
        stop = "stop"
        if not body.get("stream"):
            choices = [
                {"index": i, **_qwen_text(chat, text, message=True), "logprobs": None, "finish_reason": stop}
                for i, text in enumerate(texts)
            ]
            whole = {**envelope, "choices": choices, "usage": QWEN_USAGE}
            if not model.endswith("-chunked"):
                return web.json_response(whole)
            chunked = web.StreamResponse(headers={"Content-Type": "application/json"})
            chunked.enable_chunked_encoding()
            await chunked.prepare(request)
            data = json.dumps(whole).encode()
            await chunked.write(data[: len(data) // 2])
            await chunked.write(data[len(data) // 2 :])
            await chunked.write_eof()
            return chunked
        envelope["object"] = "chat.completion.chunk" if chat else "text_completion"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**envelope, "choices": choices, **extra}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        if chat:
            for i in range(n):
                delta = {"role": "assistant", "content": ""}
                await send([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
        pieces = [_cut(text) for text in texts]
        for step in range(max(len(cut) for cut in pieces)):
            if model.endswith("-slow"):
                await asyncio.sleep(0.2)
            for i, cut in enumerate(pieces):
                if step < len(cut):
                    fields = _qwen_text(chat, cut[step], message=False)
                    await send([{"index": i, **fields, "logprobs": None, "finish_reason": None}])
        for i in range(n):
            fields = {"delta": {}} if chat else {"text": ""}
            await send([{"index": i, **fields, "logprobs": None, "finish_reason": stop}])
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await send([], usage=QWEN_USAGE)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _slow(
        self, response: web.StreamResponse, model: str, chat: bool, count: int
    ) -> web.StreamResponse:
        sent = 0
        try:
            for _ in range(count):
                await response.write(_event(model, chat, "tick "))
                sent += 1
                await asyncio.sleep(SLOW_INTERVAL)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects.append(time.monotonic())
            self.slow_events_sent.append(sent)
            raise
        await response.write(b"data: [DONE]\n\n")
        return response


async def _paced(request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
    """``paced-<n>x<ms>[-chunked]``: n pieces with ms of silence between them."""
    model, stream = str(body["model"]), bool(body.get("stream"))
    count, _, pause = model.removeprefix("paced-").removesuffix("-chunked").partition("x")
    pieces, interval = int(count), int(pause) / 1000
    if stream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(pieces):
            if index:
                await asyncio.sleep(interval)
            await response.write(_event(model, chat, f"piece {index} "))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {"prompt_tokens": 2, "completion_tokens": pieces, "total_tokens": 2 + pieces}
            chunk = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response
    text = f"reply from {model}"
    choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    kind = "chat.completion" if chat else "text_completion"
    whole = {"id": "cmpl-fake", "object": kind, "created": 1, "model": model, "choices": [choice]}
    data = orjson.dumps(whole)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if model.endswith("-chunked"):
        response.enable_chunked_encoding()
    else:
        response.content_length = len(data)
    await response.prepare(request)
    size = -(-len(data) // pieces)
    for index in range(pieces):
        if index:
            await asyncio.sleep(interval)
        await response.write(data[index * size : (index + 1) * size])
    await response.write_eof()
    return response


async def _broken(request: web.Request, model: str, chat: bool, stream: bool) -> web.StreamResponse:
    """``cut-after-<n>`` and ``stall-after-<n>``: a good start, then a cut or 30 s of silence."""
    kind, _, count = model.rpartition("-after-")
    if stream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(int(count)):
            await response.write(_event(model, chat, f"piece {index} "))
    else:
        text = f"reply from {model}"
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        whole = {"id": "cmpl-fake", "object": "chat.completion", "model": model, "choices": [choice]}
        data = orjson.dumps(whole)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
    if kind == "stall":
        await asyncio.sleep(30)
    assert request.transport is not None
    request.transport.close()
    return response


async def _linger(model: str) -> None:
    if model.startswith("linger-"):
        await asyncio.sleep(int(model.removeprefix("linger-")) / 1000)


async def _answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``X-Fake-Answer-Headers``: headers the test wants on the answer (null: removed)."""
    wanted = request.headers.get("X-Fake-Answer-Headers")
    if wanted is None:
        return
    for name, value in orjson.loads(wanted).items():
        if value is None:
            response.headers.popall(name, None)
        else:
            response.headers.add(name, value)


def _event(model: str, chat: bool, text: str) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": None}
        kind = "text_completion"
    chunk = {"id": "cmpl-fake", "object": kind, "created": 1, "model": model, "choices": [choice]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _thinking_on(body: dict[str, Any], chat: bool) -> bool:
    """Qwen3's switches: ``enable_thinking: false`` in the template, or ``/no_think`` at the end."""
    kwargs = body.get("chat_template_kwargs")
    if chat and isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False:
        return False
    if not chat:
        prompt = body.get("prompt")
        last = prompt[-1] if isinstance(prompt, list) and prompt else prompt
        return not (isinstance(last, str) and last.rstrip().endswith("/no_think"))
    users = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(t for t in texts if isinstance(t, str))
    return not (isinstance(content, str) and content.rstrip().endswith("/no_think"))


def _qwen_text(chat: bool, text: str, *, message: bool) -> dict[str, Any]:
    if not chat:
        return {"text": text}
    return {"message": {"role": "assistant", "content": text}} if message else {"delta": {"content": text}}


def _cut(text: str) -> list[str]:
    """``text`` in pieces of the sizes ``QWEN_PIECES`` names, in turn."""
    pieces, start, turn = [], 0, 0
    while start < len(text):
        size = QWEN_PIECES[turn % len(QWEN_PIECES)]
        pieces.append(text[start : start + size])
        start, turn = start + size, turn + 1
    return pieces


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": "7"} if status == 429 else {}
    error = {"error": {"message": message, "type": "fake_error", "code": str(status)}}
    return web.json_response(error, status=status, headers=headers)
