"""Soak: thousands of streamed and whole completions through one worker, 200 clients at a time.

The upstream is ``tests/soak_upstream.py`` in a process of its own; its answers depend only on
the request, so what the proxy must relay is known: for every request the test first asks the
upstream directly, with the model the proxy should send, and the proxy's answer must be those
bytes exactly. The proxy runs with one worker; its open file descriptors and RSS are read from
/proc after a warm-up (the baseline), after each of two soak rounds, and after each round's
clients have gone. Round two repeating round one's work without growing the worker is the leak
signal; the numbers are printed (``pytest -s`` not needed).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from tests import soak_upstream
from tests.conftest import Proxy, StartProxy, free_port

CONCURRENCY = 200
ROUND_REQUESTS = 2500
WARMUP_REQUESTS = 400
EVENTS = 20
EVENT_GAP_MS = 2  # between a stream's events, so they reach the proxy as separate chunks
# The proxy's map, and the soak's models with the id each must reach the upstream as.
MODEL_MAP = {"gpt-soak": "soak-target", "/gpt-soak-(\\d+)/": "soak-target-\\1"}
MODELS = {
    "gpt-soak": "soak-target",  # exact rule
    "gpt-soak-42": "soak-target-42",  # regex rule with a group
    "soak-target": "soak-target",  # unmapped: passed through byte for byte
    "gpt-soak-x": "gpt-soak-x",  # unmapped: the regex must match the whole id
}
# Limits. Non-socket descriptors (files, pipes, epoll, the listener) must come back exactly,
# give or take FD_SLACK; sockets to clients must all be gone once the clients have; idle
# pooled sockets to the upstream may stay (aiohttp keeps them for 15 s) but never more than
# one per concurrent request. RSS may grow by RSS_TOLERANCE over the warmed-up baseline in
# round one (allocator high-water marks at 200 concurrent requests), and by at most
# RSS_ROUND2_GROWTH in round two: 2,500 more requests leaking 0.8 KB each would exceed it.
FD_SLACK = 3
RSS_TOLERANCE_KB = 30 * 1024
RSS_ROUND2_GROWTH_KB = 2 * 1024
SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class Call:
    """One request: what the client sends the proxy, and the body the upstream should see."""

    path: str
    body: bytes
    upstream_body: bytes
    stream: bool


def calls(label: str, count: int) -> list[Call]:
    """Half streamed, a fifth to /v1/completions, every model both ways, bodies of varied sizes."""
    made = []
    models = list(MODELS)
    for index in range(count):
        model = models[index // 2 % len(models)]
        stream = index % 2 == 0
        chat = index % 5 != 0
        text = f"{label} request {index}: " + "lorem ipsum ü → 数据 " * (index % 37)
        body: dict[str, Any] = {"model": model}
        if chat:
            body["messages"] = [
                {"role": "system", "content": "You are a soak test."},
                {"role": "user", "content": text},
            ]
        else:
            body["prompt"] = text
        body.update({"stream": stream, "temperature": 0.25, "max_tokens": 16 + index % 100})
        if stream:
            body.update({"soak_events": EVENTS, "soak_gap_ms": EVENT_GAP_MS})
        if index % 3 == 0:
            body["user"] = f"client-{index % CONCURRENCY}"
        upstream = {**body, "model": MODELS[model]}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        made.append(Call(path, orjson.dumps(body), orjson.dumps(upstream), stream))
    return made


@dataclass
class Answer:
    status: int = 0
    content_type: str = ""
    body: bytes = b""
    chunks: int = 0
    error: str | None = None


async def run_load(
    base: str,
    batch: list[Call],
    *,
    upstream_bodies: bool = False,
    before_close: Callable[[], object] | None = None,
) -> tuple[list[Answer], float]:
    """Every call of ``batch`` through CONCURRENCY clients on connections of their own; ``base``
    is the proxy, or the upstream itself with ``upstream_bodies`` (the direct reference).
    ``before_close`` runs once every answer is in, while the clients' connections are open.
    Returns the answers and the seconds until the last was in."""
    answers = [Answer() for _ in batch]
    queue = iter(range(len(batch)))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(session: aiohttp.ClientSession) -> None:
        for index in queue:
            call, answer = batch[index], answers[index]
            data = call.upstream_body if upstream_bodies else call.body
            try:
                async with session.post(
                    base + call.path, data=data, headers={"Content-Type": "application/json"}
                ) as response:
                    answer.status = response.status
                    answer.content_type = response.headers.get("Content-Type", "")
                    parts = [chunk async for chunk in response.content.iter_any()]
                    answer.body = b"".join(parts)
                    answer.chunks = len(parts)
            except (TimeoutError, aiohttp.ClientError) as exc:
                answer.error = f"{type(exc).__name__}: {exc}"

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))
        seconds = time.monotonic() - began
        if before_close is not None:
            before_close()
    return answers, seconds


# --- the worker, seen through /proc ----------------------------------------------------------


def worker_pid(proxy: Proxy) -> int:
    """The one worker: the child of the main process that logged ``Worker ready``."""
    ready = re.findall(rb"Worker ready \[(\d+)\]", proxy.log_path.read_bytes())
    assert len(ready) == 1, ready
    pid = int(ready[0])
    children = set()
    for task in Path(f"/proc/{proxy.process.pid}/task").iterdir():
        children |= {int(child) for child in (task / "children").read_text().split()}
    assert pid in children, (pid, children)
    return pid


def _tcp_sockets(pid: int) -> dict[str, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state) for the worker's network namespace."""
    sockets = {}
    for name in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            sockets[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    return sockets


@dataclass(frozen=True)
class Usage:
    fds: int
    upstream: int  # sockets to the upstream's port (the worker's connection pool)
    clients: int  # accepted sockets on the proxy's port
    other: int  # everything else: the listener, files, pipes, epoll, eventfds
    rss_kb: int

    def __str__(self) -> str:
        return (
            f"fds {self.fds} (upstream {self.upstream}, clients {self.clients}, other {self.other}), "
            f"RSS {self.rss_kb / 1024:.1f} MB"
        )


def usage(pid: int, proxy_port: int, upstream_port: int) -> Usage:
    inodes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed while listing
            continue
        inodes.append(target[len("socket:[") : -1] if target.startswith("socket:[") else None)
    sockets = _tcp_sockets(pid)
    kinds: Counter[str] = Counter()
    for inode in inodes:
        local, remote, state = sockets.get(inode or "", (0, 0, ""))
        if local == proxy_port and state != "0A":  # 0A: LISTEN
            kinds["clients"] += 1
        elif remote == upstream_port:
            kinds["upstream"] += 1
        else:
            kinds["other"] += 1
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert rss is not None, status
    return Usage(len(inodes), kinds["upstream"], kinds["clients"], kinds["other"], int(rss.group(1)))


def settled(pid: int, proxy_port: int, upstream_port: int) -> Usage:
    """Usage once the worker has closed every client connection (the clients closed theirs)."""
    deadline = time.monotonic() + 10
    while usage(pid, proxy_port, upstream_port).clients and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(SETTLE_SECONDS)
    return usage(pid, proxy_port, upstream_port)


# --- fixtures and the test ---------------------------------------------------------------------


@pytest.fixture
def soak_upstream_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "soak-upstream.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.soak_upstream", "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, (tmp_path / "soak-upstream.log").read_text()
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the soak upstream did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def expected_answers(url: str, batch: list[Call]) -> list[Answer]:
    """What the upstream answers directly, checked against ``soak_upstream.answer`` itself."""
    direct, _ = asyncio.run(run_load(url, batch, upstream_bodies=True))
    for call, answer in zip(batch, direct, strict=True):
        content_type, chunks = soak_upstream.answer(call.path, call.upstream_body)
        assert answer.error is None, answer
        assert answer.status == 200, answer
        assert answer.content_type.split(";")[0] == content_type
        assert answer.body == b"".join(chunks)
    return direct


def mismatches(got: list[Answer], want: list[Answer], batch: list[Call]) -> list[str]:
    found = []
    for index, (answer, expected, call) in enumerate(zip(got, want, batch, strict=True)):
        problem = None
        if answer.error is not None:
            problem = answer.error
        elif answer.status != 200:
            problem = f"status {answer.status}: {answer.body[:300]!r}"
        elif answer.content_type.split(";")[0] != expected.content_type.split(";")[0]:
            problem = f"content type {answer.content_type!r}, upstream's {expected.content_type!r}"
        elif call.stream and not answer.body.endswith(b"data: [DONE]\n\n"):
            problem = f"stream does not end with [DONE]: ...{answer.body[-100:]!r}"
        elif answer.body != expected.body:
            problem = f"{len(answer.body)} bytes differ from the upstream's {len(expected.body)}"
        if problem is not None:
            found.append(f"#{index} {call.path} stream={call.stream}: {problem}")
    return found


@pytest.mark.timeout(240)
def test_soak_relays_every_byte_without_errors_or_leaks(
    start_proxy: StartProxy, soak_upstream_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Round two repeats round one's requests exactly: the same work must not need more memory.
    soak = calls("soak", ROUND_REQUESTS)
    batches = {"warm-up": calls("warm-up", WARMUP_REQUESTS), "round 1": soak, "round 2": soak}
    started = time.monotonic()
    expected = {"warm-up": expected_answers(soak_upstream_url, batches["warm-up"])}
    expected["round 1"] = expected["round 2"] = expected_answers(soak_upstream_url, soak)
    reference_seconds = time.monotonic() - started

    proxy = start_proxy(
        UPSTREAM_URL=soak_upstream_url,
        MODEL_MAP=orjson.dumps(MODEL_MAP).decode(),
        WORKERS="1",
        LOG_LEVEL="info",
    )
    pid = worker_pid(proxy)
    proxy_port = proxy.port
    upstream_port = int(soak_upstream_url.rsplit(":", 1)[1])
    lines = [
        f"soak: 1 worker (pid {pid}), {CONCURRENCY} concurrent clients, upstream in its own process;"
        f" direct reference answers fetched in {reference_seconds:.1f} s"
    ]
    measured: dict[str, Usage] = {"start": usage(pid, proxy_port, upstream_port)}
    failures: list[str] = []
    for label, batch in batches.items():

        def done(label: str = label) -> None:
            measured[label] = usage(pid, proxy_port, upstream_port)

        answers, seconds = asyncio.run(run_load(proxy.url, batch, before_close=done))
        failures += [f"{label} {problem}" for problem in mismatches(answers, expected[label], batch)]
        measured[f"{label} settled"] = settled(pid, proxy_port, upstream_port)
        streamed = sum(call.stream for call in batch)
        chunks = sum(answer.chunks for answer, call in zip(answers, batch, strict=True) if call.stream)
        lines.append(
            f"  {label}: {len(batch)} requests ({streamed} streamed, {EVENTS + 2} events each, "
            f"{chunks / max(streamed, 1):.1f} chunks read per stream) in {seconds:.2f} s, "
            f"{len(batch) / seconds:.0f} req/s, {sum(len(a.body) for a in answers) / 1e6:.1f} MB relayed; "
            f"right after: {measured[label]}; clients gone: {measured[f'{label} settled']}"
        )
    baseline = measured["warm-up settled"]
    first, second = measured["round 1 settled"], measured["round 2 settled"]
    lines.insert(1, f"  at start: {measured['start']}")
    lines.append(
        f"  RSS vs baseline: round 1 {(first.rss_kb - baseline.rss_kb) / 1024:+.1f} MB, "
        f"round 2 {(second.rss_kb - first.rss_kb) / 1024:+.1f} MB more; fds vs baseline: "
        f"{first.fds - baseline.fds:+d}, {second.fds - baseline.fds:+d}"
    )
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert failures == [], f"{len(failures)} bad answers, the first: {failures[:10]}"
    events = proxy.log_events()
    requests = [event for event in events if event.get("event") == "request"]
    total = sum(len(batch) for batch in batches.values())
    assert len(requests) == total
    assert Counter(event["status"] for event in requests) == {200: total}
    assert Counter(event["stream"] for event in requests) == {True: total // 2, False: total // 2}
    sent = Counter((event["source_model"], event["target_model"]) for event in requests)
    assert set(sent) == set(MODELS.items())
    both_ways = Counter((event["source_model"], event["stream"]) for event in requests)
    assert len(both_ways) == 2 * len(MODELS)
    loud = [event for event in events if event.get("level") not in ("info", "debug")]
    assert loud == []

    for label in ("round 1 settled", "round 2 settled"):
        after = measured[label]
        assert after.clients == 0, (label, after)
        assert after.other <= baseline.other + FD_SLACK, (label, baseline, after)
        assert after.upstream <= CONCURRENCY, (label, after)
        assert after.fds <= baseline.fds - baseline.upstream + after.upstream + FD_SLACK, (label, after)
    assert first.rss_kb <= baseline.rss_kb + RSS_TOLERANCE_KB, (baseline, first)
    assert second.rss_kb <= first.rss_kb + RSS_ROUND2_GROWTH_KB, (first, second)
    assert second.fds <= first.fds + FD_SLACK, (first, second)
    assert proxy.stop() == 0  # and it still shuts down cleanly
