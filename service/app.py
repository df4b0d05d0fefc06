"""The Sanic application: the whole request path, top to bottom.

A ``/v1/...`` request is read, its model resolved and rewritten (``payload``), forwarded through
the worker's shared aiohttp session (``upstream``), and the answer relayed: streams chunk by
chunk as they arrive, other bodies whole. Each request ends in one log event and one set of
metric samples (``Exchange.finish``), whatever happened on the way.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import structlog
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from service import access, logs, metrics, payload, reload, upstream
from service.config import Settings
from service.errors import ProxyError
from service.mapping import Resolution
from service.reasoning import ThinkStream, transform_message

log = structlog.get_logger("rerouter")

UPSTREAM_NAME = "default"  # the one backend, named as UPSTREAMS will name the others
READY_CACHE_SECONDS = 5.0
READY_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_ENDPOINTS = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "moderations",
        "rerank",
        "score",
        "tokenize",
        "detokenize",
        "models",
        "audio",
        "images",
        "files",
        "batches",
        "uploads",
        "vector_stores",
        "fine_tuning",
    }
)


def endpoint_of(path: str) -> str:
    """A bounded label for a ``/v1/`` path: the known endpoint it belongs to, else ``other``."""
    rest = path.removeprefix("/v1/").strip("/")
    if rest in _ENDPOINTS:
        return rest
    head = rest.split("/", 1)[0]
    return head if head in _ENDPOINTS else "other"


@dataclass
class Exchange:
    """What one request did, gathered on the way for its log event and metrics."""

    request_id: str
    endpoint: str
    settings: Settings
    started: float = field(default_factory=time.perf_counter)
    resolution: Resolution | None = None
    stream: bool = False
    status: int = 0
    first_byte: float | None = None
    outcome: str | None = None
    upstream_error: str | None = None
    think_blocks: int = 0

    @classmethod
    def begin(cls, request: Request, endpoint: str) -> Exchange:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        metrics.IN_FLIGHT.inc()
        return cls(request_id, endpoint, request.app.ctx.settings)

    def tags(self) -> dict[str, str]:
        """Headers on every proxied response: the request id, the upstream, the served model
        (percent-encoded: a client's model id must not be able to inject header bytes)."""
        tags = {"x-request-id": self.request_id, "x-rerouter-upstream": UPSTREAM_NAME}
        if self.resolution is not None:
            tags["x-rerouter-target-model"] = quote(self.resolution.target, safe="/:@._-+=")
        return tags

    def finish(self, labels: metrics.ModelLabels) -> None:
        duration = time.perf_counter() - self.started
        source = self.resolution.source if self.resolution else None
        target = self.resolution.target if self.resolution else None
        target_label = labels(target)
        metrics.IN_FLIGHT.dec()
        metrics.REQUESTS.labels(self.endpoint, labels(source), target_label, str(self.status)).inc()
        metrics.DURATION.labels(self.endpoint, target_label).observe(duration)
        if self.first_byte is not None:
            metrics.TIME_TO_FIRST_BYTE.labels(self.endpoint, target_label).observe(
                self.first_byte - self.started
            )
        if self.outcome is not None:
            metrics.STREAMS.labels(self.endpoint, target_label, self.outcome).inc()
        if self.upstream_error is not None:
            metrics.UPSTREAM_ERRORS.labels(target_label, self.upstream_error).inc()
        if self.think_blocks:
            metrics.THINKING_STRIPPED.labels(target_label).inc(self.think_blocks)
        log.info(
            "request",
            endpoint=self.endpoint,
            source_model=source,
            target_model=target,
            rule=self.resolution.rule if self.resolution else None,
            stream=self.stream,
            status=self.status,
            duration_ms=round(duration * 1000, 2),
            **({"outcome": self.outcome} if self.outcome else {}),
            **({"upstream_error": self.upstream_error} if self.upstream_error else {}),
        )


def create_app(
    settings: Settings, sources: reload.Sources | None = None, name: str = "openai-model-rerouter"
) -> Sanic:
    """The app for one worker; with ``sources`` it re-reads its settings on change and SIGHUP."""
    logs.configure(settings.log_format, settings.log_level)
    app = Sanic(name)
    # Streams are bounded by the upstream's between-bytes timeout; Sanic's own response timeout
    # also counts gaps inside a stream, so it must never fire first.
    app.config.RESPONSE_TIMEOUT = settings.response_timeout
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.shutdown_timeout
    app.config.REQUEST_MAX_SIZE = settings.max_request_bytes
    app.ctx.settings = settings
    app.ctx.labels = metrics.ModelLabels(settings.metrics_max_models, settings.model_map.known_ids())
    app.ctx.ready = (0.0, False)
    app.ctx.draining = False

    @app.before_server_start
    async def open_session(app: Sanic) -> None:
        app.ctx.session = upstream.new_session(settings)

    if sources is not None:

        @app.after_server_start
        async def watch_config(app: Sanic) -> None:
            app.add_task(reload.watch(app, sources), name="config-watch")

    @app.before_server_stop
    async def drain(app: Sanic) -> None:
        """Sanic stops listening only after this returns, then gives open requests
        GRACEFUL_SHUTDOWN_TIMEOUT: the grace lets load balancers see /readyz fail first."""
        app.ctx.draining = True
        current: Settings = app.ctx.settings
        log.info("draining", grace_seconds=current.shutdown_grace, timeout_seconds=current.shutdown_timeout)
        await asyncio.sleep(current.shutdown_grace)

    @app.after_server_stop
    async def close_session(app: Sanic) -> None:
        await app.ctx.session.close()
        metrics.worker_stopped(os.getpid())

    @app.exception(SanicException)
    async def sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        return ProxyError(exc.status_code, str(exc), code, getattr(exc, "headers", None)).response()

    @app.exception(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unexpected error")
        return ProxyError(500, "the proxy failed to handle this request", "internal_error").response()

    app.add_route(healthz, "/healthz", methods=["GET", "HEAD"])
    app.add_route(readyz, "/readyz", methods=["GET", "HEAD"])
    app.add_route(metrics_page, "/metrics", methods=["GET"])
    app.add_route(list_models, "/v1/models", methods=["GET"])
    app.add_route(get_model, "/v1/models/<model_id:path>", methods=["GET"])
    app.add_route(
        proxy,
        "/v1/<path:path>",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
    )
    return app


async def observed(request: Request, endpoint: str, handler: Any, *args: Any) -> HTTPResponse | None:
    """Run a proxied handler with its bookkeeping: request id, errors, metrics, one log event."""
    exchange = Exchange.begin(request, endpoint)
    try:
        access.check_path(request.path)
        if exchange.settings.api_keys:
            access.check_key(exchange.settings.api_keys, request.headers.items())
        response: HTTPResponse | None = await handler(request, exchange, *args)
        if response is not None:
            exchange.status = response.status
            response.headers.update(exchange.tags())
        return response
    except ProxyError as exc:
        exchange.status = exc.status
        if isinstance(exc, upstream.UpstreamError):
            exchange.upstream_error = exc.reason
        error = exc.response()
        error.headers.update(exchange.tags())
        return error
    except Exception:
        log.exception("unexpected error")
        exchange.status = 500
        error = ProxyError(500, "the proxy failed to handle this request", "internal_error").response()
        error.headers.update(exchange.tags())
        return error
    except asyncio.CancelledError:
        exchange.status = 499
        if exchange.outcome is not None:
            exchange.outcome = "client_disconnected"
        raise
    finally:
        exchange.finish(request.app.ctx.labels)


async def proxy(request: Request, path: str) -> HTTPResponse | None:
    return await observed(request, endpoint_of(request.path), _forward)


async def _forward(request: Request, exchange: Exchange) -> HTTPResponse | None:
    settings = exchange.settings
    rewritten = payload.rewrite(
        request.body,
        request.headers.get("content-type", ""),
        exchange.endpoint,
        settings.model_map,
        settings.thinking,
        request.method,
    )
    exchange.resolution = rewritten.resolution
    exchange.stream = rewritten.stream
    think = "keep"
    if request.method == "POST" and exchange.endpoint in payload.COMPLETION_ENDPOINTS:
        think = settings.thinking.output_for(rewritten.resolution.target if rewritten.resolution else "")
    return await _relay(request, exchange, rewritten.body, think)


def _upstream_url(request: Request, settings: Settings, path: str | None = None) -> str:
    query = request.query_string
    return settings.upstream((path or request.path) + (f"?{query}" if query else ""))


def _headers_up(request: Request, exchange: Exchange, *, identity: bool = False) -> Any:
    """The client's headers for the upstream; UPSTREAM_API_KEY replaces the client's credential."""
    key = exchange.settings.upstream_api_key
    items = request.headers.items()
    headers = upstream.request_headers(access.without_credentials(items) if key else items)
    if key:
        headers["authorization"] = f"Bearer {key}"
    headers["x-request-id"] = exchange.request_id
    if identity:
        headers["accept-encoding"] = "identity"
    return headers


async def _relay(
    request: Request, exchange: Exchange, body: bytes, think: str = "keep"
) -> HTTPResponse | None:
    """Forward, and relay the answer.

    Read whole first: answers with a length or without a body, and JSON answers (a JSON answer
    cut or stalled half-way then still gets its own 502/504, and think blocks can be taken
    out). Relayed as they arrive: event streams and anything else of unknown length. ``think``
    other than ``keep`` rewrites think blocks in a successful completion answer, which needs it
    unencoded; otherwise the answer's bytes are relayed untouched.
    """
    async with upstream.call(
        request.app.ctx.session,
        request.method,
        _upstream_url(request, exchange.settings),
        data=body or None,
        headers=_headers_up(request, exchange, identity=think != "keep"),
        limits=upstream.limits(exchange.settings, whole=not exchange.stream),
    ) as answer:
        _note_status(exchange, answer.status)
        headers = upstream.response_headers(answer.headers.items())
        event_stream = answer.content_type == "text/event-stream"
        transform = think != "keep" and answer.status == 200
        chat = exchange.endpoint == "chat/completions"
        json_answer = answer.content_type == "application/json"
        if not event_stream and (
            json_answer
            or answer.content_length is not None
            or answer.status in (204, 304)
            or request.method == "HEAD"
        ):
            data = b"".join(
                [chunk async for chunk in _chunks(answer, exchange.settings.upstream_read_timeout)]
            )
            if transform and json_answer:
                data = _without_think(data, think, chat, exchange)
            return HTTPResponse(data, status=answer.status, headers=headers)
        stream = ThinkStream(think, chat) if transform and event_stream else None
        await _stream(request, exchange, answer, headers, stream)
        return None


def _without_think(data: bytes, mode: str, chat: bool, exchange: Exchange) -> bytes:
    try:
        body = payload.loads(data)
    except ProxyError:
        return data
    if not isinstance(body, dict):
        return data
    exchange.think_blocks = transform_message(body, mode, chat)
    return payload.dumps(body) if exchange.think_blocks else data


def _note_status(exchange: Exchange, status: int) -> None:
    exchange.status = status
    if status >= 400:
        exchange.upstream_error = f"http_{status // 100}xx"


async def _stream(
    request: Request,
    exchange: Exchange,
    answer: aiohttp.ClientResponse,
    headers: list[tuple[str, str]],
    think: ThinkStream | None,
) -> None:
    """Relay chunks as they arrive (through ``think`` when given). An upstream failure mid-way
    closes the client's connection without the final chunk, so the client sees a broken stream
    rather than a clean end."""
    tags = exchange.tags()
    headers = [(name, value) for name, value in headers if name.lower() not in tags]
    headers.extend(tags.items())
    if answer.content_type == "text/event-stream":
        headers.append(("x-accel-buffering", "no"))
    chunks = _chunks(answer, exchange.settings.upstream_read_timeout)
    first = await anext(chunks, b"")  # before any byte is sent, a failure still gets its status
    exchange.outcome = "started"
    response = await request.respond(status=answer.status, headers=headers)
    try:
        chunk: bytes | None = first
        while chunk is not None:
            data = chunk if think is None else think.feed(chunk)
            if data:
                if exchange.first_byte is None:
                    exchange.first_byte = time.perf_counter()
                await response.send(data)
            chunk = await anext(chunks, None)
        if think is not None and (tail := think.close()):
            await response.send(tail)
    except upstream.FAILURES as exc:
        exchange.outcome = "upstream_error"
        exchange.upstream_error = upstream.failure(exc).reason
        log.warning("upstream failed mid-stream", reason=exchange.upstream_error)
        if request.transport is not None:
            request.transport.close()
        return
    finally:
        if think is not None:
            exchange.think_blocks = think.stripped
    await response.eof()
    exchange.outcome = "completed"


async def _chunks(answer: aiohttp.ClientResponse, gap: float) -> AsyncIterator[bytes]:
    """The body as it arrives. Each read has its own deadline as well as aiohttp's sock_read:
    aiohttp's C parser can wait forever on a malformed chunk-size line."""
    while True:
        async with asyncio.timeout(gap):
            chunk = await answer.content.readany()
        if not chunk:
            return
        yield chunk


async def list_models(request: Request) -> HTTPResponse | None:
    return await observed(request, "models", _list_models)


async def _list_models(request: Request, exchange: Exchange) -> HTTPResponse:
    """The upstream's list plus every exact alias of MODEL_MAP that it does not already name."""
    listing = await _upstream_models(request, exchange)
    if isinstance(listing, HTTPResponse):
        return listing
    present = {entry.get("id") for entry in listing["data"] if isinstance(entry, dict)}
    aliases = exchange.settings.model_map.aliases()
    listing["data"] += [_alias_entry(alias) for alias in aliases if alias not in present]
    return HTTPResponse(payload.dumps(listing), content_type="application/json")


async def get_model(request: Request, model_id: str) -> HTTPResponse | None:
    return await observed(request, "models", _get_model, unquote(model_id))


async def _get_model(request: Request, exchange: Exchange, model_id: str) -> HTTPResponse | None:
    """An alias is described by its target's entry from the upstream's list, under its own id."""
    resolution = exchange.settings.model_map.resolve(model_id)
    exchange.resolution = resolution
    if resolution.rule is None:
        return await _relay(request, exchange, b"")
    listing = await _upstream_models(request, exchange)
    if isinstance(listing, HTTPResponse):
        return listing
    for entry in listing["data"]:
        if isinstance(entry, dict) and entry.get("id") == resolution.target:
            return json({**entry, "id": model_id})
    raise ProxyError(
        404,
        f"model {model_id!r} maps to {resolution.target!r}, which the upstream does not list",
        "model_not_found",
    )


async def _upstream_models(request: Request, exchange: Exchange) -> dict[str, Any] | HTTPResponse:
    """The upstream's /v1/models listing, or its non-200 answer to relay as it came."""
    async with upstream.call(
        request.app.ctx.session,
        "GET",
        _upstream_url(request, exchange.settings, "/v1/models"),
        headers=_headers_up(request, exchange, identity=True),
        limits=upstream.limits(exchange.settings, whole=True),
    ) as answer:
        _note_status(exchange, answer.status)
        body = await answer.read()
    if answer.status != 200:
        return HTTPResponse(
            body, status=answer.status, headers=upstream.response_headers(answer.headers.items())
        )
    try:
        listing = payload.loads(body)
    except ProxyError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise upstream.UpstreamError(502, "the upstream's model list is not an OpenAI list", "bad_response")
    return listing


def _alias_entry(alias: str) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": 0, "owned_by": "openai-model-rerouter"}


async def healthz(request: Request) -> HTTPResponse:
    return json({"status": "ok"})


async def readyz(request: Request) -> HTTPResponse:
    """200 while the upstream answers HTTP at all (any status below 500), probed at most every
    few seconds per worker so a busy kubelet cannot turn probes into upstream load."""
    if request.app.ctx.draining:
        return ProxyError(503, "the proxy is shutting down", "shutting_down").response()
    checked, ready = request.app.ctx.ready
    now = time.monotonic()
    if now - checked >= READY_CACHE_SECONDS:
        ready = await _probe(request)
        request.app.ctx.ready = (now, ready)
    if ready:
        return json({"status": "ready"})
    return ProxyError(503, "the upstream does not answer", "upstream_unavailable").response()


async def _probe(request: Request) -> bool:
    try:
        async with request.app.ctx.session.get(
            _upstream_url(request, request.app.ctx.settings, "/v1/models"), timeout=READY_PROBE_TIMEOUT
        ) as answer:
            return answer.status < 500
    except upstream.FAILURES:
        return False


async def metrics_page(request: Request) -> HTTPResponse:
    body, content_type = metrics.render()
    return HTTPResponse(body, content_type=content_type)
