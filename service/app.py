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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import structlog
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from service import access, backends, logs, metrics, payload, reload, renaming, upstream
from service.backends import DEFAULT_BACKEND, Backend, Replicas
from service.config import Settings
from service.errors import ProxyError
from service.mapping import Resolution, Target
from service.reasoning import ThinkStream, transform_message

log = structlog.get_logger("rerouter")

# Failures worth another try (RETRIES, fallback targets) besides a 5xx or 429 answer.
RETRYABLE = frozenset({"connect", "timeout", "disconnected"})
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


@dataclass(slots=True)
class Exchange:
    """What one request did, gathered on the way for its log event and metrics."""

    request_id: str
    endpoint: str
    settings: Settings
    replicas: Mapping[str, Replicas]  # taken with the settings: a reload swaps both at once
    started: float = field(default_factory=time.perf_counter)
    resolution: Resolution | None = None
    target: Target | None = None  # the one the answer came from (the last tried)
    backend: str = DEFAULT_BACKEND
    stream: bool = False
    status: int = 0
    first_byte: float | None = None
    outcome: str | None = None
    upstream_error: str | None = None
    think_blocks: int = 0

    @classmethod
    def begin(cls, request: Request, endpoint: str) -> Exchange:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        metrics.IN_FLIGHT.inc()
        return cls(request_id, endpoint, request.app.ctx.settings, request.app.ctx.replicas)

    def tags(self) -> dict[str, str]:
        """Headers on every proxied response: the request id, the upstream, the served model
        (percent-encoded: a client's model id must not be able to inject header bytes)."""
        tags = {"x-request-id": self.request_id, "x-rerouter-upstream": self.backend}
        served = self.served
        if served:
            tags["x-rerouter-target-model"] = quote(served, safe="/:@._-+=")
        return tags

    @property
    def served(self) -> str | None:
        """The model id the answer came from: the target tried last, else the first target."""
        if self.target is not None and self.target.model:
            return self.target.model
        return self.resolution.target if self.resolution else None

    def finish(self, labels: metrics.ModelLabels) -> None:
        duration = time.perf_counter() - self.started
        source = self.resolution.source if self.resolution else None
        target = self.served
        target_label = labels(target)
        metrics.IN_FLIGHT.dec()
        metrics.child(metrics.REQUESTS, self.endpoint, labels(source), target_label, str(self.status)).inc()
        metrics.child(metrics.DURATION, self.endpoint, target_label).observe(duration)
        if self.first_byte is not None:
            metrics.child(metrics.TIME_TO_FIRST_BYTE, self.endpoint, target_label).observe(
                self.first_byte - self.started
            )
        if self.outcome is not None:
            metrics.child(metrics.STREAMS, self.endpoint, target_label, self.outcome).inc()
        if self.upstream_error is not None:
            metrics.child(metrics.UPSTREAM_ERRORS, target_label, self.upstream_error).inc()
        if self.think_blocks:
            metrics.child(metrics.THINKING_STRIPPED, target_label).inc(self.think_blocks)
        log.info(
            "request",
            endpoint=self.endpoint,
            source_model=source,
            target_model=target,
            upstream=self.backend,
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

    app.ctx.replicas = backends.pools(settings.backends, settings.upstream_cooldown)

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
        # After the answer is written: Sanic sends a returned response before the loop runs this.
        asyncio.get_running_loop().call_soon(exchange.finish, request.app.ctx.labels)


async def proxy(request: Request, path: str) -> HTTPResponse | None:
    return await observed(request, endpoint_of(request.path), _forward)


async def _forward(request: Request, exchange: Exchange) -> HTTPResponse | None:
    settings = exchange.settings
    content_type = request.headers.get("content-type", "")

    def body_for(choice: int) -> payload.Rewritten:
        return payload.rewrite(
            request.body,
            content_type,
            exchange.endpoint,
            settings.model_map,
            settings.policy,
            request.method,
            choice,
        )

    first = body_for(0)
    exchange.resolution = first.resolution
    exchange.stream = first.stream
    return await _dispatch(request, exchange, first.body, lambda choice: body_for(choice).body)


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """SSE filters in a row: think stripping, then renaming (either may be absent)."""

    think: ThinkStream | None
    rename: renaming.RenameStream | None

    def feed(self, chunk: bytes) -> bytes:
        if self.think is not None:
            chunk = self.think.feed(chunk)
        return self.rename.feed(chunk) if self.rename is not None and chunk else chunk

    def close(self) -> bytes:
        tail = self.think.close() if self.think is not None else b""
        if self.rename is not None:
            tail = (self.rename.feed(tail) if tail else b"") + self.rename.close()
        return tail

    @property
    def stripped(self) -> int:
        return self.think.stripped if self.think is not None else 0


class _TryNext(Exception):
    """This attempt failed before any byte reached the client, and another one is left."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


async def _dispatch(
    request: Request, exchange: Exchange, body: bytes, body_for: Callable[[int], bytes]
) -> HTTPResponse | None:
    """Try the resolution's targets in order, each up to 1 + RETRIES times, moving on only while
    nothing has reached the client: after the first byte an answer is the client's, good or bad."""
    settings = exchange.settings
    targets = exchange.resolution.targets if exchange.resolution else (Target(""),)
    plan = [(choice, target) for choice, target in enumerate(targets) for _ in range(settings.retries + 1)]
    tried: set[str] = set()
    retry = 0
    for number, (choice, target) in enumerate(plan):
        if number and choice != plan[number - 1][0]:
            body, retry = body_for(choice), 0
        try:
            return await _attempt(request, exchange, target, body, tried, last=number == len(plan) - 1)
        except _TryNext as failed:
            following = plan[number + 1][1]
            labels = request.app.ctx.labels
            metrics.child(metrics.UPSTREAM_ERRORS, labels(target.model or None), failed.reason).inc()
            metrics.child(
                metrics.FALLBACKS,
                labels(exchange.resolution.source if exchange.resolution else None),
                labels(target.model or None),
                labels(following.model or None),
                failed.reason,
            ).inc()
            log.warning(
                "upstream attempt failed, trying again" if following == target else "falling back",
                from_target=target.model,
                from_upstream=target.upstream,
                to_target=following.model,
                to_upstream=following.upstream,
                reason=failed.reason,
            )
            exchange.status, exchange.upstream_error = 0, None
            if following == target:
                retry += 1
                await asyncio.sleep(backends.backoff(retry))
    raise AssertionError("the last attempt neither answers nor raises")  # pragma: no cover


async def _attempt(
    request: Request, exchange: Exchange, target: Target, body: bytes, tried: set[str], *, last: bool
) -> HTTPResponse | None:
    """One try on one replica of the target's backend; its in-flight count covers the whole
    answer, streams included, and a failure of the replica itself starts its cool-down."""
    settings = exchange.settings
    backend = settings.backends[target.upstream]
    replicas = exchange.replicas[target.upstream]
    url = replicas.pick(tried) or replicas.pick()
    assert url is not None  # pick() without exclusions always has a URL
    tried.add(url)
    exchange.target, exchange.backend = target, backend.name
    think = "keep"
    if request.method == "POST" and exchange.endpoint in payload.COMPLETION_ENDPOINTS:
        think = settings.thinking.output_for(target.model)
    source = exchange.resolution.source if exchange.resolution else None
    rename = source if settings.response_model == "requested" and source != target.model else None
    healthy: bool | None = None  # unknown: the client left, or its request was refused here
    replicas.start(url)
    try:
        response = await _relay(request, exchange, backend, url, body, think, rename, last=last)
        failed = exchange.status >= 500 or exchange.status == 429 or exchange.outcome == "upstream_error"
        healthy = not failed
        return response
    except _TryNext:
        healthy = False
        raise
    except upstream.UpstreamError as exc:
        healthy = False
        if not last and exc.reason in RETRYABLE:
            raise _TryNext(exc.reason) from None
        raise
    finally:
        replicas.done(url, healthy)


def _upstream_url(request: Request, base: str, path: str | None = None) -> str:
    query = request.query_string
    return base + (path or request.path) + (f"?{query}" if query else "")


def _headers_up(request: Request, exchange: Exchange, backend: Backend, *, identity: bool = False) -> Any:
    """The client's headers for the upstream; the backend's key (or UPSTREAM_API_KEY) replaces
    the client's credential."""
    key = backend.api_key or exchange.settings.upstream_api_key
    headers = upstream.request_headers(request.headers, without=access.CREDENTIAL_HEADERS if key else ())
    if key:
        headers["authorization"] = f"Bearer {key}"
    headers["x-request-id"] = exchange.request_id
    if identity:
        headers["accept-encoding"] = "identity"
    return headers


async def _relay(
    request: Request,
    exchange: Exchange,
    backend: Backend,
    url: str,
    body: bytes,
    think: str = "keep",
    rename: str | None = None,
    *,
    last: bool = True,
) -> HTTPResponse | None:
    """Forward, and relay the answer.

    Read whole first: answers with a length or without a body, and JSON answers (a JSON answer
    cut or stalled half-way then still gets its own 502/504, and think blocks can be taken
    out). Relayed as they arrive: event streams and anything else of unknown length. ``think``
    other than ``keep`` rewrites think blocks in a successful completion answer, and ``rename``
    names the model the client asked for in it; both need it unencoded. Otherwise the answer's
    bytes are relayed untouched. Unless ``last``, a 5xx or 429 is not relayed but tried again.
    """
    settings = exchange.settings
    async with upstream.call(
        request.app.ctx.session,
        request.method,
        _upstream_url(request, url),
        data=body or None,
        headers=_headers_up(request, exchange, backend, identity=think != "keep" or rename is not None),
        limits=upstream.limits(settings, backend, whole=not exchange.stream),
    ) as answer:
        if not last and (answer.status >= 500 or answer.status == 429):
            raise _TryNext(f"http_{answer.status}" if answer.status == 429 else "http_5xx")
        _note_status(exchange, answer.status)
        headers = upstream.response_headers(answer.headers.items())
        event_stream = answer.content_type == "text/event-stream"
        transform = answer.status == 200 and (think != "keep" or rename is not None)
        encoding = answer.headers.get("content-encoding", "identity").lower()
        if transform and encoding not in ("", "identity"):
            # Asked for identity, got it compressed anyway: relayed as it came, not rewritten.
            log.warning("answer left as sent: the upstream compressed it", encoding=encoding)
            transform = False
        chat = exchange.endpoint == "chat/completions"
        json_answer = answer.content_type == "application/json"
        gap = settings.read_timeout(backend)
        if not event_stream and (
            json_answer
            or answer.content_length is not None
            or answer.status in (204, 304)
            or request.method == "HEAD"
        ):
            with upstream.BodyReader(answer, gap) as reader:
                data = await reader.whole()
            if transform and json_answer:
                data = _transformed(data, think, chat, rename, exchange)
            return HTTPResponse(data, status=answer.status, headers=headers)
        stream = _stream_filter(think, chat, rename) if transform and event_stream else None
        await _stream(request, exchange, answer, headers, gap, stream)
        return None


def _transformed(data: bytes, think: str, chat: bool, rename: str | None, exchange: Exchange) -> bytes:
    if think != "keep":
        data = _without_think(data, think, chat, exchange)
    return renaming.rename_json(data, rename) if rename is not None else data


def _stream_filter(think: str, chat: bool, rename: str | None) -> StreamFilter:
    """Think stripping, then renaming, each an SSE filter of its own (bytes in, bytes out)."""
    stripper = ThinkStream(think, chat) if think != "keep" else None
    renamer = renaming.RenameStream(rename) if rename is not None else None
    return StreamFilter(stripper, renamer)


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
    gap: float,
    think: StreamFilter | None,
) -> None:
    """Relay chunks as they arrive (through ``think`` when given). An upstream failure mid-way
    closes the client's connection without the final chunk, so the client sees a broken stream
    rather than a clean end."""
    tags = exchange.tags()
    headers = [(name, value) for name, value in headers if name.lower() not in tags]
    headers.extend(tags.items())
    if answer.content_type == "text/event-stream":
        headers.append(("x-accel-buffering", "no"))
    with upstream.BodyReader(answer, gap) as body:
        first = await body.read()  # before any byte is sent, a failure still gets its status
        exchange.outcome = "started"
        response = await request.respond(status=answer.status, headers=headers)
        try:
            chunk = first
            while chunk:
                data = chunk if think is None else think.feed(chunk)
                if data:
                    if exchange.first_byte is None:
                        exchange.first_byte = time.perf_counter()
                    await response.send(data)
                chunk = await body.read()
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


