"""Upstream faults byte by byte, and clients that leave at every stage, against a real proxy.

The upstream is ``tests/fault_server.py``: a raw TCP server that refuses, resets, hangs, cuts
chunked bodies and sends garbage on cue, and notes when each of its connections closes. Every
case checks the same four things:

1. the client gets a clear answer: a status with an OpenAI error (the proxy's) or the upstream's
   own answer relayed, or a visibly broken stream (a ``200`` whose chunked body ends without its
   last chunk), never a clean-looking end;
2. the upstream connection is released: the fault server sees it closed within ~1 s;
3. ``rerouter_requests_in_flight`` is back to 0 and the counters say what happened;
4. the proxy answers the next request, and logged no "unexpected error".

``tests/test_e2e_faults.py`` covers the same ground with the aiohttp fake and the SDK (refused
port, hang, 429/503, die-mid-stream, client leaving a stream); this file adds the faults the fake
cannot produce, the released-connection and metrics checks, and the client leaving at each stage.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, StartProxy, eventually
from tests.fault_server import HTML, FaultServer

READ_TIMEOUT = 1.0  # the proxy's UPSTREAM_READ_TIMEOUT
RELEASE_WITHIN = 1.0  # the upstream must see its connection closed this soon after the client's answer
MESSAGES = [{"role": "user", "content": "hi"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultServer]:
    server = FaultServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_proxy(start_proxy: StartProxy, fault: FaultServer) -> Proxy:
    return start_proxy(
        UPSTREAM_URL=fault.url,
        UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT),
        MODEL_MAP=json.dumps({"gpt-4o": "ok", "gpt-4o-broken": "reset-mid-stream"}),
    )


# --- helpers ------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What the client saw: ``status`` None when no response came at all."""

    status: int | None
    headers: httpx.Headers
    body: bytes
    broken: str | None  # why the body (or the response) did not end cleanly
    elapsed: float
    done_at: float  # time.monotonic() when the client had its answer

    def error(self) -> dict[str, str]:
        assert self.headers["content-type"] == "application/json"
        body = orjson.loads(self.body)
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "code"}
        assert body["error"]["message"]
        return body["error"]


def call(
    proxy: Proxy,
    model: str,
    *,
    stream: bool = False,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Answer:
    body = {"model": model, "messages": MESSAGES, **({"stream": True} if stream else {})}
    started = time.monotonic()
    status, got, broken = None, b"", None
    response_headers = httpx.Headers()
    with httpx.Client(timeout=timeout, verify=False) as client:  # plain http: no CA bundle to load
        try:
            with client.stream(
                method, proxy.url + path, json=body if method == "POST" else None, headers=headers
            ) as response:
                status, response_headers = response.status_code, response.headers
                try:
                    for piece in response.iter_raw():
                        got += piece
                except httpx.HTTPError as exc:
                    broken = f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            broken = f"{type(exc).__name__}: {exc}"
    done = time.monotonic()
    return Answer(status, response_headers, got, broken, done - started, done)


def scrape(proxy: Proxy) -> Samples:
    response = httpx.get(f"{proxy.url}/metrics", timeout=5, verify=False)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (have, got), value in samples.items() if have == name and wanted <= got)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def in_flight_is_zero(proxy: Proxy) -> Samples:
    def check() -> Samples:
        samples = scrape(proxy)
        assert total(samples, "rerouter_requests_in_flight") == 0, "a request is still in flight"
        return samples

    return eventually(check, 3.0, interval=0.02)


def log_mark(proxy: Proxy) -> int:
    return proxy.log_path.stat().st_size


def log_problems(proxy: Proxy, mark: int) -> list[str]:
    """Lines after ``mark`` that report a failure of the proxy's own code (ours or Sanic's)."""
    lines = proxy.log_path.read_bytes()[mark:].decode(errors="replace").splitlines()
    return [
        line[:300]
        for line in lines
        if '"unexpected error"' in line or "ERROR:" in line or line.startswith("Traceback")
    ]


