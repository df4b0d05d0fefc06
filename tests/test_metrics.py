"""Prometheus metrics of real proxy processes: names, labels, counts, the label cap, workers."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.metrics import FLUSH_SECONDS, ModelLabels, Pending
from tests.conftest import Proxy, Samples, StartProxy, eventually, pick, scrape, total


def chat(proxy: Proxy, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{proxy.v1}/chat/completions", json=body, timeout=15)


def chat_stream(proxy: Proxy, model: str) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{proxy.v1}/chat/completions", json=body, timeout=15) as response:
        assert response.status_code == 200
        data = response.read()
    assert data.endswith(b"data: [DONE]\n\n")
    return data


def test_model_labels_cap_in_process() -> None:
    labels = ModelLabels(2, {"alias", "target"})
    assert [labels(m) for m in ("a", "b", "c", "a", "alias", "target", "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "alias",
        "target",
        "other",
        "b",
    ]
    assert labels(None) == "none"


def test_model_labels_refuse_ids_that_are_too_long_or_not_unicode() -> None:
    """A label is stored once per value in the multiprocess files, and one that cannot be UTF-8
    makes every later /metrics fail: such ids are ``other`` before they take a place."""
    labels = ModelLabels(3, {"alias", "bad-\ud800", "k" * 300}, max_length=256)
    assert labels("\ud800") == "other"
    assert labels("gpt-\udfff") == "other"
    assert labels("m" * 257) == "other"
    assert labels("bad-\ud800") == "other", "not even from MODEL_MAP"
    assert labels("k" * 300) == "other"
    assert [labels(m) for m in ("m" * 256, "a", "b", "c")] == ["m" * 256, "a", "b", "other"]
    assert labels("alias") == "alias"


# -- one proxy, a known mix of traffic ---------------------------------------------------------


@pytest.fixture(scope="module")
def traffic(start_proxy: StartProxy) -> Iterator[Samples]:
    """A fresh proxy (so counts are exact) that served a known mix of requests."""
    proxy = start_proxy()
    idle = scrape(proxy)
    assert total(idle, "rerouter_requests_total") == 0, "a fresh proxy has counted nothing"
    for _ in range(3):
        assert chat(proxy, "gpt-3.5-turbo-16k").status_code == 200
    for _ in range(2):
        chat_stream(proxy, "gpt-4o")
    assert chat(proxy, "gpt-ratelimited").status_code == 429
    assert chat(proxy, "gpt-down").status_code == 503
    bad = httpx.post(
        f"{proxy.v1}/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
    embed = httpx.post(f"{proxy.v1}/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert embed.status_code == 200

    def settled() -> Samples:
        # Scraped again and again until the streams are booked: /metrics never counts itself.
        samples = scrape(proxy)
        assert total(samples, "rerouter_streams_total") == 2
        return samples

    yield eventually(settled, 10.0)
    proxy.stop()


def test_requests_total_counts_by_endpoint_models_and_status(traffic: Samples) -> None:
    def count(endpoint: str, source: str, target: str, status: str) -> float:
        labels = {"endpoint": endpoint, "source_model": source, "target_model": target, "status_code": status}
        (match,) = pick(traffic, "rerouter_requests_total", **labels)
        assert match[0] == labels
        return match[1]

    assert count("chat/completions", "gpt-3.5-turbo-16k", "qwen3-4b", "200") == 3
    assert count("chat/completions", "gpt-4o", "echo-model", "200") == 2
    assert count("chat/completions", "gpt-ratelimited", "status-429", "429") == 1
    assert count("chat/completions", "gpt-down", "status-503", "503") == 1
    assert count("chat/completions", "none", "none", "400") == 1
    assert count("embeddings", "text-embedding-3-small", "bge-m3", "200") == 1
    assert len(pick(traffic, "rerouter_requests_total")) == 6
    assert total(traffic, "rerouter_requests_total") == 9


def test_duration_histogram_per_endpoint_and_target(traffic: Samples) -> None:
    labels = {"endpoint": "chat/completions", "target_model": "qwen3-4b"}
    assert total(traffic, "rerouter_request_duration_seconds_count", **labels) == 3
    assert 0 < total(traffic, "rerouter_request_duration_seconds_sum", **labels) < 30
    buckets = sorted(
        (float(have["le"]), value)
        for have, value in pick(traffic, "rerouter_request_duration_seconds_bucket", **labels)
    )
    assert buckets[-1] == (float("inf"), 3)
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), "histogram buckets must be cumulative"
    assert total(traffic, "rerouter_request_duration_seconds_count") == 9


def test_time_to_first_byte_is_observed_for_streams_only(traffic: Samples) -> None:
    streamed = {"endpoint": "chat/completions", "target_model": "echo-model"}
    assert total(traffic, "rerouter_time_to_first_byte_seconds_count", **streamed) == 2
    assert total(traffic, "rerouter_time_to_first_byte_seconds_sum", **streamed) > 0
    assert total(traffic, "rerouter_time_to_first_byte_seconds_count", target_model="qwen3-4b") == 0
    assert total(traffic, "rerouter_time_to_first_byte_seconds_count") == 2
    assert total(traffic, "rerouter_streams_total", target_model="echo-model", outcome="completed") == 2


def test_upstream_http_errors_are_counted_by_class(traffic: Samples) -> None:
    assert total(traffic, "rerouter_upstream_errors_total", target_model="status-429", reason="http_4xx") == 1
    assert total(traffic, "rerouter_upstream_errors_total", target_model="status-503", reason="http_5xx") == 1
    assert total(traffic, "rerouter_upstream_errors_total") == 2


def test_in_flight_is_back_to_zero(traffic: Samples) -> None:
    assert pick(traffic, "rerouter_requests_in_flight") == [({}, 0.0)]


# -- an unreachable upstream -------------------------------------------------------------------


def test_unreachable_upstream_counts_a_connect_error(start_proxy: StartProxy) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        proxy = start_proxy(UPSTREAM_URL=f"http://127.0.0.1:{closed.getsockname()[1]}")
        try:
            response = chat(proxy, "gpt-3.5-turbo-16k")
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_connect"
            samples = scrape(proxy)
        finally:
            proxy.stop()
    assert total(samples, "rerouter_upstream_errors_total", target_model="qwen3-4b", reason="connect") == 1
    assert total(samples, "rerouter_upstream_errors_total") == 1
    assert (
        total(
            samples,
            "rerouter_requests_total",
            source_model="gpt-3.5-turbo-16k",
            target_model="qwen3-4b",
            status_code="502",
        )
        == 1
    )
    assert pick(samples, "rerouter_requests_in_flight") == [({}, 0.0)]


# -- the model label cap -----------------------------------------------------------------------


def test_model_labels_are_capped_but_ids_from_the_map_keep_theirs(start_proxy: StartProxy) -> None:
    proxy = start_proxy(METRICS_MAX_MODELS="3")
    try:
        unmapped = [f"cap-model-{i}" for i in range(10)]
        for model in unmapped:
            assert chat(proxy, model).status_code == 200
        # Past the cap: exact aliases and their targets, and literal regex targets, keep their label.
        assert chat(proxy, "gpt-3.5-turbo-16k").status_code == 200
        assert chat(proxy, "gpt-4-past-the-cap").status_code == 200
        samples = scrape(proxy)
    finally:
        proxy.stop()

    requests = pick(samples, "rerouter_requests_total", endpoint="chat/completions")
    by_source = {labels["source_model"]: value for labels, value in requests}
    labelled = {source for source in by_source if source.startswith("cap-model-")}
    assert len(labelled) <= 3
    assert labelled == set(unmapped[:3]), "a single worker labels the first ids it sees"
    capped = sum(by_source[source] for source in labelled) + total(
        samples, "rerouter_requests_total", source_model="other", target_model="other"
    )
    assert capped == 10
    assert not [
        labels
        for labels, _ in requests
        if labels["target_model"].startswith("cap-model-") and labels["target_model"] not in labelled
    ]

    assert (
        total(samples, "rerouter_requests_total", source_model="gpt-3.5-turbo-16k", target_model="qwen3-4b")
        == 1
    )
    assert total(samples, "rerouter_requests_total", source_model="other", target_model="echo-model") == 1
    assert total(samples, "rerouter_requests_total") == 12


# -- several workers ---------------------------------------------------------------------------


def counting_workers(metrics_dir: Path) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in metrics_dir.glob("counter_*.db")}


def test_two_workers_report_one_exact_total(start_proxy: StartProxy, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    proxy = start_proxy(WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    try:

        def both_workers_ready() -> set[int]:
            log = proxy.log_path.read_text()
            pids = {int(pid) for pid in re.findall(r"Worker ready \[(\d+)\]", log)}
            assert len(pids) == 2, log
            return pids

        workers: set[int] = eventually(both_workers_ready, timeout=20)

        def one(index: int) -> int:
            # A new client per request: a new connection, so the kernel may pick either worker.
            return chat(proxy, "gpt-3.5-turbo-16k", user=f"u{index}").status_code

        sent = 0
        served: set[int] = set()
        with ThreadPoolExecutor(8) as pool:
            for _ in range(6):
                assert set(pool.map(one, range(40 if sent == 0 else 20))) == {200}
                sent += 40 if sent == 0 else 20
                # Each worker that counted a request owns a counter_<pid>.db file, once it has
                # written its samples (within FLUSH_SECONDS).
                flushed = time.monotonic() + 10 * FLUSH_SECONDS
                while (served := counting_workers(metrics_dir)) != workers and time.monotonic() < flushed:
                    time.sleep(FLUSH_SECONDS / 2)
                if served == workers:
                    break
        assert served == workers, f"requests were not spread over both workers: {served} vs {workers}"

        labels = {"source_model": "gpt-3.5-turbo-16k", "target_model": "qwen3-4b", "status_code": "200"}

        def exact() -> None:
            samples = scrape(proxy)
            assert total(samples, "rerouter_requests_total", **labels) == sent
            assert total(samples, "rerouter_request_duration_seconds_count", target_model="qwen3-4b") == sent
            assert pick(samples, "rerouter_requests_in_flight") == [({}, 0.0)]

        eventually(exact, timeout=10 * FLUSH_SECONDS)
        for _ in range(8):  # and every worker answering /metrics agrees, once written
            exact()
    finally:
        proxy.stop()


def test_pending_samples_flush_to_the_values_direct_writes_give() -> None:
    """Batched counts and observations end up exactly where prometheus-client's own calls put
    them: bucket edges included (a value equal to a bound is in that bound's bucket)."""
    registry = CollectorRegistry()
    direct_counter = Counter("direct_total", "d", ["kind"], registry=registry)
    batched_counter = Counter("batched_total", "b", ["kind"], registry=registry)
    bounds = (0.001, 0.01, 0.1)
    direct = Histogram("direct_seconds", "d", ["kind"], buckets=bounds, registry=registry)
    batched = Histogram("batched_seconds", "b", ["kind"], buckets=bounds, registry=registry)
    pending = Pending()
    values = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.5, 7.0, 0.001]

    async def in_a_worker() -> None:  # with an event loop running, samples wait for the flush
        for index, value in enumerate(values):
            kind = "a" if index % 3 else "b"
            direct.labels(kind).observe(value)
            pending.observe(batched, (kind,), value)
            direct_counter.labels(kind).inc(value)
            pending.count(batched_counter, (kind,), value)
        assert registry.get_sample_value("batched_seconds_count", {"kind": "a"}) is None
        pending.flush()

    asyncio.run(in_a_worker())
    for kind in ("a", "b"):
        for bound in ("0.001", "0.01", "0.1", "+Inf"):
            labels = {"kind": kind, "le": bound}
            assert registry.get_sample_value("batched_seconds_bucket", labels) == registry.get_sample_value(
                "direct_seconds_bucket", labels
            )
        for suffix in ("_seconds_sum", "_seconds_count", "_total"):
            assert registry.get_sample_value(f"batched{suffix}", {"kind": kind}) == pytest.approx(
                registry.get_sample_value(f"direct{suffix}", {"kind": kind})
            )
    pending.flush()  # nothing left: a second flush adds nothing
    assert registry.get_sample_value("batched_seconds_count", {"kind": "a"}) == 6


def test_pending_samples_are_written_within_the_flush_interval_or_at_once_without_a_loop() -> None:
    registry = CollectorRegistry()
    counter = Counter("later_total", "l", ["kind"], registry=registry)
    pending = Pending()

    async def in_a_worker() -> None:
        pending.count(counter, ("a",))
        pending.count(counter, ("a",), 2)
        assert registry.get_sample_value("later_total", {"kind": "a"}) is None
        await asyncio.sleep(FLUSH_SECONDS * 3)
        assert registry.get_sample_value("later_total", {"kind": "a"}) == 3

    asyncio.run(in_a_worker())
    pending.count(counter, ("b",))
    assert registry.get_sample_value("later_total", {"kind": "b"}) == 1
