"""Shared fixtures: a real fake upstream, and the proxy as a real process on a real port."""

from __future__ import annotations

import os
import posixpath
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_upstream import FakeUpstream
from tests.fault_server import FaultServer

DEFAULT_MAP = {
    "gpt-3.5-turbo-16k": "qwen3-4b",
    "/gpt-4.*/": "echo-model",
    "/(?P<family>llama)-(\\d+)b/": "\\g<family>-\\2-served",
    "whisper-1": "whisper-large-v3",
    "text-embedding-3-small": "bge-m3",
    "gpt-slow": "slow-stream",
    "gpt-broken": "die-mid-stream",
    "gpt-hang": "hang",
    "gpt-ratelimited": "status-429",
    "gpt-down": "status-503",
    "gpt-missing": "not-listed-anywhere",
}


def eventually(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Retry ``check`` until it stops raising AssertionError, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def lands_under_v1(raw_path: str) -> bool:
    """Where a path leads at an upstream that decodes it 0, 1 or 2 times before normalising, and
    reads a segment's ``;`` parameters as not part of it (as servlet containers do)."""
    path = raw_path.split("?", 1)[0]
    for _ in range(3):
        resolved = posixpath.normpath("/".join(part.split(";", 1)[0] for part in path.split("/")))
        if not (resolved == "/v1" or resolved.startswith("/v1/")):
            return False
        path = unquote(path)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proxy:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON events the proxy logged so far (other lines, such as Sanic's, skipped)."""
        events = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                events.append(orjson.loads(line))
        return events

    def request_event(self, request_id: str, timeout: float = 10) -> dict[str, Any]:
        """The ``request`` event logged for ``request_id``, once it is written."""

        def find() -> dict[str, Any]:
            found = [
                e
                for e in self.log_events()
                if e.get("event") == "request" and e.get("request_id") == request_id
            ]
            assert found, f"no request event for {request_id} yet"
            return found[0]

        event: dict[str, Any] = eventually(find, timeout)
        return event

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


SANIC_ACK_SETTLE = 0.5


class PortTaken(RuntimeError):
    """The proxy could not listen: its port was taken meanwhile."""


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path, workers: int) -> None:
    """Healthy, every worker reported ready, and a moment more for Sanic's main process to see
    the workers' start-up acknowledgements (a stop before that is safe too: test_lifecycle)."""
    deadline = time.monotonic() + 90  # a busy 2-core machine takes half a minute to start 2 workers
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text()
            taken = "Address already in use" in log
            raise (PortTaken if taken else RuntimeError)(f"proxy exited with {process.returncode}:\n{log}")
        try:
            healthy = httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and log_path.read_bytes().count(b"Worker ready [") >= workers:
            time.sleep(SANIC_ACK_SETTLE)
            return
        time.sleep(0.1)
    raise RuntimeError(f"proxy did not become healthy:\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def upstream() -> FakeUpstream:
    server = FakeUpstream()
    server.start()
    return server


@pytest.fixture(scope="module")
def echo() -> Iterator[FaultServer]:
    """A raw upstream answering every request 200 and recording it as it came, for the module."""
    server = FaultServer(echo_only=True)
    server.start()
    yield server
    server.stop()


StartProxy = Callable[..., Proxy]


@pytest.fixture(scope="session")
def start_proxy(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartProxy]:
    """Start ``python -m service`` with the given environment on top of a test default.

    Pass ``UPSTREAM_URL``/``MODEL_MAP`` to override; ``None`` removes a variable.
    """
    started: list[Proxy] = []
    folders = threading.Lock()

    def start(**env: str | None) -> Proxy:
        """A port found free can be taken before the proxy binds it (by another test's
        connection): then it starts again on another, unless the test chose the port."""
        for _ in range(3):
            try:
                return start_on(free_port(), env)
            except PortTaken:
                if "LISTEN_PORT" in env:
                    raise
        return start_on(free_port(), env)

    def start_on(port: int, env: dict[str, str | None]) -> Proxy:
        with folders:  # side_by_side starts proxies from threads; mktemp numbers folders racily
            log_path = tmp_path_factory.mktemp("proxy") / "proxy.log"
        settings: dict[str, str | None] = {
            "UPSTREAM_URL": upstream.url,
            "MODEL_MAP": orjson.dumps(DEFAULT_MAP).decode(),
            "LISTEN_HOST": "127.0.0.1",
            "LISTEN_PORT": str(port),
            "SHUTDOWN_GRACE": "0",
            **env,
        }
        full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        full_env.update({k: v for k, v in settings.items() if v is not None})
        for name in [k for k, v in settings.items() if v is None]:
            full_env.pop(name, None)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "service"],
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
                start_new_session=True,
            )
        proxy = Proxy(f"http://127.0.0.1:{port}", process, log_path)
        started.append(proxy)
        wait_until_healthy(proxy.url, process, log_path, int(settings.get("WORKERS") or 1))
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def proxy(start_proxy: StartProxy) -> Proxy:
    """The proxy with the default test map, shared by tests that do not change settings."""
    return start_proxy()


# -- /metrics ----------------------------------------------------------------------------------

Samples = list[tuple[str, dict[str, str], float]]


def scrape(proxy: Proxy) -> Samples:
    """Every sample of the proxy's /metrics page: (name, labels, value)."""
    response = httpx.get(f"{proxy.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/plain")
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def pick(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (have, value)
        for sample_name, have, value in samples
        if sample_name == name and all(have.get(k) == v for k, v in labels.items())
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for _, value in pick(samples, name, **labels))


@contextmanager
def side_by_side(
    start_proxy: StartProxy, settings: dict[str, dict[str, str]], **common: str
) -> Iterator[dict[str, Proxy]]:
    """A proxy per entry of ``settings`` (each over ``common``), started and stopped in parallel:
    a module's proxies then cost the time of one start, not of all."""
    with ThreadPoolExecutor(len(settings)) as pool:
        started = {name: pool.submit(start_proxy, **{**common, **env}) for name, env in settings.items()}
    running = {name: future.result() for name, future in started.items()}
    yield running
    with ThreadPoolExecutor(len(running)) as pool:
        list(pool.map(Proxy.stop, running.values()))
