"""Logs: one JSON event per request with its facts, request ids end to end, and no secrets."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from service import logs
from tests.conftest import Proxy, StartProxy

REQUEST_FIELDS = {
    "event",
    "request_id",
    "endpoint",
    "source_model",
    "target_model",
    "upstream",
    "rule",
    "stream",
    "status",
    "duration_ms",
    "level",
    "timestamp",
}


@pytest.fixture(scope="module")
def logged(start_proxy: StartProxy) -> Iterator[Proxy]:
    """A proxy of its own, at debug level, so nothing it logs is hidden from these tests."""
    proxy = start_proxy(LOG_LEVEL="debug")
    yield proxy
    proxy.stop()


def events_for(proxy: Proxy, request_id: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The events bound to ``request_id``, once ``count`` of them were written (streams log last)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in proxy.log_events() if e.get("request_id") == request_id]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def chat(proxy: Proxy, model: str, request_id: str | None = None, **extra: Any) -> httpx.Response:
    headers = {"X-Request-ID": request_id} if request_id else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{proxy.v1}/chat/completions", json=body, headers=headers, timeout=15)


def test_one_request_event_with_every_field(logged: Proxy) -> None:
    request_id = f"fields-{uuid.uuid4().hex}"
    response = chat(logged, "gpt-3.5-turbo-16k", request_id)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id

    (event,) = events_for(logged, request_id)
    assert set(event) == REQUEST_FIELDS
    assert event["event"] == "request"
    assert event["level"] == "info"
    assert event["endpoint"] == "chat/completions"
    assert event["source_model"] == "gpt-3.5-turbo-16k"
    assert event["target_model"] == "qwen3-4b"
    assert event["rule"] == "gpt-3.5-turbo-16k"
    assert event["stream"] is False
    assert event["status"] == 200
    assert isinstance(event["duration_ms"], int | float)
    assert 0 <= event["duration_ms"] < 15_000
    assert datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).tzinfo is not None


def test_stream_regex_rule_and_upstream_error_are_logged(logged: Proxy) -> None:
    stream_id = f"stream-{uuid.uuid4().hex}"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{logged.v1}/chat/completions", json=body, headers={"X-Request-ID": stream_id}, timeout=15
    ) as response:
        assert response.headers["x-request-id"] == stream_id
        assert response.read().endswith(b"data: [DONE]\n\n")
    (event,) = events_for(logged, stream_id)
    assert event["rule"] == "/gpt-4.*/"
    assert event["target_model"] == "echo-model"
    assert event["stream"] is True
    assert event["status"] == 200
    assert event["outcome"] == "completed"

    limited_id = f"limited-{uuid.uuid4().hex}"
    assert chat(logged, "gpt-ratelimited", limited_id).status_code == 429
    (event,) = events_for(logged, limited_id)
    assert event["status"] == 429
    assert event["upstream_error"] == "http_4xx"
    assert event["target_model"] == "status-429"


def test_rejected_body_is_logged_with_its_status_and_no_model(logged: Proxy) -> None:
    request_id = f"bad-{uuid.uuid4().hex}"
    response = httpx.post(
        f"{logged.v1}/chat/completions",
        content=b"[1, 2]",
        headers={"content-type": "application/json", "X-Request-ID": request_id},
    )
    assert response.status_code == 400
    assert response.headers["x-request-id"] == request_id
    (event,) = events_for(logged, request_id)
    assert (event["status"], event["source_model"], event["target_model"], event["rule"]) == (
        400,
        None,
        None,
        None,
    )


def test_each_request_logs_exactly_one_event(logged: Proxy) -> None:
    ids = [f"each-{i}-{uuid.uuid4().hex}" for i in range(5)]
    for request_id in ids:
        assert chat(logged, f"unmapped-{request_id}", request_id).status_code == 200
    time.sleep(0.3)  # room for a wrongly doubled event to show up
    events = logged.log_events()
    for request_id in ids:
        mine = [e for e in events if e.get("request_id") == request_id]
        assert [e["event"] for e in mine] == ["request"]
        assert mine[0]["source_model"] == f"unmapped-{request_id}"
        assert mine[0]["rule"] is None


def test_a_generated_request_id_is_returned_and_logged(logged: Proxy) -> None:
    response = chat(logged, "gpt-3.5-turbo-16k")
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    (event,) = events_for(logged, generated)
    assert event["event"] == "request"
    assert event["source_model"] == "gpt-3.5-turbo-16k"
    again = chat(logged, "gpt-3.5-turbo-16k").headers["x-request-id"]
    assert again != generated


@pytest.mark.parametrize("given", ["has space", "x" * 129, "tab\there", "ünïcode"])
def test_an_unusable_request_id_is_replaced(logged: Proxy, given: str) -> None:
    response = httpx.post(
        f"{logged.v1}/chat/completions",
        json={"model": "gpt-3.5-turbo-16k", "messages": []},
        headers={"X-Request-ID": given.encode()},
    )
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert len(events_for(logged, generated)) == 1


def test_the_request_id_is_passed_to_the_upstream(logged: Proxy, upstream: Any) -> None:
    request_id = f"upstream-{uuid.uuid4().hex}"
    assert chat(logged, f"marker-model-{request_id}", request_id).status_code == 200
    seen = [r for r in upstream.requests if request_id in r.body.decode(errors="replace")]
    assert len(seen) == 1
    assert {k.lower(): v for k, v in seen[0].headers.items()}["x-request-id"] == request_id


def test_prompts_and_keys_are_never_logged(logged: Proxy) -> None:
    marker = f"prompt-marker-{uuid.uuid4().hex}"
    secret = f"sk-secret-marker-{uuid.uuid4().hex}"
    auth = {"Authorization": f"Bearer {secret}"}
    ids = [f"secret-{i}-{uuid.uuid4().hex}" for i in range(5)]
    messages = [{"role": "user", "content": f"please remember {marker}"}]

    ok = httpx.post(
        f"{logged.v1}/chat/completions",
        json={"model": "gpt-3.5-turbo-16k", "messages": messages},
        headers={**auth, "X-Request-ID": ids[0]},
    )
    assert ok.status_code == 200
    assert marker not in ok.text  # the fake upstream does not echo prompts either
    body = {"model": "gpt-4o", "messages": messages, "stream": True}
    with httpx.stream(
        "POST", f"{logged.v1}/chat/completions", json=body, headers={**auth, "X-Request-ID": ids[1]}
    ) as streamed:
        streamed.read()
    limited = httpx.post(
        f"{logged.v1}/chat/completions",
        json={"model": "gpt-ratelimited", "messages": messages},
        headers={**auth, "X-Request-ID": ids[2]},
    )
    assert limited.status_code == 429
    broken = httpx.post(
        f"{logged.v1}/chat/completions",
        content=f'{{"model": "gpt-4o", "messages": "{marker}'.encode(),
        headers={**auth, "X-Request-ID": ids[3], "content-type": "application/json"},
    )
    assert broken.status_code == 400
    completion = httpx.post(
        f"{logged.v1}/completions",
        json={"model": "gpt-3.5-turbo-16k", "prompt": marker},
        headers={**auth, "X-Request-ID": ids[4]},
    )
    assert completion.status_code == 200

    for request_id in ids:
        assert len(events_for(logged, request_id)) == 1, f"{request_id} was not logged"
    log_bytes = logged.log_path.read_bytes()
    assert marker.encode() not in log_bytes
    assert secret.encode() not in log_bytes
    assert b"sk-secret-marker" not in log_bytes


# -- logs.configure in process -----------------------------------------------------------------


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logs.bind_request(None)


@pytest.mark.usefixtures("restore_structlog")
def test_configure_json_writes_one_json_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    logs.bind_request("ctx-1")
    structlog.get_logger("t").info("request", status=200, target_model="m")
    structlog.get_logger("t").debug("hidden at info")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    event = orjson.loads(lines[0])
    assert event["event"] == "request"
    assert event["request_id"] == "ctx-1"
    assert event["status"] == 200
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")


@pytest.mark.usefixtures("restore_structlog")
def test_configure_console_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("console", "debug")
    structlog.get_logger("t").debug("request", status=201)
    out = capsys.readouterr().out
    assert "request" in out
    assert "status=201" in out
    assert "\x1b[" not in out, "no colour codes in logs"
    assert not out.lstrip().startswith("{")


@pytest.mark.usefixtures("restore_structlog")
def test_configure_filters_below_the_level() -> None:
    logs.configure("json", "warning")
    with capture_logs() as captured:
        log = structlog.get_logger("t")
        log.info("dropped")
        log.warning("kept", reason="x")
        log.error("also kept")
    assert [(e["event"], e["log_level"]) for e in captured] == [("kept", "warning"), ("also kept", "error")]


HOSTILE = "gpt\n2026-01-01T00:00:00Z [info     ] forged event\x1b[31m\r\x00\x85\u2028\ud800 end"


@pytest.mark.usefixtures("restore_structlog")
def test_console_escapes_control_characters_in_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    """A client's model id must not forge a console log line, colour a terminal or be lost."""
    logs.configure("console", "debug")
    structlog.get_logger("t").info(HOSTILE, source_model=HOSTILE, nested={"m": HOSTILE})
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    assert out.endswith("\n")
    line = out[:-1]
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", line), repr(line)
    assert line.count("forged event") == 3
    assert "source_model=" in line
    structlog.get_logger("t").info("plain", model="a\x1b[2Jb")  # no space: not quoted by structlog
    assert "model=a\\x1b[2Jb" in capsys.readouterr().out


