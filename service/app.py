"""The Sanic application: the whole request path, top to bottom.

A ``/v1/...`` request is read, its model resolved and rewritten (``payload``), tried on its
targets in fallback order (``dispatch``), forwarded through the worker's shared aiohttp session
(``upstream``), and the answer relayed (``relay``): streams chunk by chunk as they arrive, other
bodies whole. ``/v1/models`` merges every backend's list (``listing``). Each request ends in one
log event and one set of metric samples (``exchange.Exchange.finish``), whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote

import aiohttp
import structlog
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from service import access, backends, cors, guard, listing, logs, metrics, payload, reload, upstream
from service.backends import DEFAULT_BACKEND
from service.config import Settings
from service.dispatch import dispatch
from service.errors import ProxyError
from service.exchange import Exchange, endpoint_of, is_anthropic, why_cancelled

log = structlog.get_logger("rerouter")

READY_CACHE_SECONDS = 5.0
READY_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)
_SANIC_CODES = {404: "not_found", 408: "request_timeout"}


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
    app.ctx.labels = metrics.ModelLabels(
        settings.metrics_max_models, settings.model_map.known_ids(), settings.max_model_id_length
    )
    app.ctx.ready = (0.0, False)
    app.ctx.probe = None
    app.ctx.draining = False

    app.ctx.replicas = backends.pools(settings.backends, settings.upstream_cooldown)

    @app.before_server_start
    async def open_session(app: Sanic) -> None:
        app.ctx.session = upstream.new_session(settings)
        # asyncio.get_running_loop() checks the process id: a system call on every use.
        app.ctx.loop = asyncio.get_running_loop()

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
        code = _SANIC_CODES.get(exc.status_code, "invalid_request")
        error = ProxyError(exc.status_code, str(exc), code, getattr(exc, "headers", None))
        # The raw target: for an absolute-form one without a path, Sanic's request.path raises.
        path = request.raw_url.partition(b"?")[0].decode("utf-8", "replace")
        return error.response(anthropic=is_anthropic(endpoint_of(path)))

    @app.exception(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unexpected error")
        return ProxyError(500, "the proxy failed to handle this request", "internal_error").response()

    # stream=True on every route: Sanic reads no body before the handler, which reads it
    # (guard.read_body) only once the request is admitted.
    app.add_route(healthz, "/healthz", methods=["GET", "HEAD"], stream=True)
    app.add_route(readyz, "/readyz", methods=["GET", "HEAD"], stream=True)
    app.add_route(metrics_page, "/metrics", methods=["GET"], stream=True)
    app.add_route(list_models, "/v1/models", methods=["GET", "OPTIONS"], stream=True)
    app.add_route(get_model, "/v1/models/<model_id:path>", methods=["GET", "OPTIONS"], stream=True)
    app.add_route(
        proxy,
        "/v1/<path:path>",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        stream=True,
    )
    return app


async def observed(request: Request, endpoint: str | None, handler: Any, *args: Any) -> HTTPResponse | None:
    """Run a proxied handler with its bookkeeping: request id, errors, metrics, one log event."""
    exchange = Exchange.begin(request, endpoint)
    try:
        # Admission runs on the head alone: no body byte is read before it lets a request in.
        access.check_path(exchange.path)
        preflight = cors.preflight(request, exchange.settings.cors_allow_origins)
        if preflight is not None:  # answered before the key check: browsers send none with it
            exchange.status = preflight.status
            preflight.headers.update(exchange.tags())
            return preflight
        if exchange.settings.api_keys:
            access.check_key(exchange.settings.api_keys, request.headers.items())
        await guard.read_body(request, exchange.settings)
        response: HTTPResponse | None = await handler(request, exchange, *args)
        if response is not None:
            exchange.status = response.status
            _tag(response, exchange)
        return response
    except ProxyError as exc:
        exchange.status = exc.status
        if isinstance(exc, upstream.UpstreamError):
            exchange.upstream_error = exc.reason
        return _tag(exc.response(anthropic=exchange.anthropic), exchange)
    except Exception:
        log.exception("unexpected error")
        exchange.status = 500
        error = ProxyError(500, "the proxy failed to handle this request", "internal_error")
        return _tag(error.response(anthropic=exchange.anthropic), exchange)
    except asyncio.CancelledError:
        exchange.cancelled(why_cancelled(request))
        raise
    finally:
        # After the answer is written: Sanic sends a returned response before the loop runs this.
        request.app.ctx.loop.call_soon(exchange.finish, request.app.ctx.labels)


def _tag(response: HTTPResponse, exchange: Exchange) -> HTTPResponse:
    """The exchange's headers on an answer sent whole; Server-Timing is added last, after any the
    upstream sent, so the proxy's time covers everything up to here."""
    exchange.stamp(response.headers)
    response.headers.add("server-timing", exchange.timing())
    return response


