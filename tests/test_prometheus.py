"""The proxy's /metrics as real Prometheus tooling sees it: promtool's linter, and a real server.

Needs Debian's ``prometheus`` package (``promtool`` and ``prometheus`` on PATH), which
``make system-deps`` installs. Without it these tests skip, except under CI=true, where CI has
installed it and a missing binary is a failure.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, StartProxy, free_port

JOB = "rerouter"
QWEN = ("gpt-3.5-turbo-16k", "qwen3-4b")  # exact entry of DEFAULT_MAP
ECHO = ("gpt-4o", "echo-model")  # matched by /gpt-4.*/
RATE_LIMITED = ("gpt-ratelimited", "status-429")  # the fake upstream answers 429
# Two workers, so /metrics is the multiprocess sum; no drain pause on SIGTERM, to stop quickly.
PROXY_ENV = {"WORKERS": "2", "SHUTDOWN_GRACE": "0"}
ROUNDS = 3  # rounds of traffic, a scrape interval apart, so rate() has samples that grew


def require(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"`{name}` not found on PATH: run `make system-deps` (installs Debian's prometheus package)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, where it must be installed", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def promtool() -> str:
    return require("promtool")


@pytest.fixture
def prometheus_binary() -> str:
    return require("prometheus")


def chat(proxy: Proxy, model: str, *, stream: bool = False) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with httpx.stream("POST", f"{proxy.v1}/chat/completions", json=body, timeout=15) as response:
        response.read()
        return response.status_code


def drive_round(proxy: Proxy) -> None:
    """One request of each kind per mapped model: 2 each, one of them streamed."""
    for source, _ in (QWEN, ECHO):
        assert chat(proxy, source) == 200
        assert chat(proxy, source, stream=True) == 200


def lint(promtool: str, page: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, timeout=30)


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_lint_is_not_vacuous(promtool: str) -> None:
    """A known-bad page fails, so the clean result below means something."""
    result = lint(promtool, b"# HELP foo_count things\n# TYPE foo_count counter\nfoo_count 1\n")
    assert result.returncode != 0
    assert b'should have "_total" suffix' in result.stdout + result.stderr


def test_live_metrics_page_passes_promtool_check(promtool: str, start_proxy: StartProxy) -> None:
    proxy = start_proxy(**PROXY_ENV)

    def check(page: bytes) -> None:
        result = lint(promtool, page)
        findings = (result.stdout + result.stderr).decode(errors="replace")
        assert (result.returncode, findings) == (0, ""), page.decode(errors="replace")

    idle = httpx.get(f"{proxy.url}/metrics", timeout=10)
    assert idle.status_code == 200
    check(idle.content)

    drive_round(proxy)
    assert chat(proxy, RATE_LIMITED[0]) == 429
    page = httpx.get(f"{proxy.url}/metrics", timeout=10).content
    families = {family.name for family in text_string_to_metric_families(page.decode())}
    assert {"rerouter_requests", "rerouter_request_duration_seconds", "rerouter_streams"} <= families
    check(page)
    assert proxy.stop() == 0


# -- a real Prometheus server scraping the proxy -----------------------------------------------


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def eventually(check: Callable[[], Any], timeout: float, what: str, server: Prometheus) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, httpx.HTTPError) as error:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {server.process.returncode}:\n{server.log()}"
                ) from error
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {error}") from error
            time.sleep(0.25)


@pytest.fixture
def scraped(
    prometheus_binary: str, start_proxy: StartProxy, tmp_path: Path
) -> Iterator[tuple[Proxy, Prometheus]]:
    """A fresh two-worker proxy, and a Prometheus on its own loopback port scraping it every second."""
    proxy = start_proxy(**PROXY_ENV)
    target = proxy.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:

        def ready() -> None:
            assert httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200

        eventually(ready, 15, "prometheus /-/ready", server)
        yield proxy, server
    finally:
        server.stop()
        proxy.stop()


def test_prometheus_scrapes_per_model_series_and_latency_quantiles(scraped: tuple[Proxy, Prometheus]) -> None:
    proxy, server = scraped

    def first_scrape_up() -> None:
        assert server.query(f'up{{job="{JOB}"}}') == [
            ({"__name__": "up", "instance": target, "job": JOB}, 1.0)
        ]

    target = proxy.url.removeprefix("http://")
    eventually(first_scrape_up, 10, "the first successful scrape", server)

    # Traffic spread over a few scrape intervals, so the rate() over the buckets sees them grow.
    assert chat(proxy, RATE_LIMITED[0]) == 429
    for round_number in range(ROUNDS):
        if round_number:
            time.sleep(1.1)
        drive_round(proxy)

    base = {
        "__name__": "rerouter_requests_total",
        "endpoint": "chat/completions",
        "instance": target,
        "job": JOB,
    }
    expected_requests = {
        (*QWEN, "200"): 2 * ROUNDS,
        (*ECHO, "200"): 2 * ROUNDS,
        (*RATE_LIMITED, "429"): 1,
    }
    expected_counts = {QWEN[1]: 2 * ROUNDS, ECHO[1]: 2 * ROUNDS, RATE_LIMITED[1]: 1}
    rate_quantile = (
        "histogram_quantile(0.95, sum by (le, target_model) "
        f'(rate(rerouter_request_duration_seconds_bucket{{job="{JOB}"}}[1m])))'
    )
    raw_quantile = (
        "histogram_quantile(0.95, sum by (le, target_model) "
        f'(rerouter_request_duration_seconds_bucket{{job="{JOB}"}}))'
    )

    def settled() -> dict[str, dict[str, float]]:
        requests = server.query(f'rerouter_requests_total{{job="{JOB}"}}')
        series = {(m["source_model"], m["target_model"], m["status_code"]): value for m, value in requests}
        assert series == expected_requests
        for labels, _ in requests:
            key = (labels["source_model"], labels["target_model"], labels["status_code"])
            assert labels == {**base, "source_model": key[0], "target_model": key[1], "status_code": key[2]}
        counts = server.query(
            f'sum by (target_model) (rerouter_request_duration_seconds_count{{job="{JOB}"}})'
        )
        assert {m["target_model"]: value for m, value in counts} == expected_counts
        by_rate = {m["target_model"]: value for m, value in server.query(rate_quantile)}
        assert all(math.isfinite(by_rate.get(model, math.nan)) for model in (QWEN[1], ECHO[1])), by_rate
        by_raw = {m["target_model"]: value for m, value in server.query(raw_quantile)}
        assert by_raw.keys() == expected_counts.keys(), by_raw
        return {"rate": by_rate, "raw": by_raw}

    quantiles = eventually(settled, 20, "the final counts in Prometheus", server)

    # The cumulative quantile lies in the bucket the proxy's own page puts the 95th percentile in.
    page = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "rerouter_request_duration_seconds_bucket":
                buckets.setdefault(sample.labels["target_model"], []).append(
                    (float(sample.labels["le"]), sample.value)
                )
    for model, value in quantiles["raw"].items():
        bounds = sorted(buckets[model])
        rank = 0.95 * bounds[-1][1]
        index = next(i for i, (_, count) in enumerate(bounds) if count >= rank)
        lower = bounds[index - 1][0] if index else 0.0
        upper = bounds[index][0]
        assert math.isfinite(value), (model, value)
        assert lower <= value <= upper, (model, value, bounds)
    for model in (QWEN[1], ECHO[1]):
        assert 0 < quantiles["rate"][model] <= 600, quantiles
