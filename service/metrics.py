"""Prometheus metrics, exact across Sanic workers.

prometheus-client picks multiprocess mode when it is first imported, by whether
``PROMETHEUS_MULTIPROC_DIR`` is set; ``service.cli`` sets (and wipes) that directory before
anything imports this module, so every worker writes its samples there and ``/metrics`` in any
worker adds them all up. Imported without it (tests that build the app in-process) the
default single-process registry serves.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from functools import lru_cache
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from service.payload import DEFAULT_MAX_MODEL_ID, fits

_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

REQUESTS = Counter(
    "rerouter_requests_total",
    "Requests answered, by endpoint, requested and served model, and status (499: client left).",
    ["endpoint", "source_model", "target_model", "status_code"],
)
DURATION = Histogram(
    "rerouter_request_duration_seconds",
    "Time from request to the last byte of the response.",
    ["endpoint", "target_model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600),
)
TIME_TO_FIRST_BYTE = Histogram(
    "rerouter_time_to_first_byte_seconds",
    "Streams: time from request to the first body byte relayed to the client.",
    ["endpoint", "target_model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STREAMS = Counter(
    "rerouter_streams_total",
    "Streamed responses by how they ended: completed, client_disconnected, upstream_error, "
    "proxy_cut (still running at the end of SHUTDOWN_TIMEOUT), timeout.",
    ["endpoint", "target_model", "outcome"],
)
UPSTREAM_ERRORS = Counter(
    "rerouter_upstream_errors_total",
    "Upstream failures: connect, timeout, disconnected, bad_response, http_4xx, http_5xx.",
    ["target_model", "reason"],
)
FALLBACKS = Counter(
    "rerouter_fallbacks_total",
    "Attempts given up before any byte reached the client, and the target tried next "
    "(the same target for a retry): reason connect, timeout, disconnected, http_5xx, http_429.",
    ["source_model", "from_target", "to_target", "reason"],
)
THINKING_STRIPPED = Counter(
    "rerouter_thinking_stripped_total",
    "Think blocks taken out of answers (dropped, or moved to reasoning_content).",
    ["target_model"],
)
TOKENS = Counter(
    "rerouter_tokens_total",
    "Tokens the upstream reported in its answers' usage, by requested and served model; "
    "kind prompt or completion.",
    ["source_model", "target_model", "kind"],
)
PROXY_OVERHEAD = Histogram(
    "rerouter_proxy_overhead_seconds",
    "Time spent in the proxy itself: before the request went upstream, and for answers read "
    "whole after the upstream's answer was complete (the Server-Timing proxy;dur).",
    ["endpoint"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "rerouter_time_per_output_token_seconds",
    "Streams with usage: (last content event - first content event) / (completion tokens - 1).",
    ["target_model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5),
)
CONFIG_RELOADS = Counter(
    "rerouter_config_reload_total",
    "Settings reloads in each worker (file change or SIGHUP): success, or error (old settings kept).",
    ["result"],
)
IN_FLIGHT = Gauge(
    "rerouter_requests_in_flight",
    "Requests being served right now, all workers together.",
    multiprocess_mode="livesum",
)


class ModelLabels:
    """Caps the distinct model label values so clients cannot grow the series without bound.

    Ids named in MODEL_MAP always get their own value; other ids do until ``limit`` distinct
    ones were seen by this worker, then they are reported as ``other``. An id longer than
    ``max_length`` characters, or one that is not valid Unicode, is ``other`` from the start:
    a label is stored once per value in the multiprocess files, and one that cannot be written
    as UTF-8 would make every later /metrics fail.
    """

    OTHER = "other"
    NONE = "none"

    def __init__(self, limit: int, known: set[str], max_length: int = DEFAULT_MAX_MODEL_ID) -> None:
        self._limit = limit
        self._max_length = max_length
        self._seen: set[str] = set()
        self.known = frozenset(known)

    @property
    def known(self) -> frozenset[str]:
        return self._known

    @known.setter
    def known(self, ids: set[str] | frozenset[str]) -> None:
        self._known = frozenset(model for model in ids if self._usable(model))

    def _usable(self, model: str) -> bool:
        return fits(model, self._max_length)

    def __call__(self, model: str | None) -> str:
        if model is None:
            return self.NONE
        if model in self._known or model in self._seen:
            return model
        if len(self._seen) >= self._limit or not self._usable(model):
            return self.OTHER
        self._seen.add(model)
        return model


@lru_cache(maxsize=8192)
def child(metric: Counter | Histogram, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus-client validates and locks on every call,
    and the label sets are bounded anyway (ModelLabels caps the model values)."""
    return metric.labels(*labels)


FLUSH_SECONDS = 0.1


class Pending:
    """The worker's samples since the last flush, written to prometheus-client together.

    A sample written straight away costs a lock, a pid check and an mmap write per value (a
    histogram observation is two): about as much as the rest of a request's bookkeeping. Kept
    here, a sample is one dict update, and the flush, at most FLUSH_SECONDS later, writes each
    series once however many requests it counted. ``/metrics`` flushes its own worker first; a
    worker stopping flushes on its way out (one killed outright loses at most FLUSH_SECONDS).
    Keys are bounded as the series are (ModelLabels caps the model values)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}
        # per histogram series: the sum of its observations, then a count per bucket
        self._observed: dict[tuple[Histogram, tuple[str, ...]], list[float]] = {}
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None

    def count(self, metric: Counter, labels: tuple[str, ...], amount: float = 1.0) -> None:
        key = (metric, labels)
        counts = self._counts
        counts[key] = counts.get(key, 0.0) + amount
        if self._timer is None:
            self._schedule()

    def observe(self, metric: Histogram, labels: tuple[str, ...], value: float) -> None:
        key = (metric, labels)
        tally = self._observed.get(key)
        if tally is None:
            tally = self._observed[key] = [0.0] * (len(metric._upper_bounds) + 1)
        tally[0] += value
        tally[bisect_left(metric._upper_bounds, value) + 1] += 1
        if self._timer is None:
            self._schedule()

    def in_flight(self, change: int) -> None:
        self._in_flight += change
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
        except RuntimeError:  # no event loop (a script, a test): nothing to batch with
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, observed, in_flight = self._counts, self._observed, self._in_flight
        self._counts, self._observed, self._in_flight = {}, {}, 0
        for (counter, labels), amount in counts.items():
            child(counter, *labels).inc(amount)
        # prometheus-client has no call for many observations at once; a histogram child keeps
        # its sum and its buckets as values of their own (``_sum``, ``_buckets``).
        for (histogram, labels), tally in observed.items():
            series = child(histogram, *labels)
            series._sum.inc(tally[0])
            for bucket, number in zip(series._buckets, tally[1:], strict=True):
                if number:
                    bucket.inc(number)
        if in_flight:
            IN_FLIGHT.inc(in_flight)


PENDING = Pending()


def render() -> tuple[bytes, str]:
    """The exposition page and its content type; this worker's pending samples written first."""
    PENDING.flush()
    if _MULTIPROC_DIR is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=_MULTIPROC_DIR)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_stopped(pid: int) -> None:
    """Let the live gauges forget a worker that exited."""
    PENDING.flush()
    if _MULTIPROC_DIR is not None:
        multiprocess.mark_process_dead(pid, _MULTIPROC_DIR)
