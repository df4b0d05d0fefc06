"""Instructions per non-streamed request, floor vs proxy, counted by callgrind: the same
number whatever else the machine runs, so a small cut shows through noise that swamps CPU time.

    python -m bench.instructions                 # both, 300 requests each after a warm-up
    python -m bench.instructions --only proxy --requests 500

Each server runs in one process (Sanic ``single_process``) under
``valgrind --tool=callgrind``, against the canned nginx upstream, with the benchmark's settings
(20-entry map, JSON logs to a file, metrics). The client (outside valgrind) sends the bench
request on one keep-alive connection; callgrind's counters are zeroed after the warm-up and
dumped after the measured requests. Needs valgrind (``apt-get install valgrind``).
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
from pathlib import Path

from bench import nginx, payloads, proc
from bench.ab import source_of
from bench.run import PYTHON, ROOT, free_port, proxy_settings

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


def count(
    name: str, upstream_port: int, workdir: Path, requests: int, warmup: int, source: Path | None = None
) -> float:
    port = free_port()
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
        env.update(proxy_settings(upstream_port, port, workdir / "metrics"))
        (workdir / "metrics").mkdir(exist_ok=True)
        argv = [PYTHON, "-c", _SERVE_PROXY]
    out = workdir / f"callgrind.{name}"
    # Not instrumented until the warm-up is over: start-up under full instrumentation takes minutes.
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        "--dump-instr=no",
        *argv,
    ]
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        command, cwd=source or ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        _wait(port, 600)
        body = payloads.chat_body()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(warmup):
            _post(connection, body)
        control = ["callgrind_control"]
        subprocess.run([*control, "--instr=on", str(server.pid)], check=True, capture_output=True)
        for _ in range(warmup // 4 or 1):  # code seen for the first time since instrumentation
            _post(connection, body)
        subprocess.run([*control, "--zero", str(server.pid)], check=True, capture_output=True)
        began = time.monotonic()
        for _ in range(requests):
            _post(connection, body)
        print(f"{name}: {requests / (time.monotonic() - began):.0f} requests/s under callgrind", flush=True)
        subprocess.run([*control, "--dump", str(server.pid)], check=True, capture_output=True)
        connection.close()
        dumps = sorted(workdir.glob(f"callgrind.{name}.*"), key=lambda p: p.stat().st_mtime)
        return _totals(dumps[-1]) / requests
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--only", choices=("floor", "proxy"))
    parser.add_argument("--source", help="the proxy of this commit (default: the work tree)")
    parser.add_argument("--keep", type=Path, help="copy the callgrind files here (callgrind_annotate)")
    args = parser.parse_args()
    binary = nginx.find()
    if binary is None or shutil.which("valgrind") is None:
        parser.error("needs nginx and valgrind")
    workdir = Path(tempfile.mkdtemp(prefix="rerouter-cg-"))
    upstream_port = free_port()
    canned = nginx.Nginx(
        binary, workdir / "nginx", nginx.canned_config(workdir / "nginx", upstream_port), [upstream_port]
    )
    results = {}
    try:
        for name in [args.only] if args.only else ["floor", "proxy"]:
            source = source_of(args.source, workdir) if name == "proxy" else None
            results[name] = count(name, upstream_port, workdir, args.requests, args.warmup, source)
            print(f"{name}: {results[name] / 1e3:,.0f} k instructions/request", flush=True)
        if len(results) == 2:
            print(f"proxy/floor: {results['proxy'] / results['floor']:.3f}")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in workdir.glob("callgrind.*"):
                shutil.copy(path, args.keep)
    finally:
        canned.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