async def list_models(request: Request) -> HTTPResponse | None:
    return await observed(request, "models", _list_models)


async def _list_models(request: Request, exchange: Exchange) -> HTTPResponse:
    """Every backend's list merged (the first backend naming an id describes it), plus every exact
    alias of MODEL_MAP that no backend names. A backend that fails is left out, logged; only when
    none answers does the client get the default backend's answer or error."""
    names = list(exchange.settings.backends)
    results = await asyncio.gather(
        *(_upstream_models(request, exchange, name) for name in names), return_exceptions=True
    )
    listing: dict[str, Any] | None = None
    entries: list[Any] = []
    present: set[str] = set()
    answered: list[str] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, dict):
            listing = listing or result
            answered.append(name)
            for entry in result["data"]:
                key = entry.get("id") if isinstance(entry, dict) else None
                if isinstance(key, str):
                    if key in present:
                        continue
                    present.add(key)
                entries.append(entry)
            continue
        if isinstance(result, BaseException) and not isinstance(result, upstream.UpstreamError):
            raise result  # the client's own fault (a bad header) or a bug: not the backend's
        reason = (
            result.reason if isinstance(result, upstream.UpstreamError) else f"http_{result.status // 100}xx"
        )
        log.warning("model list unavailable", upstream=name, reason=reason)
    if listing is None:
        exchange.backend = DEFAULT_BACKEND
        first = results[names.index(DEFAULT_BACKEND)]
        if isinstance(first, HTTPResponse):
            _note_status(exchange, first.status)
            return first
        raise first  # type: ignore[misc]
    exchange.backend = ",".join(answered)
    aliases = exchange.settings.model_map.aliases()
    listing["data"] = entries + [_alias_entry(alias) for alias in aliases if alias not in present]
    return HTTPResponse(payload.dumps(listing), content_type="application/json")