def released(fault: FaultServer, mark: int, after: float, within: float = RELEASE_WITHIN) -> None:
    """Every upstream connection since ``mark`` is closed, at the latest ``within`` s after ``after``."""
    fault.wait_for(
        lambda: not any(c.open for c in fault.since(mark)), after + within + 0.5 - time.monotonic()
    )
    for conn in fault.since(mark):
        assert conn.closed_at is not None, f"the proxy still holds the upstream connection ({conn.behaviour})"
        late = conn.closed_at - after
        assert late <= within, f"upstream connection ({conn.behaviour}) closed {late:.2f} s after the answer"
    assert fault.open_connections() == []


def still_serving(proxy: Proxy) -> None:
    for stream in (False, True):
        answer = call(proxy, "gpt-4o", stream=stream)
        assert answer.status == 200, answer
        assert answer.broken is None
        assert answer.headers["x-fault-server"] == "ok"
        assert b"reply" in answer.body
        if stream:
            assert answer.body.endswith(b"data: [DONE]\n\n")


def settled(proxy: Proxy, fault: FaultServer, mark: int, after: float, log_at: int) -> Samples:
    """Checks 2-4 of the module docstring; the samples once the in-flight gauge is 0."""
    released(fault, mark, after)
    samples = in_flight_is_zero(proxy)
    still_serving(proxy)
    assert log_problems(proxy, log_at) == []
    return samples


# --- upstream faults: one table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    model: str  # the fault server behaviour
    stream: bool
    status: int | None  # what the client sees
    code: str | None = None  # the proxy's own error code, when the proxy answers
    relayed: bytes | None = None  # the upstream's body, relayed as it came
    events: int = 0  # events relayed before the stream breaks
    broken: bool = False  # the body does not end cleanly
    reason: str | None = None  # rerouter_upstream_errors_total{reason}
    outcome: str | None = None  # rerouter_streams_total{outcome}
    takes: float = 0.0  # the least time it must take (the read timeout)

    @property
    def id(self) -> str:
        return f"{self.model}-{'stream' if self.stream else 'whole'}"


def _status_body(status: int) -> bytes:
    error = {"message": f"the fault server answers {status}", "type": "fault_error", "code": str(status)}
    return orjson.dumps({"error": error})


FAULTS = [
    # no answer at all
    Fault("reset-before-headers", False, 502, "upstream_disconnected", reason="disconnected"),
    Fault("reset-before-headers", True, 502, "upstream_disconnected", reason="disconnected"),
    Fault("close-before-headers", False, 502, "upstream_disconnected", reason="disconnected"),
    Fault("hang-before-headers", False, 504, "upstream_timeout", reason="timeout", takes=READ_TIMEOUT),
    Fault("hang-before-headers", True, 504, "upstream_timeout", reason="timeout", takes=READ_TIMEOUT),
    # garbage instead of HTTP
    Fault("garbage-status", False, 502, "upstream_bad_response", reason="bad_response"),
    Fault("garbage-status-hold", True, 502, "upstream_bad_response", reason="bad_response"),
    # a whole (Content-Length) body cut short: nothing was sent yet, so the proxy can still answer
    Fault("truncated-length", False, 502, "upstream_disconnected", reason="disconnected"),
    Fault("hang-in-body", False, 504, "upstream_timeout", reason="timeout", takes=READ_TIMEOUT),
    # streams cut after the answer began: a 200 whose body visibly breaks
    Fault(
        "reset-mid-stream", True, 200, events=2, broken=True, reason="disconnected", outcome="upstream_error"
    ),
    Fault(
        "hang-mid-stream",
        True,
        200,
        events=2,
        broken=True,
        reason="timeout",
        outcome="upstream_error",
        takes=READ_TIMEOUT,
    ),
    # a JSON answer of unknown length is read whole, so a cut one still gets its own status
    Fault("truncated-chunked", False, 502, "upstream_disconnected", reason="disconnected"),
    # well-framed answers with bad content: relayed as they came (the proxy is a proxy)
    Fault("not-json", False, 200, relayed=HTML),
    Fault("not-json", True, 200, relayed=HTML),
    Fault("not-json-chunked", False, 200, relayed=HTML),
    Fault("wrong-type-stream", True, 200, events=3, outcome="completed"),
    # error statuses: relayed with the upstream's own body
    Fault("status-500", False, 500, relayed=_status_body(500), reason="http_5xx"),
    Fault("status-500", True, 500, relayed=_status_body(500), reason="http_5xx"),
    Fault("status-500-html", False, 500, relayed=HTML, reason="http_5xx"),
    Fault("status-429", False, 429, relayed=_status_body(429), reason="http_4xx"),
    Fault("status-503", True, 503, relayed=_status_body(503), reason="http_5xx"),
]


