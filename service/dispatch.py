"""Fallbacks and retries: which target and replica each attempt goes to, and when to move on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from sanic import Request
from sanic.response import HTTPResponse

from service import backends, logs, metrics, payload, upstream
from service.exchange import Exchange
from service.mapping import Target
from service.relay import TryNext, relay

log = structlog.get_logger("rerouter")

# Failures worth another try (RETRIES, fallback targets) besides a 5xx or 429 answer.
RETRYABLE = frozenset({"connect", "timeout", "disconnected"})


def dispatch(
    request: Request, exchange: Exchange, body: bytes, body_for: Callable[[int], bytes]
) -> Coroutine[Any, Any, HTTPResponse | None]:
    """Try the resolution's targets in order, each up to 1 + RETRIES times, moving on only while
    nothing has reached the client: after the first byte an answer is the client's, good or bad.

    With nothing to fall back on, the one attempt is all there is: no bookkeeping, and no frame
    of this function (nor ``body_for``) kept while a stream lasts."""
    targets = exchange.resolution.targets if exchange.resolution else (Target(""),)
    if len(targets) == 1 and not exchange.settings.retries:
        return _attempt(request, exchange, targets[0], body, None, last=True)
    return _fall_back(request, exchange, targets, body, body_for)


async def _fall_back(
    request: Request,
    exchange: Exchange,
    targets: tuple[Target, ...],
    body: bytes,
    body_for: Callable[[int], bytes],
) -> HTTPResponse | None:
    settings = exchange.settings
    plan = [(choice, target) for choice, target in enumerate(targets) for _ in range(settings.retries + 1)]
    tried: set[str] = set()
    retry = 0
    for number, (choice, target) in enumerate(plan):
        if number and choice != plan[number - 1][0]:
            body, retry = body_for(choice), 0
        try:
            return await _attempt(request, exchange, target, body, tried, last=number == len(plan) - 1)
        except TryNext as failed:
            following = plan[number + 1][1]
            labels = request.app.ctx.labels
            metrics.PENDING.count(metrics.UPSTREAM_ERRORS, (labels(target.model or None), failed.reason))
            metrics.PENDING.count(
                metrics.FALLBACKS,
                (
                    labels(exchange.resolution.source if exchange.resolution else None),
                    labels(target.model or None),
                    labels(following.model or None),
                    failed.reason,
                ),
            )
            log.warning(
                "upstream attempt failed, trying again" if following == target else "falling back",
                from_target=logs.bounded(target.model, settings.max_model_id_length),
                from_upstream=target.upstream,
                to_target=logs.bounded(following.model, settings.max_model_id_length),
                to_upstream=following.upstream,
                reason=failed.reason,
            )
            exchange.status, exchange.upstream_error = 0, None
            if following == target:
                retry += 1
                await asyncio.sleep(backends.backoff(retry))
    raise AssertionError("the last attempt neither answers nor raises")  # pragma: no cover


async def _attempt(
    request: Request, exchange: Exchange, target: Target, body: bytes, tried: set[str] | None, *, last: bool
) -> HTTPResponse | None:
    """One try on one replica of the target's backend; its in-flight count covers the whole
    answer, streams included, and a failure of the replica itself starts its cool-down.
    ``tried``: the replicas tried before, this one added (None: no other attempt follows)."""
    settings = exchange.settings
    backend = settings.backends[target.upstream]
    replicas = exchange.replicas[target.upstream]
    url = replicas.pick(tried or ()) or replicas.pick()
    assert url is not None  # pick() without exclusions always has a URL
    if tried is not None:
        tried.add(url)
    exchange.target, exchange.backend = target, backend.name
    think = "keep"
    if request.method == "POST" and exchange.endpoint in payload.COMPLETION_ENDPOINTS:
        think = settings.thinking.output_for(target.model, target.route)
    source = exchange.resolution.source if exchange.resolution else None
    rename = source if settings.response_model == "requested" and source != target.model else None
    healthy: bool | None = None  # unknown: the client left, or its request was refused here
    relayed = relay(request, exchange, backend, url, body, think, rename, last=last)
    del body  # the relay's now, which lets go of it once sent: a stream would hold it throughout
    replicas.start(url)
    try:
        response = await relayed
        failed = exchange.status >= 500 or exchange.status == 429 or exchange.outcome == "upstream_error"
        healthy = not failed
        return response
    except TryNext:
        healthy = False
        raise
    except upstream.UpstreamError as exc:
        healthy = False
        if not last and exc.reason in RETRYABLE:
            raise TryNext(exc.reason) from None
        raise
    finally:
        exchange.from_upstream()
        replicas.done(url, healthy)