async def get_model(request: Request, model_id: str) -> HTTPResponse | None:
    return await observed(request, "models", _get_model, unquote(model_id))


async def _get_model(request: Request, exchange: Exchange, model_id: str) -> HTTPResponse | None:
    """An alias is described by its first target's entry from that target's backend, under its
    own id; any other id is the default backend's to answer."""
    resolution = exchange.settings.model_map.resolve(model_id)
    exchange.resolution = resolution
    if resolution.rule is None:
        return await _dispatch(request, exchange, b"", lambda _: b"")
    target = resolution.targets[0]
    exchange.target, exchange.backend = target, target.upstream
    listing = await _upstream_models(request, exchange, target.upstream)
    if isinstance(listing, HTTPResponse):
        _note_status(exchange, listing.status)
        return listing
    for entry in listing["data"]:
        if isinstance(entry, dict) and entry.get("id") == target.model:
            return json({**entry, "id": model_id})
    raise ProxyError(
        404,
        f"model {model_id!r} maps to {target.model!r}, which upstream {target.upstream!r} does not list",
        "model_not_found",
    )


async def _upstream_models(request: Request, exchange: Exchange, name: str) -> dict[str, Any] | HTTPResponse:
    """A backend's /v1/models listing, or its non-200 answer to relay as it came. A replica that
    fails (no connection, timeout, 5xx) hands over to the next one, so one dead replica does not
    hide a backend whose others serve."""
    replicas = exchange.replicas[name]
    tried: set[str] = set()
    while True:
        url = replicas.pick(tried)
        assert url is not None
        tried.add(url)
        last = len(tried) == len(replicas.urls)
        try:
            status, headers, body = await _listing_from(request, exchange, name, url)
        except upstream.UpstreamError:
            if last:
                raise
            continue
        if status < 500 or last:
            break
    if status != 200:
        return HTTPResponse(body, status=status, headers=headers)
    try:
        listing = payload.loads(body)
    except ProxyError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise upstream.UpstreamError(502, "the upstream's model list is not an OpenAI list", "bad_response")
    return listing


