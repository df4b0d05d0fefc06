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
from typing import Any
from urllib.parse import unquote

import aiohttp
import structlog
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from service import access, backends, cors, listing, logs, metrics, payload, reload, upstream
from service.backends import DEFAULT_BACKEND
from service.config import Settings
from service.dispatch import dispatch
from service.errors import ProxyError
from service.exchange import Exchange, endpoint_of, is_anthropic, why_cancelled
from service.relay import upstream_url

log = structlog.get_logger("rerouter")

READY_CACHE_SECONDS = 5.0
READY_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)


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
        error = ProxyError(exc.status_code, str(exc), code, getattr(exc, "headers", None))
        return error.response(anthropic=is_anthropic(endpoint_of(request.path)))

    @app.exception(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unexpected error")
        return ProxyError(500, "the proxy failed to handle this request", "internal_error").response()

    app.add_route(healthz, "/healthz", methods=["GET", "HEAD"])
    app.add_route(readyz, "/readyz", methods=["GET", "HEAD"])
    app.add_route(metrics_page, "/metrics", methods=["GET"])
    app.add_route(list_models, "/v1/models", methods=["GET", "OPTIONS"])
    app.add_route(get_model, "/v1/models/<model_id:path>", methods=["GET", "OPTIONS"])
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
        preflight = cors.preflight(request, exchange.settings.cors_allow_origins)
        if preflight is not None:  # answered before the key check: browsers send none with it
            exchange.status = preflight.status
            preflight.headers.update(exchange.tags())
            return preflight
        if exchange.settings.api_keys:
            access.check_key(exchange.settings.api_keys, request.headers.items())
        response: HTTPResponse | None = await handler(request, exchange, *args)
        if response is not None:
            exchange.status = response.status
            exchange.stamp(response.headers)
        return response
    except ProxyError as exc:
        exchange.status = exc.status
        if isinstance(exc, upstream.UpstreamError):
            exchange.upstream_error = exc.reason
        error = exc.response(anthropic=exchange.anthropic)
        exchange.stamp(error.headers)
        return error
    except Exception:
        log.exception("unexpected error")
        exchange.status = 500
        failure = ProxyError(500, "the proxy failed to handle this request", "internal_error")
        error = failure.response(anthropic=exchange.anthropic)
        exchange.stamp(error.headers)
        return error
    except asyncio.CancelledError:
        exchange.cancelled(why_cancelled(request))
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
    return await dispatch(request, exchange, first.body, lambda choice: body_for(choice).body)


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
            upstream_url(request, url, "/v1/models"), timeout=READY_PROBE_TIMEOUT
        ) as answer:
            return answer.status < 500
    except upstream.FAILURES:
        return False


async def metrics_page(request: Request) -> HTTPResponse:
    body, content_type = metrics.render()
    return HTTPResponse(body, content_type=content_type)