def proxy(request: Request, path: str) -> Coroutine[Any, Any, HTTPResponse | None]:
    """Plain functions that hand on a coroutine (here, ``_forward`` and ``dispatch``) leave no
    frame behind to hold for the whole of a stream: one idle stream costs a few KiB less."""
    return observed(request, None, _forward)


def _forward(request: Request, exchange: Exchange) -> Coroutine[Any, Any, HTTPResponse | None]:
    settings = exchange.settings
    content_type = _one_content_type(request)

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
    exchange.hide_usage = first.usage_added
    return dispatch(request, exchange, first.body, lambda choice: body_for(choice).body)


def _one_content_type(request: Request) -> str:
    """The body's media type, when the proxy can read the body as the upstream will: one
    Content-Type (with two, the upstream may read the other), and no Content-Encoding (a
    compressed body would reach the upstream with its model unmapped)."""
    types = request.headers.getall("content-type", [])
    if len(types) > 1:
        raise ProxyError(400, "more than one Content-Type header", "invalid_header")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if request.body and encoding not in ("", "identity"):
        raise ProxyError(415, "compressed request bodies are not supported", "unsupported_content_encoding")
    return types[0] if types else ""


async def list_models(request: Request) -> HTTPResponse | None:
    """OPTIONS (a preflight, when the proxy does not answer it) goes to the upstream as it came."""
    return await observed(request, "models", _forward if request.method == "OPTIONS" else listing.list_models)


async def get_model(request: Request, model_id: str) -> HTTPResponse | None:
    if request.method == "OPTIONS":
        return await observed(request, "models", _forward)
    return await observed(request, "models", listing.get_model, unquote(model_id))


async def healthz(request: Request) -> HTTPResponse:
    return json({"status": "ok"})


async def readyz(request: Request) -> HTTPResponse:
    """200 while the default backend answers HTTP at all (any status below 500), probed at most
    every few seconds per worker so a busy kubelet cannot turn probes into upstream load."""
    if request.app.ctx.draining:
        return ProxyError(503, "the proxy is shutting down", "shutting_down").response()
    if await _readiness(request.app):
        return json({"status": "ready"})
    return ProxyError(503, "the upstream does not answer", "upstream_unavailable").response()


async def _readiness(app: Sanic) -> bool:
    """The cached answer, else the one probe in flight: however many callers, a worker sends at
    most one at a time. Shielded, so a caller that leaves does not cancel it for the others."""
    checked, ready = app.ctx.ready
    if time.monotonic() - checked < READY_CACHE_SECONDS:
        return bool(ready)
    if app.ctx.probe is None:
        app.ctx.probe = asyncio.ensure_future(_probe(app))
        app.ctx.probe.add_done_callback(lambda probe: _probed(app, probe))
    return bool(await asyncio.shield(app.ctx.probe))


def _probed(app: Sanic, probe: asyncio.Future[bool]) -> None:
    app.ctx.probe = None
    if not probe.cancelled() and probe.exception() is None:
        app.ctx.ready = (time.monotonic(), probe.result())


async def _probe(app: Sanic) -> bool:
    """Any replica of the default backend answering is enough: requests skip the others."""
    urls = app.ctx.replicas[DEFAULT_BACKEND].urls
    return any(await asyncio.gather(*(_answers(app, url) for url in urls)))


async def _answers(app: Sanic, url: str) -> bool:
    """Never follows a redirect: an answer of any kind below 500 is the backend answering."""
    try:
        async with app.ctx.session.get(
            f"{url}/v1/models", timeout=READY_PROBE_TIMEOUT, allow_redirects=False
        ) as answer:
            return answer.status < 500
    except upstream.FAILURES:
        return False


async def metrics_page(request: Request) -> HTTPResponse:
    body, content_type = metrics.render()
    return HTTPResponse(body, content_type=content_type)