@pytest.mark.parametrize("case", FAULTS, ids=[case.id for case in FAULTS])
def test_upstream_fault(fault_proxy: Proxy, fault: FaultServer, case: Fault) -> None:
    before, mark, log_at = scrape(fault_proxy), fault.mark(), log_mark(fault_proxy)
    answer = call(fault_proxy, case.model, stream=case.stream)

    assert answer.status == case.status, answer
    assert answer.elapsed >= case.takes * 0.9
    assert answer.elapsed < case.takes + 2.0
    assert answer.headers["x-request-id"]
    if case.code is not None:
        error = answer.error()
        assert error["code"] == case.code
        assert "x-fault-server" not in answer.headers
    if case.relayed is not None:
        assert answer.body == case.relayed
        assert answer.headers["x-fault-server"] == case.model
    if case.events:
        assert answer.body.count(b"data: ") == case.events
    if case.broken:
        assert answer.broken is not None, "the stream ended cleanly although the upstream failed"
        assert b"[DONE]" not in answer.body
    else:
        assert answer.broken is None, answer.broken

    after = settled(fault_proxy, fault, mark, answer.done_at, log_at)
    target = {"target_model": case.model}
    assert delta(before, after, "rerouter_requests_total", status_code=str(case.status), **target) == 1
    errors = delta(before, after, "rerouter_upstream_errors_total", **target)
    assert errors == (1 if case.reason else 0)
    if case.reason:
        assert delta(before, after, "rerouter_upstream_errors_total", reason=case.reason, **target) == 1
    streams = delta(before, after, "rerouter_streams_total", **target)
    assert streams == (1 if case.outcome else 0)
    if case.outcome:
        assert delta(before, after, "rerouter_streams_total", outcome=case.outcome, **target) == 1


def test_upstream_refuses(fault_proxy: Proxy, fault: FaultServer) -> None:
    before, log_at = scrape(fault_proxy), log_mark(fault_proxy)
    with fault.refusing():
        mark = fault.mark()
        answers = [call(fault_proxy, "gpt-4o", stream=stream) for stream in (False, True)]
        assert fault.since(mark) == []
    for answer in answers:
        assert answer.status == 502
        assert answer.error() == {
            "message": "the upstream refused the connection or is unreachable",
            "type": "upstream_error",
            "code": "upstream_connect",
        }
    after = settled(fault_proxy, fault, fault.mark(), time.monotonic(), log_at)
    assert delta(before, after, "rerouter_upstream_errors_total", reason="connect", target_model="ok") == 2
    assert delta(before, after, "rerouter_requests_total", status_code="502", target_model="ok") == 2


@pytest.mark.parametrize("garbage", ["models-garbage", "models-not-list"])
def test_model_list_garbage_is_502(fault_proxy: Proxy, fault: FaultServer, garbage: str) -> None:
    before, mark, log_at = scrape(fault_proxy), fault.mark(), log_mark(fault_proxy)
    listing = call(fault_proxy, "", method="GET", path="/v1/models", headers={"X-Fault": garbage})
    alias = call(fault_proxy, "", method="GET", path="/v1/models/gpt-4o", headers={"X-Fault": garbage})
    for answer in (listing, alias):
        assert answer.status == 502
        assert answer.error() == {
            "message": "the upstream's model list is not an OpenAI list",
            "type": "upstream_error",
            "code": "upstream_bad_response",
        }
    after = settled(fault_proxy, fault, mark, alias.done_at, log_at)
    assert delta(before, after, "rerouter_requests_total", endpoint="models", status_code="502") == 2
    assert delta(before, after, "rerouter_upstream_errors_total", reason="bad_response") == 2


