"""The model list: every backend's ``/v1/models`` merged with MODEL_MAP's aliases, and one
model's entry, an alias described under its own id."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from sanic import Request
from sanic.response import HTTPResponse, json

from service import payload, upstream
from service.backends import DEFAULT_BACKEND
from service.dispatch import dispatch
from service.errors import ProxyError
from service.exchange import Exchange
from service.relay import Relayed, headers_up, note_status, upstream_url

log = structlog.get_logger("rerouter")


async def list_models(request: Request, exchange: Exchange) -> HTTPResponse:
    """Every backend's list merged (the first backend naming an id describes it), plus every exact
    alias of MODEL_MAP that no backend names. A backend that fails is left out, logged; only when
    none answers does the client get the default backend's answer or error."""
    names = list(exchange.settings.backends)
    exchange.to_upstream()
    results = await asyncio.gather(
        *(_upstream_models(request, exchange, name) for name in names), return_exceptions=True
    )
    exchange.from_upstream()
    listing: dict[str, Any] | None = None
    carried: list[tuple[str, str]] = []
    entries: list[Any] = []
    present: set[str] = set()
    answered: list[str] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, tuple):
            if listing is None:
                listing, carried = result[0], _cors_headers(result[1])
            answered.append(name)
            for entry in result[0]["data"]:
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
            note_status(exchange, first.status)
            return first
        raise first  # type: ignore[misc]
    exchange.backend = ",".join(answered)
    aliases = exchange.settings.model_map.aliases()
    listing["data"] = entries + [_alias_entry(alias) for alias in aliases if alias not in present]
    return HTTPResponse(payload.dumps(listing), headers=carried, content_type="application/json")


async def get_model(request: Request, exchange: Exchange, model_id: str) -> HTTPResponse | None:
    """An alias is described by its first target's entry from that target's backend, under its
    own id; any other id is the default backend's to answer."""
    payload.check_model_id(model_id, exchange.settings.max_model_id_length)
    resolution = exchange.settings.model_map.resolve(model_id)
    exchange.resolution = resolution
    if resolution.rule is None:
        return await dispatch(request, exchange, b"", lambda _: b"")
    target = resolution.targets[0]
    exchange.target, exchange.backend = target, target.upstream
    exchange.to_upstream()
    try:
        answer = await _upstream_models(request, exchange, target.upstream)
    finally:
        exchange.from_upstream()
    if isinstance(answer, HTTPResponse):
        note_status(exchange, answer.status)
        return answer
    listing, headers = answer
    for entry in listing["data"]:
        if isinstance(entry, dict) and entry.get("id") == target.model:
            return json({**entry, "id": model_id}, headers=_cors_headers(headers))
    raise ProxyError(
        404,
        f"model {model_id!r} maps to {target.model!r}, which upstream {target.upstream!r} does not list",
        "model_not_found",
    )


async def _upstream_models(
    request: Request, exchange: Exchange, name: str
) -> tuple[dict[str, Any], list[tuple[str, str]]] | HTTPResponse:
    """A backend's /v1/models listing and its headers, or its non-200 answer to relay as it
    came. A replica that fails (no connection, timeout, 5xx) hands over to the next one, so one
    dead replica does not hide a backend whose others serve."""
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
        return Relayed(body, status=status, headers=headers)
    try:
        listing = payload.loads(body)
    except ProxyError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise upstream.UpstreamError(502, "the upstream's model list is not an OpenAI list", "bad_response")
    return listing, headers


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
            upstream_url(request, url, "/v1/models"),
            headers=headers_up(request, exchange, backend, identity=True),
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


def _cors_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's CORS headers, kept on an answer the proxy builds from its list (when the
    proxy answers CORS itself, ``Exchange.stamp`` replaces them)."""
    return [(name, value) for name, value in headers if name.lower().startswith("access-control-")]


def _alias_entry(alias: str) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": 0, "owned_by": "openai-model-rerouter"}