async def _listing_from(
    request: Request, exchange: Exchange, name: str, url: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    settings = exchange.settings
    backend = settings.backends[name]
    replicas = exchange.replicas[name]
    healthy: bool | None = None
    replicas.start(url)
    try:
        async with upstream.call(
            request.app.ctx.session,
            "GET",
            _upstream_url(request, url, "/v1/models"),
            headers=_headers_up(request, exchange, backend, identity=True),
            limits=upstream.limits(settings, backend, whole=True),
        ) as answer:
            body = await answer.read()
        healthy = answer.status < 500
        return answer.status, upstream.response_headers(answer.headers.items()), body
    except upstream.UpstreamError:
        healthy = False
        raise
    finally:
        replicas.done(url, healthy)


def _alias_entry(alias: str) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": 0, "owned_by": "openai-model-rerouter"}


async def healthz(request: Request) -> HTTPResponse:
    return json({"status": "ok"})


async def readyz(request: Request) -> HTTPResponse:
    """200 while the default backend answers HTTP at all (any status below 500), probed at most
    every few seconds per worker so a busy kubelet cannot turn probes into upstream load."""
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
    """Any replica of the default backend answering is enough: requests skip the others."""
    urls = request.app.ctx.replicas[DEFAULT_BACKEND].urls
    return any(await asyncio.gather(*(_answers(request, url) for url in urls)))


async def _answers(request: Request, url: str) -> bool:
    try:
        async with request.app.ctx.session.get(
            _upstream_url(request, url, "/v1/models"), timeout=READY_PROBE_TIMEOUT
        ) as answer:
            return answer.status < 500
    except upstream.FAILURES:
        return False


async def metrics_page(request: Request) -> HTTPResponse:
    body, content_type = metrics.render()
    return HTTPResponse(body, content_type=content_type)
