"""CORS for browser clients: ``CORS_ALLOW_ORIGINS`` (comma-separated origins, or ``*``).

Set, the proxy owns CORS: it answers preflights itself (before any key check: a browser sends
no credentials on a preflight), and every answer to an allowed origin carries its own
``Access-Control-*`` headers in place of the upstream's. Unset, nothing here runs: preflights
and the upstream's CORS headers pass through.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict
from sanic import Request
from sanic.response import HTTPResponse

from service.errors import ProxyError

# The headers added to an answer for an allowed origin; () for a request without an allowed
# origin (the upstream's CORS headers are still removed); None when CORS is not configured.
Answer = tuple[tuple[str, str], ...] | None

ANY = "*"
METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
EXPOSED = "x-request-id, x-rerouter-upstream, x-rerouter-target-model, retry-after"
MAX_AGE = "600"
_HEADERS = frozenset(
    {
        "authorization",
        "api-key",
        "x-api-key",
        "content-type",
        "x-request-id",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
    }
)
_PREFIXES = ("openai-", "x-stainless-")
_NAME = re.compile(r"[a-z0-9-]{1,64}")
_MAX_NAMES = 64  # a preflight naming more is answered for the first ones only
_ORIGIN = re.compile(r"https?://[a-z0-9.\-\[\]:]+")


def parse_origins(value: str) -> tuple[str, ...]:
    """``*``, or origins as browsers send them (``scheme://host[:port]``, no path)."""
    origins = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    for origin in origins:
        if origin != ANY and not _ORIGIN.fullmatch(origin):
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]) or *")
    return origins


def answer_for(origins: tuple[str, ...], origin: str | None) -> Answer:
    """The CORS headers for a request from ``origin``, per the configured ``origins``."""
    if not origins:
        return None
    if origin is None or not _allowed(origins, origin):
        return ()
    return (
        ("access-control-allow-origin", ANY if ANY in origins else origin),
        ("access-control-expose-headers", EXPOSED),
    )


def _allowed(origins: tuple[str, ...], origin: str) -> bool:
    return ANY in origins or origin.lower() in origins


def stamp(headers: CIMultiDict[str], answer: tuple[tuple[str, str], ...]) -> None:
    """The upstream's ``Access-Control-*`` headers replaced by ``answer``, ``Origin`` in ``Vary``."""
    for name in [name for name in headers if name.lower().startswith("access-control-")]:
        headers.popall(name, None)
    if not answer:
        return
    headers.update(answer)
    vary = headers.get("vary")
    if vary is None:
        headers["vary"] = "Origin"
    elif "origin" not in {token.strip().lower() for token in vary.split(",")} and vary.strip() != "*":
        headers["vary"] = f"{vary}, Origin"


def preflight(request: Request, origins: tuple[str, ...]) -> HTTPResponse | None:
    """The answer to a CORS preflight when CORS is configured, else None (not a preflight, or
    CORS unset: then it goes on like any request). Requested headers are allowed when they are
    ones clients send (keys, Content-Type, request id, the SDKs' own ``openai-*``,
    ``x-stainless-*`` and ``anthropic-*``); the others are left out, so the browser refuses."""
    if not origins or request.method != "OPTIONS":
        return None
    origin = request.headers.get("origin")
    if origin is None or "access-control-request-method" not in request.headers:
        return None
    if not _allowed(origins, origin):
        raise ProxyError(403, "this origin is not allowed (CORS_ALLOW_ORIGINS)", "origin_not_allowed")
    headers = {
        "access-control-allow-origin": ANY if ANY in origins else origin,
        "access-control-allow-methods": METHODS,
        "access-control-max-age": MAX_AGE,
        "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    allowed = _requested(request.headers.get("access-control-request-headers", ""))
    if allowed:
        headers["access-control-allow-headers"] = ", ".join(allowed)
    return HTTPResponse(status=204, headers=headers)


def _requested(value: str) -> list[str]:
    names = (name.strip().lower() for name in value.split(",")[:_MAX_NAMES])
    return [
        name for name in names if _NAME.fullmatch(name) and (name in _HEADERS or name.startswith(_PREFIXES))
    ]
