"""UPSTREAMS parsing (errors name the key) and replica choice: least in-flight, cool-down, exclude."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import service.options
from service.backends import (
    DEFAULT_BACKEND,
    Backend,
    Replicas,
    parse_upstream_url,
    parse_upstreams,
    with_default,
)

A, B, C = "http://a:8000", "http://b:8000", "http://c:8000"


class FakeClock:
    """Time the test moves by hand, so cool-downs need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- parsing -------------------------------------------------------------------------------------


def test_the_settings_table_uses_the_backends_url_parser() -> None:
    assert service.options.parse_upstream_url is parse_upstream_url


def test_a_string_value_is_a_one_url_backend_with_global_settings() -> None:
    backends = parse_upstreams({"small": "http://small:8000/v1/"})
    assert backends == {"small": Backend("small", ("http://small:8000",))}
    assert backends["small"].api_key is None
    assert backends["small"].connect_timeout is None
    assert backends["small"].read_timeout is None


def test_the_object_form_sets_every_field_and_normalises_urls() -> None:
    backends = parse_upstreams(
        {
            "big": {
                "urls": ["http://gpu1:8000/v1", "https://gpu2.example/vllm/"],
                "api_key": " sk-big ",
                "connect_timeout": 3,
                "read_timeout": 900.5,
            }
        }
    )
    big = backends["big"]
    assert big == Backend("big", ("http://gpu1:8000", "https://gpu2.example/vllm"), "sk-big", 3.0, 900.5)
    assert isinstance(big.connect_timeout, float)


def test_order_is_kept_and_an_empty_object_is_no_backends() -> None:
    assert list(parse_upstreams({"z": A, "a": B, "m.1_x-y": C})) == ["z", "a", "m.1_x-y"]
    assert parse_upstreams({}) == {}


def test_the_api_key_stays_out_of_repr() -> None:
    backend = parse_upstreams({"big": {"urls": [A], "api_key": "sk-secret"}})["big"]
    assert "sk-secret" not in repr(backend)
    assert "http://a:8000" in repr(backend)


def test_upstreams_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_upstreams([A])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"": A}, "key '': name must be"),
        ({"has space": A}, "key 'has space': name must be"),
        ({"ü": A}, "key 'ü': name must be"),
        ({"x" * 65: A}, "name must be 1-64"),
        ({"big": 42}, "key 'big': expected a URL or an object"),
        ({"big": None}, "key 'big': expected a URL or an object"),
        ({"big": "ftp://a"}, "key 'big': not an http(s) URL"),
        ({"big": "http://a:8000?x=1"}, "key 'big': must not carry a query"),
        ({"big": {}}, "key 'big': urls must be a non-empty list of http(s) URLs"),
        ({"big": {"urls": []}}, "key 'big': urls must be a non-empty list"),
        ({"big": {"urls": A}}, "key 'big': urls must be a non-empty list"),
        ({"big": {"urls": [A, 1]}}, "key 'big': urls must be a non-empty list"),
        ({"big": {"urls": [A, "a:8000"]}}, "key 'big': urls[1]: not an http(s) URL"),
        ({"big": {"urls": [A, "http://a:x"]}}, "key 'big': urls[1]: bad port"),
        ({"big": {"urls": [A, B, A + "/v1"]}}, "key 'big': urls[2]: 'http://a:8000' is listed twice"),
        ({"big": {"urls": [A], "url": B}}, "key 'big': unknown key 'url'"),
        ({"big": {"urls": [A], "api_key": ""}}, "key 'big': api_key must be a non-empty string"),
        ({"big": {"urls": [A], "api_key": "  "}}, "key 'big': api_key must be"),
        ({"big": {"urls": [A], "api_key": 123}}, "key 'big': api_key must be"),
        ({"big": {"urls": [A], "api_key": "sk\r\nX-Evil: 1"}}, "key 'big': api_key must be"),
        ({"big": {"urls": [A], "connect_timeout": 0}}, "key 'big': connect_timeout must be a positive"),
        ({"big": {"urls": [A], "connect_timeout": -1}}, "key 'big': connect_timeout must be a positive"),
        ({"big": {"urls": [A], "read_timeout": float("inf")}}, "key 'big': read_timeout must be a pos"),
        ({"big": {"urls": [A], "read_timeout": float("nan")}}, "key 'big': read_timeout must be a pos"),
        ({"big": {"urls": [A], "read_timeout": "30"}}, "key 'big': read_timeout must be a number"),
        ({"big": {"urls": [A], "read_timeout": True}}, "key 'big': read_timeout must be a number"),
        ({"ok": A, "bad": {"urls": []}}, "key 'bad': urls"),
    ],
)
def test_every_error_names_the_key_at_fault(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_upstreams(raw)


def test_upstream_url_becomes_the_default_backend_listed_first() -> None:
    named = parse_upstreams({"big": A})
    backends = with_default(named, "http://main:8000")
    assert list(backends) == [DEFAULT_BACKEND, "big"]
    assert backends[DEFAULT_BACKEND] == Backend(DEFAULT_BACKEND, ("http://main:8000",))
    assert named == {"big": Backend("big", (A,))}


def test_upstreams_may_define_the_default_when_upstream_url_is_unset() -> None:
    named = parse_upstreams({"default": {"urls": [A, B], "api_key": "sk"}})
    assert with_default(named, None) == named


def test_the_default_defined_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="key 'default': already defined by UPSTREAM_URL"):
        with_default(parse_upstreams({"default": A}), "http://main:8000")