def test_what_the_sdk_sees_for_garbage(fault_proxy: Proxy, fault: FaultServer) -> None:
    """Relayed garbage reaches the SDK as it came: a non-JSON body with an application/json type
    fails in the SDK's JSON decoding; JSON sent to a streaming request reads as an empty stream;
    events sent as text/plain still parse (the SDK does not look at the type of a stream)."""
    mark, log_at = fault.mark(), log_mark(fault_proxy)
    with openai.OpenAI(base_url=fault_proxy.v1, api_key="k", max_retries=0, timeout=5) as client:
        with pytest.raises(json.JSONDecodeError):
            client.chat.completions.create(model="not-json", messages=MESSAGES)
        empty = client.chat.completions.create(model="not-json", messages=MESSAGES, stream=True)
        assert list(empty) == []
        plain = client.chat.completions.create(model="wrong-type-stream", messages=MESSAGES, stream=True)
        assert [chunk.choices[0].delta.content for chunk in plain] == ["plain", " text"]
    # marked before the requests, so the release of their upstream connections is waited for
    settled(fault_proxy, fault, mark, time.monotonic(), log_at)


# --- faults where the answer depends on when they strike --------


def test_stream_that_stalls_before_its_first_byte_is_a_504(fault_proxy: Proxy, fault: FaultServer) -> None:
    """The upstream sends 200 event-stream headers, then nothing. The proxy waits for the first
    body bytes before it answers, so it can still answer 504 rather than cut a 200."""
    before, mark, log_at = scrape(fault_proxy), fault.mark(), log_mark(fault_proxy)
    answer = call(fault_proxy, "hang-after-headers", stream=True)
    assert READ_TIMEOUT * 0.9 <= answer.elapsed < READ_TIMEOUT + 2
    after = settled(fault_proxy, fault, mark, answer.done_at, log_at)
    target = {"target_model": "hang-after-headers"}
    assert delta(before, after, "rerouter_upstream_errors_total", reason="timeout", **target) == 1

    assert answer.status is not None, f"no response at all ({answer.broken})"
    assert answer.status == 504
    assert answer.error()["code"] == "upstream_timeout"
    assert delta(before, after, "rerouter_requests_total", status_code="504", **target) == 1


def test_invalid_chunk_mid_body_is_a_504(fault_proxy: Proxy, fault: FaultServer) -> None:
    """A chunked JSON body whose second chunk-size line is garbage (``zz``), the connection left
    open. aiohttp's C parser then neither ends nor fails the payload and drops its read timer; the
    proxy's own per-read deadline (UPSTREAM_READ_TIMEOUT) ends the wait, and since the answer is
    read whole, the client gets a 504 rather than a hang."""
    before, mark, log_at = scrape(fault_proxy), fault.mark(), log_mark(fault_proxy)
    answer = call(fault_proxy, "bad-chunk", timeout=READ_TIMEOUT + 1.5)
    released(fault, mark, answer.done_at)  # aiohttp did close the upstream connection
    assert answer.status == 504
    assert answer.error()["code"] == "upstream_timeout"
    after = settled(fault_proxy, fault, mark, answer.done_at, log_at)
    target = {"target_model": "bad-chunk"}
    assert delta(before, after, "rerouter_upstream_errors_total", reason="timeout", **target) == 1


@pytest.fixture(scope="module")
def pure_python_proxy(start_proxy: StartProxy, fault: FaultServer) -> Proxy:
    """aiohttp without its C extensions: what runs where no wheel fits (or AIOHTTP_NO_EXTENSIONS)."""
    return start_proxy(
        UPSTREAM_URL=fault.url, UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT), AIOHTTP_NO_EXTENSIONS="1"
    )


