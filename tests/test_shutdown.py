"""Graceful drain: SIGTERM turns /readyz to 503, stops serving new connections after the grace,
and lets a stream in progress finish intact before the process exits 0.

After the grace the workers close their listeners; Sanic's main process still holds the bound
socket until it exits, so the kernel may queue a new connection that is then reset rather than
refused outright. Either way it is never served.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.conftest import StartProxy

EVENTS = 40  # 2 s at one event per 50 ms


def test_sigterm_drains_a_stream_in_progress(start_proxy: StartProxy) -> None:
    proxy = start_proxy(SHUTDOWN_GRACE="1", SHUTDOWN_TIMEOUT="10")
    body: list[bytes] = []
    first_event = threading.Event()
    finished = threading.Event()

    def stream() -> None:
        request = {
            "model": f"slow-stream-{EVENTS}",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
        with (
            httpx.Client(timeout=15) as client,
            client.stream("POST", f"{proxy.v1}/chat/completions", json=request) as response,
        ):
            for chunk in response.iter_raw():
                body.append(chunk)
                first_event.set()
        finished.set()

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    assert first_event.wait(5), "the stream never started"

    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{proxy.url}/readyz", timeout=2)
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "shutting_down"
    assert not finished.is_set(), "the stream should still be running during the grace"

    time.sleep(1.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{proxy.url}/healthz", timeout=1)

    assert finished.wait(10), "the stream did not complete during the drain"
    text = b"".join(body).decode()
    assert text.count("data: ") == EVENTS + 1
    assert text.endswith("data: [DONE]\n\n")
    assert proxy.process.wait(timeout=15) == 0


def test_a_drained_shutdown_logs_no_warning(start_proxy: StartProxy) -> None:
    """The worker's config watcher ends with the server: its end is not reported as a task
    cancelled before it completed, on every Ctrl-C and every rollout."""
    proxy = start_proxy(SHUTDOWN_GRACE="0.2", SHUTDOWN_TIMEOUT="5")
    assert httpx.get(f"{proxy.url}/healthz", timeout=5).status_code == 200
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=15) == 0
    log = proxy.log_path.read_text()
    assert "Server Stopped" in log
    assert "WARNING" not in log, log
    assert '"level":"warning"' not in log, log
