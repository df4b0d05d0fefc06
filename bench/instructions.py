"""Instructions per non-streamed request, floor vs proxy, counted by callgrind: the same
number whatever else the machine runs, so a small cut shows through noise that swamps CPU time.

    python -m bench.instructions                 # both, 300 requests each after a warm-up
    python -m bench.instructions --only proxy --requests 500
    python -m bench.instructions --stream        # per relayed event: floor, proxy, proxy stripping

Each server runs in one process (Sanic ``single_process``) under
``valgrind --tool=callgrind``, against the canned nginx upstream, with the benchmark's settings
(20-entry map, JSON logs to a file, metrics). The client (outside valgrind) sends the bench
request on one keep-alive connection; callgrind's counters are zeroed after the warm-up and
dumped after the measured requests. Needs valgrind (``apt-get install valgrind``).

``--stream`` counts the relay of a streamed event instead, against the benchmark's paced SSE
upstream: the floor and the proxy relaying plain streams, and the proxy taking the think blocks
out of streams that start with one (``DISABLE_THINKING=true``), as ``make bench`` compares them.
Streams are counted twice, short and long, and the difference is divided by the events it adds:
what a stream costs to begin and end cancels out, and what is left is the cost of one more event.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from bench import nginx, payloads, proc
from bench.ab import source_of
from bench.run import PROFILES, PYTHON, ROOT, PyServer, free_port, proxy_settings, run_stream_client

_SERVE_PROXY = """
import os
from service import metrics
from service.app import create_app
from service.config import load_settings
from service.guard import GuardedProtocol
# Callgrind runs the proxy ~18 times slower than it runs natively (36 vs 650 requests/s on one
# connection): the metric flush interval is stretched as much, so that one flush covers as many
# requests as at full speed. (Versions from before the flush have no interval.)
if hasattr(metrics, "FLUSH_SECONDS"):
    metrics.FLUSH_SECONDS *= 18
settings = load_settings(os.environ, [])
app = create_app(settings)
app.run(host=settings.listen_host, port=settings.listen_port, single_process=True, access_log=False,
        motd=False, protocol=GuardedProtocol)
