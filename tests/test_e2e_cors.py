"""CORS for browser clients, against the proxy as a process: preflights answered before the key
check, every answer to an allowed origin stamped, and everything passed through when unset."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import Proxy, StartProxy
from tests.fake_upstream import FakeUpstream

ORIGIN = "https://app.example"
KEY = "sk-cors-test"
MESSAGES = [{"role": "user", "content": "hi"}]
UPSTREAM_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}


@pytest.fixture(scope="module")
def cors_proxy(start_proxy: StartProxy) -> Proxy:
    return start_proxy(CORS_ALLOW_ORIGINS=f"{ORIGIN}, http://localhost:5173", PROXY_API_KEYS=KEY)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def preflight(
    http: httpx.Client, url: str, origin: str, headers: str = "authorization, content-type"
) -> httpx.Response:
    return http.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


def assert_stamped(response: httpx.Response, origin: str = ORIGIN) -> None:
    assert response.headers.get_list("access-control-allow-origin") == [origin]
    assert "Origin" in response.headers["vary"]
    exposed = response.headers["access-control-expose-headers"]
    assert {"x-request-id", "x-rerouter-upstream", "retry-after"} <= {h.strip() for h in exposed.split(",")}
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/v1/models/gpt-4o", "/v1/messages"])
def test_preflight_is_answered_without_a_key_and_never_reaches_the_upstream(
    cors_proxy: Proxy, upstream: FakeUpstream, http: httpx.Client, path: str
) -> None:
    seen = len(upstream.requests)
    asked = "authorization, content-type, x-stainless-os, openai-organization, x-api-key, x-evil"
    response = preflight(http, cors_proxy.url + path, ORIGIN, asked)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = {name.strip() for name in response.headers["access-control-allow-headers"].split(",")}
    assert allowed == {"authorization", "content-type", "x-stainless-os", "openai-organization", "x-api-key"}
    assert "Origin" in response.headers["vary"]
    assert len(upstream.requests) == seen


def test_preflight_from_another_origin_is_refused(
    cors_proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    seen = len(upstream.requests)
    response = preflight(http, f"{cors_proxy.v1}/chat/completions", "https://evil.example")
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert len(upstream.requests) == seen


def test_a_plain_options_request_still_needs_a_key(cors_proxy: Proxy, http: httpx.Client) -> None:
    """Only a preflight (Origin and Access-Control-Request-Method) skips the key check."""
    assert http.options(f"{cors_proxy.v1}/chat/completions", headers={"Origin": ORIGIN}).status_code == 401


def test_answers_to_an_allowed_origin_are_stamped_and_the_upstreams_cors_replaced(
    cors_proxy: Proxy, http: httpx.Client
) -> None:
    headers = {
        "Origin": ORIGIN,
        "Authorization": f"Bearer {KEY}",
        "X-Fake-Answer-Headers": orjson.dumps(UPSTREAM_CORS).decode(),
    }
    whole = http.post(
        f"{cors_proxy.v1}/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}, headers=headers
    )
    assert whole.status_code == 200
    assert_stamped(whole)
    with http.stream(
        "POST",
        f"{cors_proxy.v1}/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
        headers=headers,
    ) as streamed:
        assert streamed.status_code == 200
        assert_stamped(streamed)
        assert b"".join(streamed.iter_raw()).endswith(b"data: [DONE]\n\n")
    listing = http.get(f"{cors_proxy.v1}/models", headers=headers)
    assert listing.status_code == 200
    assert_stamped(listing)
    failed = http.post(
        f"{cors_proxy.v1}/chat/completions", json={"model": "gpt-down", "messages": MESSAGES}, headers=headers
    )
    assert failed.status_code == 503
    assert_stamped(failed)


def test_a_401_and_a_proxy_error_carry_cors_so_the_browser_can_read_them(
    cors_proxy: Proxy, http: httpx.Client
) -> None:
    refused = http.post(f"{cors_proxy.v1}/chat/completions", json={}, headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert_stamped(refused)
    bad = http.post(
        f"{cors_proxy.v1}/chat/completions",
        content=b"{not json",
        headers={
            "Origin": "http://localhost:5173",
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
        },
    )
    assert bad.status_code == 400
    assert_stamped(bad, "http://localhost:5173")


def test_another_origin_gets_no_cors_and_not_the_upstreams_either(
    cors_proxy: Proxy, http: httpx.Client
) -> None:
    headers = {
        "Origin": "https://evil.example",
        "Authorization": f"Bearer {KEY}",
        "X-Fake-Answer-Headers": orjson.dumps(UPSTREAM_CORS).decode(),
    }
    response = http.post(
        f"{cors_proxy.v1}/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}, headers=headers
    )
    assert response.status_code == 200
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]


def test_wildcard_allows_any_origin(start_proxy: StartProxy, http: httpx.Client) -> None:
    proxy = start_proxy(CORS_ALLOW_ORIGINS="*")
    response = preflight(http, f"{proxy.v1}/chat/completions", "https://anywhere.example")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    answer = http.get(f"{proxy.v1}/models", headers={"Origin": "https://anywhere.example"})
    assert answer.headers["access-control-allow-origin"] == "*"


# --- unset: the upstream's CORS passes through ------------------------------------------------------------


def test_unset_preflight_of_the_model_list_goes_to_the_upstream(
    proxy: Proxy, upstream: FakeUpstream, http: httpx.Client
) -> None:
    response = preflight(http, f"{proxy.v1}/models", ORIGIN)
    assert response.status_code == 200
    assert response.headers["x-upstream-echo"] == "yes"
    assert upstream.last("/v1/models").method == "OPTIONS"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/gpt-4o", "/v1/chat/completions"])
def test_unset_upstream_cors_headers_pass_through(proxy: Proxy, http: httpx.Client, path: str) -> None:
    headers = {"Origin": ORIGIN, "X-Fake-Answer-Headers": orjson.dumps(UPSTREAM_CORS).decode()}
    if path.endswith("completions"):
        response = http.post(
            proxy.url + path, json={"model": "gpt-4o", "messages": MESSAGES}, headers=headers
        )
    else:
        response = http.get(proxy.url + path, headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-credentials"] == "true"