def test_no_default_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'default' backend"):
        with_default(parse_upstreams({"big": A}), None)


# --- replica choice ------------------------------------------------------------------------------


def test_one_url_is_always_picked_unless_excluded() -> None:
    clock = FakeClock()
    replicas = Replicas([A], clock=clock)
    assert replicas.pick() == A
    replicas.start(A)
    replicas.done(A, ok=False)
    assert replicas.cooling(A)
    assert replicas.pick() == A
    assert replicas.pick(exclude={A}) is None


def test_the_least_loaded_replica_is_picked() -> None:
    replicas = Replicas([A, B, C], clock=FakeClock())
    for url in (A, A, B, C, C):
        replicas.start(url)
    assert replicas.pick() == B
    replicas.start(B)
    assert (replicas.in_flight(A), replicas.in_flight(B), replicas.in_flight(C)) == (2, 2, 2)
    replicas.done(C, ok=True)
    assert replicas.pick() == C


def test_requests_spread_by_in_flight_count() -> None:
    replicas = Replicas([A, B, C], clock=FakeClock())
    for _ in range(30):
        url = replicas.pick()
        assert url is not None
        replicas.start(url)
    assert [replicas.in_flight(url) for url in (A, B, C)] == [10, 10, 10]


def test_ties_rotate_so_idle_replicas_share_the_load() -> None:
    replicas = Replicas([A, B, C], clock=FakeClock())
    picks = []
    for _ in range(6):
        url = replicas.pick()
        assert url is not None
        replicas.start(url)
        replicas.done(url, ok=True)
        picks.append(url)
    assert picks == [A, B, C, A, B, C]


def test_a_failed_replica_sits_out_its_cool_down_then_returns() -> None:
    clock = FakeClock()
    replicas = Replicas([A, B], cooldown=10.0, clock=clock)
    replicas.start(A)
    replicas.done(A, ok=False)
    assert replicas.cooling(A)
    assert [replicas.pick() for _ in range(4)] == [B, B, B, B]
    clock.now += 9.5
    assert replicas.pick() == B
    clock.now += 0.5
    assert not replicas.cooling(A)
    assert {replicas.pick(), replicas.pick()} == {A, B}


def test_a_success_clears_the_cool_down() -> None:
    replicas = Replicas([A, B], clock=FakeClock())
    replicas.start(A)
    replicas.done(A, ok=False)
    replicas.start(A)
    replicas.done(A, ok=True)
    assert not replicas.cooling(A)