"""


def _post(connection: http.client.HTTPConnection, body: bytes) -> None:
    connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    answer = connection.getresponse()
    answer.read()
    if answer.status != 200:
        raise RuntimeError(f"status {answer.status}")


def _wait(port: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            _post(connection, payloads.chat_body())
            connection.close()
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(1)
    raise RuntimeError(f"port {port} did not answer within {limit:g} s")


def _totals(path: Path) -> int:
    match = re.search(r"^(?:totals|summary): (\d+)", path.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {path}")
    return int(match.group(1))


def _launch(
    name: str, upstream_port: int, port: int, workdir: Path, source: Path | None, settings: dict[str, str]
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    env = proc.inherited_env()
    if source is not None:
        env["PYTHONPATH"] = str(source)
    if name == "floor":
        argv = [
            PYTHON,
            "-m",
            "bench.floor",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--port",
            str(port),
        ]
    else:
        env.update(proxy_settings(upstream_port, port, workdir / f"{name}.metrics"))
        env.update(settings)
        (workdir / f"{name}.metrics").mkdir(exist_ok=True)
        argv = [PYTHON, "-c", _SERVE_PROXY]
    # Not instrumented until the warm-up is over: start-up under full instrumentation takes minutes.
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir / f'callgrind.{name}'}",
        "--dump-instr=no",
        *argv,
    ]
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by _stop
    server = subprocess.Popen(
        command, cwd=source or ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    return server, log


def _stop(server: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    log.close()


def _control(server: subprocess.Popen[bytes], flag: str) -> None:
    subprocess.run(["callgrind_control", flag, str(server.pid)], check=True, capture_output=True)


def _dumped(server: subprocess.Popen[bytes], workdir: Path, name: str) -> int:
    """The instructions counted since the counters were last zeroed."""
    _control(server, "--dump")
    dumps = sorted(workdir.glob(f"callgrind.{name}.*"), key=lambda p: p.stat().st_mtime)
    return _totals(dumps[-1])


def count(
    name: str, upstream_port: int, workdir: Path, requests: int, warmup: int, source: Path | None = None
) -> float:
    port = free_port()
    server, log = _launch(name, upstream_port, port, workdir, source, {})
    try:
        _wait(port, 600)
        body = payloads.chat_body()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(warmup):
            _post(connection, body)
        _control(server, "--instr=on")
        for _ in range(warmup // 4 or 1):  # code seen for the first time since instrumentation
            _post(connection, body)
        _control(server, "--zero")
        began = time.monotonic()
        for _ in range(requests):
            _post(connection, body)
        print(f"{name}: {requests / (time.monotonic() - began):.0f} requests/s under callgrind", flush=True)
        total = _dumped(server, workdir, name)
        connection.close()
        return total / requests
    finally:
        _stop(server, log)


# Under callgrind a worker relays a few hundred events a second: 10 streams of 10 events/s each
# leave it idle most of the time, so that events are read one at a time, as at full speed.
_STREAMS = 10
_RATE = 10.0


def _relay(url: str, events: int, think: bool) -> None:
    result = run_stream_client(
        url, PROFILES["full"], streams=_STREAMS, events=events, think=think, ramp=1.0, rate=_RATE
    )
    # Stripping withholds the think block's events: only plain streams show every one.
    if result["completed"] != _STREAMS or (not think and result["events_seen"] != _STREAMS * events):
        raise RuntimeError(f"streams did not complete: {result}")


def count_stream(
    name: str, upstream_port: int, workdir: Path, events: int, source: Path | None = None
) -> float:
    """Instructions per relayed event: (long streams - short streams) / the events added."""
    think = name == "proxy_strip"
    settings = {"DISABLE_THINKING": "true"} if think else {}
    port = free_port()
    server, log = _launch(name, upstream_port, port, workdir, source, settings)
    url = f"http://127.0.0.1:{port}"
    short = max(events // 5, 2)
    try:
        _wait(port, 600)
        _relay(url, short, think)
        _control(server, "--instr=on")
        _relay(url, short, think)  # code seen for the first time since instrumentation
        counted = []
        for length in (short, events):
            _control(server, "--zero")
            _relay(url, length, think)
            counted.append(_dumped(server, workdir, name))
        return (counted[1] - counted[0]) / (_STREAMS * (events - short))
    finally:
        _stop(server, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--stream", action="store_true", help="instructions per relayed event")
    parser.add_argument("--events", type=int, default=100, help="with --stream: events of a long stream")
    parser.add_argument("--only", choices=("floor", "proxy", "proxy_strip"))
    parser.add_argument("--source", help="the proxy of this commit (default: the work tree)")
    parser.add_argument("--keep", type=Path, help="copy the callgrind files here (callgrind_annotate)")
    args = parser.parse_args()
    binary = nginx.find()
    if shutil.which("valgrind") is None or (binary is None and not args.stream):
        parser.error("needs valgrind, and nginx unless --stream")
    if args.only == "proxy_strip" and not args.stream:
        parser.error("proxy_strip is a streaming measurement: add --stream")
    if args.stream and args.events < 10:
        parser.error("--events: at least 10")
    workdir = Path(tempfile.mkdtemp(prefix="rerouter-cg-"))
    stop: Callable[[], None]
    if args.stream:
        sse = PyServer(workdir, "bench.sse_upstream")
        upstream_port, stop, unit = sse.port, sse.stop, "event"
        names = ["floor", "proxy", "proxy_strip"]
    else:
        assert binary is not None
        upstream_port = free_port()
        canned = nginx.Nginx(
            binary, workdir / "nginx", nginx.canned_config(workdir / "nginx", upstream_port), [upstream_port]
        )
        stop, unit = canned.stop, "request"
        names = ["floor", "proxy"]
    results = {}
    try:
        proxy_source = source_of(args.source, workdir)
        for name in [args.only] if args.only else names:
            source = proxy_source if name != "floor" else None
            if args.stream:
                results[name] = count_stream(name, upstream_port, workdir, args.events, source)
            else:
                results[name] = count(name, upstream_port, workdir, args.requests, args.warmup, source)
            print(f"{name}: {results[name] / 1e3:,.1f} k instructions/{unit}", flush=True)
        for name in names[1:]:
            if name in results and "floor" in results:
                print(f"{name}/floor: {results[name] / results['floor']:.3f}")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in workdir.glob("callgrind.*"):
                shutil.copy(path, args.keep)
    finally:
        stop()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