def test_invalid_chunk_mid_body_with_pure_python_aiohttp(
    pure_python_proxy: Proxy, fault: FaultServer
) -> None:
    """The same fault under aiohttp's Python parser, which raises ``TransferEncodingError`` (an
    ``aiohttp.http_exceptions`` error, not a ``ClientError``): a 502 ``upstream_bad_response``,
    counted as such, nothing unexpected in the log."""
    proxy = pure_python_proxy
    before, mark, log_at = scrape(proxy), fault.mark(), log_mark(proxy)
    answer = call(proxy, "bad-chunk", timeout=READ_TIMEOUT + 1.5)
    released(fault, mark, answer.done_at)
    after = in_flight_is_zero(proxy)
    assert answer.status == 502
    assert answer.error()["code"] == "upstream_bad_response"
    assert log_problems(proxy, log_at) == []
    target = {"target_model": "bad-chunk"}
    assert delta(before, after, "rerouter_upstream_errors_total", reason="bad_response", **target) == 1


# --- the client leaves ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leave:
    stage: str
    model: str
    stream: bool
    wait_events: int = 0  # the client leaves once it has this many events
    outcome: str | None = None

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.model}"


LEAVES = [
    Leave("before-upstream-headers", "hang-before-headers", False),
    Leave("before-upstream-headers", "hang-before-headers", True),
    Leave("after-upstream-headers", "hang-in-body", False),
    Leave("after-upstream-headers", "hang-after-headers", True),
    Leave("mid-stream", "slow-stream", True, wait_events=2, outcome="client_disconnected"),
    Leave("mid-stream-stalled", "hang-mid-stream", True, wait_events=2, outcome="client_disconnected"),
]


def raw_request(model: str, stream: bool) -> bytes:
    body = orjson.dumps({"model": model, "messages": MESSAGES, "stream": stream})
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


@pytest.mark.parametrize("leave", LEAVES, ids=[leave.id for leave in LEAVES])
def test_client_leaves(fault_proxy: Proxy, fault: FaultServer, leave: Leave) -> None:
    """The upstream connection is closed as soon as the client's is (well before the 1 s read
    timeout could do it), and the request is counted as 499."""
    before, mark, log_at = scrape(fault_proxy), fault.mark(), log_mark(fault_proxy)
    port = fault_proxy.port
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw_request(leave.model, leave.stream))
        conn = fault.wait_request(mark)
        while received.count(b"data: ") < leave.wait_events:
            piece = sock.recv(65536)
            assert piece, "the proxy closed the stream early"
            received += piece
        if not leave.wait_events:
            time.sleep(0.15)  # let the upstream's headers (if any) reach the proxy
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # the client has nothing yet
    left_at = time.monotonic()
    released(fault, mark, left_at, within=0.5)
    assert conn.closed_by == "peer"
    after = settled(fault_proxy, fault, fault.mark(), time.monotonic(), log_at)
    target = {"target_model": leave.model}
    assert delta(before, after, "rerouter_requests_total", status_code="499", **target) == 1
    assert delta(before, after, "rerouter_upstream_errors_total", **target) == 0
    assert delta(before, after, "rerouter_streams_total", **target) == (1 if leave.outcome else 0)
    if leave.outcome:
        assert delta(before, after, "rerouter_streams_total", outcome=leave.outcome, **target) == 1


# --- many at once ---------------------------------------------------------------------------------------


def test_mixed_faults_at_once_leave_nothing_behind(fault_proxy: Proxy, fault: FaultServer) -> None:
    mix = [
        ("reset-before-headers", False, 502),
        ("hang-before-headers", True, 504),
        ("hang-mid-stream", True, 200),
        ("reset-mid-stream", True, 200),
        ("truncated-chunked", False, 502),
        ("garbage-status-hold", False, 502),
        ("status-503", True, 503),
        ("gpt-4o", True, 200),
        ("gpt-4o", False, 200),
    ] * 2
    before, mark, log_at = scrape(fault_proxy), fault.mark(), log_mark(fault_proxy)
    with ThreadPoolExecutor(len(mix)) as pool:
        answers = list(pool.map(lambda m: call(fault_proxy, m[0], stream=m[1]), mix))
    assert [a.status for a in answers] == [status for _, _, status in mix]
    assert len(fault.since(mark)) == len(mix)
    after = settled(fault_proxy, fault, mark, max(a.done_at for a in answers), log_at)
    assert delta(before, after, "rerouter_requests_total") == len(mix)