def test_a_cooling_replica_is_skipped_even_when_it_is_idle() -> None:
    replicas = Replicas([A, B], clock=FakeClock())
    for _ in range(5):
        replicas.start(B)
    replicas.start(A)
    replicas.done(A, ok=False)
    assert replicas.pick() == B


def test_when_all_are_cooling_the_one_back_soonest_is_still_tried() -> None:
    clock = FakeClock()
    replicas = Replicas([A, B, C], cooldown=10.0, clock=clock)
    for url in (B, A, C):
        replicas.start(url)
        replicas.done(url, ok=False)
        clock.now += 1
    assert all(replicas.cooling(url) for url in (A, B, C))
    assert replicas.pick() == B
    assert replicas.pick(exclude=[B]) == A


def test_exclude_skips_tried_replicas_and_none_when_all_are_tried() -> None:
    replicas = Replicas([A, B, C], clock=FakeClock())
    replicas.start(A)
    assert replicas.pick(exclude={B}) == C
    assert replicas.pick(exclude={B, C}) == A
    assert replicas.pick(exclude={A, B, C}) is None
    assert replicas.pick(exclude={"http://other:1"}) in {B, C}


def test_an_unpaired_done_leaves_the_count_at_zero() -> None:
    replicas = Replicas([A, B], clock=FakeClock())
    replicas.done(A, ok=True)
    assert replicas.in_flight(A) == 0


@pytest.mark.parametrize(
    ("urls", "cooldown", "message"),
    [
        ([], 10.0, "at least one URL"),
        ([A, A], 10.0, "distinct"),
        ([A], -1.0, "cooldown"),
        ([A], float("nan"), "cooldown"),
    ],
)
def test_bad_construction_is_refused(urls: list[str], cooldown: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Replicas(urls, cooldown=cooldown)


# One step: ("pick", excluded subset), ("start", url), ("done", url, ok), ("wait", seconds).
URLS = [A, B, C, "http://d:8000"]
steps = st.one_of(
    st.tuples(st.just("pick"), st.sets(st.sampled_from(URLS))),
    st.tuples(st.just("start"), st.sampled_from(URLS)),
    st.tuples(st.just("done"), st.sampled_from(URLS), st.booleans()),
    st.tuples(st.just("wait"), st.floats(min_value=0, max_value=15)),
)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(min_value=1, max_value=len(URLS)), program=st.lists(steps, max_size=60))
def test_picks_respect_exclude_health_and_load(size: int, program: list[tuple[object, ...]]) -> None:
    clock = FakeClock()
    urls = URLS[:size]
    replicas = Replicas(urls, cooldown=5.0, clock=clock)
    for step in program:
        kind, arg = step[0], step[1]
        if kind == "wait":
            assert isinstance(arg, float)
            clock.now += arg
        elif kind == "start" and arg in urls:
            replicas.start(str(arg))
        elif kind == "done" and arg in urls:
            replicas.done(str(arg), ok=bool(step[2]))
        elif kind == "pick":
            assert isinstance(arg, set)
            picked = replicas.pick(exclude=arg)
            allowed = [url for url in urls if url not in arg]
            if not allowed:
                assert picked is None
                continue
            assert picked in allowed
            healthy = [url for url in allowed if not replicas.cooling(url)]
            if size > 1 and healthy:
                assert picked in healthy
                assert replicas.in_flight(picked) == min(replicas.in_flight(url) for url in healthy)
        assert all(replicas.in_flight(url) >= 0 for url in urls)


def test_done_without_a_verdict_keeps_the_cool_down_as_it_was() -> None:
    """A client that left, or a request refused before the replica had a say, neither starts
    nor ends a cool-down."""
    clock = FakeClock()
    replicas = Replicas(["http://a", "http://b"], cooldown=10, clock=clock)
    replicas.start("http://a")
    replicas.done("http://a", False)
    replicas.start("http://a")
    replicas.done("http://a", None)
    assert replicas.cooling("http://a")
    assert replicas.in_flight("http://a") == 0
    replicas.start("http://b")
    replicas.done("http://b", None)
    assert not replicas.cooling("http://b")
