"""The record of one request: what it asked for, where it went, how it ended.

Gathered on the way through the request path and written once, after the answer, as one log
event and one set of metric samples (``Exchange.finish``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote

import structlog
from multidict import CIMultiDict
from sanic import Request
from sanic.exceptions import ServiceUnavailable

from service import cors, logs, metrics, payload, sse
from service.backends import DEFAULT_BACKEND, Replicas
from service.config import Settings
from service.mapping import Resolution, Target
from service.usage import Usage

log = structlog.get_logger("rerouter")

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
        "messages",
        "messages/count_tokens",
    }
)


# The paths of the endpoints, one string each, shared by every request to one: a stream holds
# its path for as long as it lasts.
_PATHS = {path: path for path in (f"/v1/{endpoint}" for endpoint in _ENDPOINTS)}


def why_cancelled(request: Request) -> str:
    """Who ended a request whose handler was cancelled, the way Sanic itself tells: the server
    aborts connections left at the end of GRACEFUL_SHUTDOWN_TIMEOUT (its protocol's transport is
    then gone), RESPONSE_TIMEOUT leaves its exception on the request's stream; otherwise the
    client went away."""
    http = request.stream  # Sanic's connection state for this request
    if getattr(getattr(http, "protocol", None), "transport", True) is None:
        return "proxy_cut"
    if isinstance(getattr(http, "exception", None), ServiceUnavailable):
        return "timeout"
    return "client_disconnected"


def is_anthropic(endpoint: str) -> bool:
    return endpoint.startswith("messages")


def endpoint_of(path: str) -> str:
    """A bounded label for a ``/v1/`` path: the known endpoint it belongs to, else ``other``."""
    rest = path.removeprefix("/v1/").strip("/")
    if rest in _ENDPOINTS:
        return rest
    head = rest.split("/", 1)[0]
    return head if head in _ENDPOINTS else "other"


def _fresh_ids() -> Iterator[str]:
    """Request ids of 16 random bytes in hex, from one ``os.urandom`` per 256 of them: a system
    call per request costs more than the rest of making the id. Drawn lazily, in the worker that
    serves: no two processes hold the same pool."""
    while True:
        pool = os.urandom(4096).hex()
        for start in range(0, len(pool), 32):
            yield pool[start : start + 32]


_FRESH_IDS = _fresh_ids()


@lru_cache(maxsize=256)
def _header_value(model: str) -> str:
    """A model id percent-encoded for a header; remembered, since a handful of served ids
    repeat on every request (bounded: pass-through ids come from clients)."""
    return quote(model, safe="/:@._-+=")


@dataclass(slots=True)
class Exchange:
    """What one request did, gathered on the way for its log event and metrics."""

    request_id: str
    path: str  # decoded once: Sanic's request.path decodes it again on every use
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
    usage: Usage | None = None
    per_token: float | None = None  # streams with usage: seconds per output token
    hide_usage: bool = False  # STREAM_USAGE=always asked for a usage chunk the client did not
    sent: float | None = None  # when the upstream call under way was sent
    upstream_seconds: float = 0.0  # spent waiting on the upstream, every attempt together
    overhead: float | None = None  # the proxy's own time, as Server-Timing reports it
    # The last two pieces relayed to the client (references, not copies): did it get the end?
    sent_before: bytes = b""
    sent_last: bytes = b""
    cors: cors.Answer = None

    @classmethod
    def begin(cls, request: Request, endpoint: str | None = None) -> Exchange:
        """``endpoint``: the metrics label, else the one of the path (``endpoint_of``)."""
        path = request.path
        path = _PATHS.get(path, path)
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else next(_FRESH_IDS)
        logs.bind_request(request_id)
        metrics.PENDING.in_flight(1)
        settings: Settings = request.app.ctx.settings
        exchange = cls(request_id, path, endpoint or endpoint_of(path), settings, request.app.ctx.replicas)
        exchange.cors = cors.answer_for(settings.cors_allow_origins, request.headers.get("origin"))
        return exchange

    def tags(self) -> dict[str, str]:
        """Headers on every proxied response: the request id, the upstream, the served model
        (percent-encoded: a client's model id must not be able to inject header bytes; left out
        when longer than MAX_MODEL_ID_LENGTH or not valid Unicode)."""
        tags = {"x-request-id": self.request_id, "x-rerouter-upstream": self.backend}
        served = self.served
        if served and payload.fits(served, self.settings.max_model_id_length):
            tags["x-rerouter-target-model"] = _header_value(served)
        return tags

    def to_upstream(self) -> None:
        self.sent = time.perf_counter()

    def from_upstream(self) -> None:
        """The upstream call under way ended: its answer is complete, or it failed."""
        if self.sent is not None:
            self.upstream_seconds += time.perf_counter() - self.sent
            self.sent = None

    def timing(self) -> str:
        """Server-Timing of an answer read whole: the proxy's time so far and the upstream's."""
        self.overhead = time.perf_counter() - self.started - self.upstream_seconds
        proxy = f"proxy;dur={self.overhead * 1000:.3f}"
        return f"{proxy}, upstream;dur={self.upstream_seconds * 1000:.3f}" if self.upstream_seconds else proxy

    def stream_timing(self) -> str:
        """Server-Timing of a stream: the proxy's time before the request went upstream."""
        sent = self.sent if self.sent is not None else time.perf_counter()
        self.overhead = sent - self.started - self.upstream_seconds
        return f"proxy;dur={self.overhead * 1000:.3f}"

    @property
    def anthropic(self) -> bool:
        """A client of Anthropic's Messages API: errors go out in its shape."""
        return is_anthropic(self.endpoint)

    def stamp(self, headers: CIMultiDict[str]) -> None:
        """The proxy's own headers onto an answer, replacing same-named ones from the upstream."""
        headers.update(self.tags())
        if self.cors is not None:
            cors.stamp(headers, self.cors)

    def cancelled(self, cause: str) -> None:
        """The handler was cancelled (``cause``: see ``why_cancelled``). A stream whose final
        event was relayed is complete, whoever closed first: the sync openai SDK closes as soon
        as it reads ``[DONE]``, before the upstream's end of body reaches the proxy."""
        if self.outcome is not None and sse.ends_stream(self.sent_before + self.sent_last):
            self.outcome = "completed"
            return
        if cause == "client_disconnected":
            self.status = 499
        elif self.outcome is None:
            self.status = 503  # nothing was sent: Sanic answers 503, or the connection is cut
        if self.outcome is not None:
            self.outcome = cause

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
        source_label, target_label = labels(source), labels(target)
        pending = metrics.PENDING
        pending.in_flight(-1)
        pending.count(metrics.REQUESTS, (self.endpoint, source_label, target_label, str(self.status)))
        pending.observe(metrics.DURATION, (self.endpoint, target_label), duration)
        if self.first_byte is not None:
            first_byte = self.first_byte - self.started
            pending.observe(metrics.TIME_TO_FIRST_BYTE, (self.endpoint, target_label), first_byte)
        if self.outcome is not None:
            pending.count(metrics.STREAMS, (self.endpoint, target_label, self.outcome))
        if self.upstream_error is not None:
            pending.count(metrics.UPSTREAM_ERRORS, (target_label, self.upstream_error))
        if self.think_blocks:
            pending.count(metrics.THINKING_STRIPPED, (target_label,), self.think_blocks)
        # A client that left before any answer: what the upstream did not take was the proxy's.
        overhead = self.overhead if self.overhead is not None else duration - self.upstream_seconds
        pending.observe(metrics.PROXY_OVERHEAD, (self.endpoint,), max(overhead, 0.0))
        usage = self.usage
        if usage is not None:
            pending.count(metrics.TOKENS, (source_label, target_label, "prompt"), usage.prompt)
            if usage.completion is not None:
                pending.count(metrics.TOKENS, (source_label, target_label, "completion"), usage.completion)
            if self.per_token is not None:
                pending.observe(metrics.TIME_PER_OUTPUT_TOKEN, (target_label,), self.per_token)
        limit = self.settings.max_model_id_length
        fields = {
            "endpoint": self.endpoint,
            "source_model": logs.bounded(source, limit),
            "target_model": logs.bounded(target, limit),
            "upstream": self.backend,
            "rule": self.resolution.rule if self.resolution else None,
            "stream": self.stream,
            "status": self.status,
            "duration_ms": round(duration * 1000, 2),
        }
        if self.outcome:
            fields["outcome"] = self.outcome
        if self.upstream_error:
            fields["upstream_error"] = self.upstream_error
        logs.request_event(fields)
