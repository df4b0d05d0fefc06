"""Memory under two bounded loopback attacks, for the security docs (issue 11, items 3 and 11).

    python -m bench.hostile_memory ids [SOURCE_DIR]   # 100 requests with distinct 100 KB model ids
    python -m bench.hostile_memory sse [SOURCE_DIR]   # one 64 MiB event in a filtered stream

The proxy runs as ``python -m service`` from SOURCE_DIR (default: this checkout), so an older
tree (``git archive <commit> | tar -x -C /tmp/old``) can be measured the same way. Prints one
JSON line: the worker's RSS before and after (or its peak), and for ``ids`` the size of the
metrics directory, of the ``/metrics`` page and of the largest ``x-rerouter-target-model``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from aiohttp import web

from bench import proc
from bench.run import free_port, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent
IDS = 100
ID_BYTES = 100_000
EVENT_MIB = 64


def _worker(main: int) -> int:
    """The Sanic worker: the largest child of the main process."""
    return max(proc.children(main), key=proc.rss_kib)


def _mib(size: float) -> float:
    return round(size / 2**20, 2)


@contextmanager
def _proxy(source: Path, **env: str) -> Iterator[tuple[str, int, Path]]:
    """(url, worker pid, metrics directory) of a proxy started from ``source``."""
    port = free_port()
    metrics_dir = Path(tempfile.mkdtemp(prefix="hostile-metrics-"))
    settings = {"LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "SHUTDOWN_GRACE": "0"}
    full = {**os.environ, **settings, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **env}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=source, env=full, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/healthz", 60, lambda: process.poll() is None)
            time.sleep(1.5)  # the worker settles
            yield url, _worker(process.pid), metrics_dir
        finally:
            stop_process(process, [])
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(app: web.Application) -> str:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _answer(request: web.Request) -> web.StreamResponse:
    """A chat answer naming the model asked for; a stream is one event of EVENT_MIB MiB."""
    body = await request.json()
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        return web.json_response({"object": "chat.completion", "model": body["model"], "choices": [choice]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"')
    piece = b"x" * 65536
    for _ in range(EVENT_MIB * 16):
        await response.write(piece)
    await response.write(b'"}}]}\n\ndata: [DONE]\n\n')
    return response


def _upstream() -> str:
    app = web.Application(client_max_size=2**30)
    app.router.add_post("/v1/chat/completions", _answer)
    return _serve(app)


def long_ids(source: Path) -> dict[str, object]:
    with _proxy(source, UPSTREAM_URL=_upstream(), MODEL_MAP="{}") as (url, worker, metrics_dir):
        before = proc.rss_kib(worker)
        statuses: dict[int, int] = {}
        header = 0
        with httpx.Client(timeout=60) as client:
            for index in range(IDS):
                model = f"m{index}-" + "x" * ID_BYTES
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                answer = client.post(url + "/v1/chat/completions", json=body)
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                header = max(header, len(answer.headers.get("x-rerouter-target-model", "")))
            time.sleep(1)  # the last request's metrics are written after its answer
            page = client.get(url + "/metrics")
        return {
            "attack": f"{IDS} requests, distinct {ID_BYTES // 1000} KB model ids",
            "statuses": statuses,
            "worker_rss_mib_before": _mib(before * 1024),
            "worker_rss_mib_after": _mib(proc.rss_kib(worker) * 1024),
            "metrics_dir_mib": _mib(sum(f.stat().st_size for f in metrics_dir.rglob("*") if f.is_file())),
            "metrics_status": page.status_code,
            "metrics_page_mib": _mib(len(page.content)),
            "largest_target_header_bytes": header,
        }


def huge_event(source: Path) -> dict[str, object]:
    env = {"MODEL_MAP": '{"gpt-4o": "m"}', "DISABLE_THINKING": "true", "RESPONSE_MODEL": "requested"}
    with _proxy(source, UPSTREAM_URL=_upstream(), **env) as (url, worker, _):
        before = proc.rss_kib(worker)
        started = time.monotonic()
        relayed = 0
        body = {"model": "gpt-4o", "messages": [], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as answer:
            for chunk in answer.iter_bytes():
                relayed += len(chunk)
        return {
            "attack": f"one {EVENT_MIB} MiB stream event, think stripping and renaming on",
            "status": answer.status_code,
            "relayed_mib": _mib(relayed),
            "seconds": round(time.monotonic() - started, 1),
            "worker_rss_mib_before": _mib(before * 1024),
            "worker_peak_rss_mib": _mib(proc.rss_kib(worker, "VmHWM") * 1024),
        }


def main() -> None:
    attack = sys.argv[1] if len(sys.argv) > 1 else "ids"
    source = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else ROOT
    run = {"ids": long_ids, "sse": huge_event}[attack]
    print(json.dumps({"source": str(source), **run(source)}))


if __name__ == "__main__":
    main()
