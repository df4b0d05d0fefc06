"""Named upstream backends (``UPSTREAMS``) and the choice of replica inside one.

Parsing is pure and runs while settings load, so a bad backend stops start-up with a message
naming its key. ``Replicas`` is the mutable per-worker state the request path consults: it is
only touched from the worker's event loop, so it needs no lock.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_BACKEND = "default"
# Names end up in a response header and in metric labels: keep them short and plain.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OBJECT_KEYS = frozenset({"urls", "api_key", "connect_timeout", "read_timeout"})
_NOT_COOLING = -math.inf
BACKOFF_BASE = 0.25
BACKOFF_CAP = 4.0


def parse_upstream_url(value: str) -> str:
    """Accept ``http://h:8000`` and ``http://h:8000/v1`` alike; keep the base without ``/v1``.

    A ``user:password@`` is refused, and never quoted back: aiohttp would send it as Basic auth
    and then fail every request whose client sent an Authorization header of its own, and the URL
    is printed by ``check`` and logged. Keys belong in UPSTREAM_API_KEY or ``api_key``.
    """
    if "@" in value.strip().split("://", 1)[-1].split("/", 1)[0]:
        raise ValueError(
            "must not carry user:password@ (value not shown); send the key with UPSTREAM_API_KEY "
            "or the backend's api_key"
        )
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not carry a query or fragment: {value!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(frozen=True)
class Backend:
    """One named upstream. ``None`` settings fall back to the global ones (UPSTREAM_API_KEY,
    UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_READ_TIMEOUT), so a plain URL behaves like UPSTREAM_URL."""

    name: str
    urls: tuple[str, ...]
    api_key: str | None = field(default=None, repr=False)
    connect_timeout: float | None = None
    read_timeout: float | None = None


def parse_upstreams(raw: object) -> dict[str, Backend]:
    """Validate a decoded UPSTREAMS object, keeping its order; every problem names its key.

    A ``default`` key is accepted here; whether it may coexist with UPSTREAM_URL is
    ``with_default``'s call, since only settings loading knows both.
    """
    if not isinstance(raw, dict):
        raise ValueError('must be a JSON object of backend name -> URL or {"urls": [...]}')
    backends: dict[str, Backend] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"key {name!r}: name must be 1-64 letters, digits, '.', '_' or '-'")
        try:
            backends[name] = _parse_backend(name, value)
        except ValueError as exc:
            raise ValueError(f"key {name!r}: {exc}") from None
    return backends


def with_default(backends: Mapping[str, Backend], upstream_url: str | None) -> dict[str, Backend]:
    """Add the ``default`` backend from UPSTREAM_URL (already normalised), listed first.

    Exactly one of UPSTREAM_URL and an UPSTREAMS ``default`` key must define it: UPSTREAMS may
    give the default several replicas or its own key, but two definitions would leave the
    operator guessing which one serves unrouted requests.
    """
    if upstream_url is None:
        if DEFAULT_BACKEND not in backends:
            raise ValueError(f"no {DEFAULT_BACKEND!r} backend: set UPSTREAM_URL or an UPSTREAMS key")
        return dict(backends)
    if DEFAULT_BACKEND in backends:
        raise ValueError(f"key {DEFAULT_BACKEND!r}: already defined by UPSTREAM_URL")
    return {DEFAULT_BACKEND: Backend(DEFAULT_BACKEND, (upstream_url,)), **backends}


def _parse_backend(name: str, value: object) -> Backend:
    if isinstance(value, str):
        return Backend(name, (parse_upstream_url(value),))
    if not isinstance(value, dict):
        raise ValueError('expected a URL or an object {"urls": [...], ...}')
    unknown = sorted(str(key) for key in value if key not in _OBJECT_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_OBJECT_KEYS))})")
    return Backend(
        name,
        _urls(value.get("urls")),
        _api_key(value.get("api_key")),
        _timeout("connect_timeout", value.get("connect_timeout")),
        _timeout("read_timeout", value.get("read_timeout")),
    )


def _urls(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(url, str) for url in value):
        raise ValueError("urls must be a non-empty list of http(s) URLs")
    urls: list[str] = []
    for index, url in enumerate(value):
        try:
            normalised = parse_upstream_url(url)
        except ValueError as exc:
            raise ValueError(f"urls[{index}]: {exc}") from None
        if normalised in urls:
            raise ValueError(f"urls[{index}]: {normalised!r} is listed twice")
        urls.append(normalised)
    return tuple(urls)


def _api_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("api_key must be a non-empty string without control characters")
    return parse_credential(value, "api_key")


def parse_credential(value: str, name: str = "the key") -> str:
    """A key sent upstream as a header value: a control character would split or break the header
    (aiohttp refuses it, so every request would fail). The message never quotes the key."""
    if not value.strip() or _CONTROL.search(value):
        raise ValueError(f"{name} must be a non-empty string without control characters (value not shown)")
    return value.strip()


def _timeout(key: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def backoff(retry: int) -> float:
    """Seconds before the n-th retry: exponential with jitter, so clients retrying together do
    not hit a replica in step."""
    return random.uniform(0.5, 1.0) * min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (retry - 1))


class Replicas:
    """Which URL of one backend the next request should use, per worker.

    Least in-flight spreads long streams evenly where round-robin would pile them up; the
    rotation only breaks ties, so idle replicas still take turns. A replica whose request
    failed sits out ``cooldown`` seconds, then is tried again; one success clears it.
    """

    __slots__ = ("_clock", "_cool_until", "_cooldown", "_in_flight", "_index", "_next", "_only", "urls")

    def __init__(
        self,
        urls: Sequence[str],
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("needs at least one URL")
        if len(set(urls)) != len(urls):
            raise ValueError("URLs must be distinct")
        if not (math.isfinite(cooldown) and cooldown >= 0):
            raise ValueError(f"cooldown must be a non-negative number of seconds, got {cooldown!r}")
        self.urls = tuple(urls)
        self._index = {url: index for index, url in enumerate(self.urls)}
        self._in_flight = [0] * len(self.urls)
        self._cool_until = [_NOT_COOLING] * len(self.urls)
        self._cooldown = cooldown
        self._clock = clock
        self._next = 0
        # The common case, one URL, has nothing to choose: skip the clock and the scan.
        self._only = self.urls[0] if len(self.urls) == 1 else None

    def pick(self, exclude: Collection[str] = ()) -> str | None:
        """The URL to try next, skipping ``exclude`` (replicas this request already tried).

        When every remaining replica is cooling down, the one whose cool-down ends soonest is
        still returned: refusing would turn a blip on all replicas into a refusal lasting the
        whole cool-down, and only a real request can tell that a replica is back.
        None once every URL is excluded.
        """
        if self._only is not None:
            return None if self._only in exclude else self._only
        urls, in_flight, cool_until = self.urls, self._in_flight, self._cool_until
        count = len(urls)
        now = self._clock()
        best = soonest = -1
        best_load = 0
        soonest_end = 0.0
        for step in range(count):
            index = self._next + step
            if index >= count:
                index -= count
            if urls[index] in exclude:
                continue
            end = cool_until[index]
            if end > now:
                if soonest < 0 or end < soonest_end:
                    soonest, soonest_end = index, end
            elif best < 0 or in_flight[index] < best_load:
                best, best_load = index, in_flight[index]
        chosen = best if best >= 0 else soonest
        if chosen < 0:
            return None
        self._next = chosen + 1 if chosen + 1 < count else 0
        return urls[chosen]

    def start(self, url: str) -> None:
        """Call once a request is sent to ``url``; pair with ``done`` in a ``finally``."""
        self._in_flight[self._index[url]] += 1

    def done(self, url: str, ok: bool | None) -> None:
        """``ok`` False means the replica itself let the request down (no connection, timed out,
        broke off, 5xx, 429) and starts its cool-down; True, that it answered, which ends one.
        None leaves the cool-down alone: the client left, or its request was refused before or
        without the replica having a say."""
        index = self._index[url]
        # An unpaired done is a caller bug; a negative count would skew every later pick.
        if self._in_flight[index] > 0:
            self._in_flight[index] -= 1
        if ok is not None:
            self._cool_until[index] = _NOT_COOLING if ok else self._clock() + self._cooldown

    @property
    def cooldown(self) -> float:
        return self._cooldown

    def in_flight(self, url: str) -> int:
        return self._in_flight[self._index[url]]

    def cooling(self, url: str) -> bool:
        return self._cool_until[self._index[url]] > self._clock()


def pools(
    backends: Mapping[str, Backend], cooldown: float, previous: Mapping[str, Replicas] | None = None
) -> dict[str, Replicas]:
    """One Replicas per backend; a reload keeps the ones whose URLs and cool-down did not change,
    so their in-flight counts and cool-downs carry over."""
    kept = previous or {}
    fresh: dict[str, Replicas] = {}
    for name, backend in backends.items():
        old = kept.get(name)
        same = old is not None and old.urls == backend.urls and old.cooldown == cooldown
        fresh[name] = old if same and old is not None else Replicas(backend.urls, cooldown)
    return fresh