@pytest.mark.usefixtures("restore_structlog")
def test_json_writes_an_event_with_a_lone_surrogate_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """orjson refuses lone surrogates; the event must still be written, one line, valid JSON."""
    logs.configure("json", "info")
    structlog.get_logger("t").info("request", source_model=HOSTILE, status=400)
    lines = capsys.readouterr().out.removesuffix("\n").split("\n")  # NEL, U+2028 stay as they are
    assert len(lines) == 1
    event = orjson.loads(lines[0])
    assert event["status"] == 400
    assert event["source_model"].startswith("gpt\n2026")
    assert "\\ud800" in event["source_model"]


EVENT_FIELDS = {
    "endpoint": "chat/completions",
    "source_model": HOSTILE,
    "target_model": "qwen3-4b",
    "upstream": "default",
    "rule": None,
    "stream": True,
    "status": 200,
    "duration_ms": 12.34,
    "outcome": "completed",
}


@pytest.mark.usefixtures("restore_structlog")
def test_the_request_event_is_the_line_structlog_writes(capsys: pytest.CaptureFixture[str]) -> None:
    """``request_event`` skips structlog's generic path; the line is the same, byte for byte
    (the timestamp aside), a field that orjson refuses included."""
    logs.configure("json", "info")
    logs.bind_request("r-1")
    logs.request_event(dict(EVENT_FIELDS))
    structlog.get_logger("rerouter").info("request", **EVENT_FIELDS)
    direct, generic = (
        re.sub(r'"timestamp":"[^"]*"', '"timestamp":"T"', line)
        for line in capsys.readouterr().out.removesuffix("\n").split("\n")
        if line.startswith("{")
    )
    assert direct == generic
    assert orjson.loads(direct)["request_id"] == "r-1"


@pytest.mark.usefixtures("restore_structlog")
def test_the_request_event_takes_structlogs_path_otherwise(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    with capture_logs() as captured:
        logs.request_event({"status": 200})
    assert captured == [{"status": 200, "event": "request", "log_level": "info"}]
    assert capsys.readouterr().out == ""
    logs.configure("json", "warning")
    logs.request_event({"status": 200})
    assert capsys.readouterr().out == ""
    logs.configure("console", "info")
    logs.request_event({"status": 200})
    out = capsys.readouterr().out
    assert "request" in out
    assert "status=200" in out
    assert not out.startswith("{")


def test_bounded_cuts_long_ids_and_marks_them() -> None:
    assert logs.bounded(None, 8) is None
    assert logs.bounded("short", 8) == "short"
    assert logs.bounded("m" * 100_000, 8) == "mmmmmmmm...[100000 chars]"
