"""Interleaved A/B of the non-streaming path: two versions of the proxy, same upstream, same load.

    python -m bench.ab --before 2d653cc                  # a commit, against the work tree
    python -m bench.ab --before 2d653cc --after HEAD --rounds 8 --seconds 4

Each version runs from a ``git archive`` of its ``service/`` (the work tree when ``--after`` is
left out) with this venv, one worker, the benchmark's settings, against the canned nginx
upstream. Rounds alternate A, B, B, A, ... so that outside load hits both alike; each round is
wrk at ``--connections`` for ``--seconds``, and the number is the worker's CPU per request
(from /proc) and requests/s. Prints the median of each and B/A.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from bench import nginx, payloads, proc
from bench.run import ROOT, Proxy, free_port, measure, run_wrk


def source_of(rev: str | None, workdir: Path) -> Path | None:
    """``service/`` of a commit in a folder of its own; None for the work tree."""
    if rev is None:
        return None
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "service", "pyproject.toml"], capture_output=True, check=True
    ).stdout
    target = workdir / f"src-{rev.replace('/', '_')}"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit A")
    parser.add_argument("--after", default=None, help="commit B (default: the work tree)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    nginx_bin = nginx.find()
    if nginx_bin is None or shutil.which("wrk") is None:
        parser.error("needs nginx and wrk (make bench-deps)")
    workdir = Path(tempfile.mkdtemp(prefix="rerouter-ab-"))
    body = workdir / "body.json"
    body.write_bytes(payloads.chat_body())
    stoppers = []
    try:
        port = free_port()
        canned = nginx.Nginx(
            nginx_bin, workdir / "nginx", nginx.canned_config(workdir / "nginx", port), [port]
        )
        stoppers.append(canned.stop)
        sides = {}
        for name, rev in (("A", args.before), ("B", args.after)):
            proxy = Proxy(workdir, f"proxy-{name}", port, source=source_of(rev, workdir))
            stoppers.append(proxy.stop)
            sides[name] = proxy
        path = "/v1/chat/completions"
        for proxy in sides.values():
            run_wrk(proxy.url, args.connections, 2, body, path)
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        rps: dict[str, list[float]] = {"A": [], "B": []}
        order = ["A", "B", "B", "A"]
        for round_ in range(args.rounds * 2):
            name = order[round_ % 4]
            proxy = sides[name]
            with measure({"w": [proxy.worker]}) as window:
                result = run_wrk(proxy.url, args.connections, args.seconds, body, path)
            cpu[name].append(window.cpu["w"] / result["requests"] * 1e6)
            rps[name].append(result["rps"])
        for name in ("A", "B"):
            label = args.before if name == "A" else args.after or "work tree"
            print(
                f"{name} ({label}): CPU {statistics.median(cpu[name]):.1f} us/request "
                f"(runs {', '.join(f'{v:.0f}' for v in cpu[name])}), "
                f"{statistics.median(rps[name]):,.0f} req/s @{args.connections}, "
                f"RSS {proc.rss_kib(sides[name].worker) / 1024:.1f} MiB"
            )
        ratio = statistics.median(cpu["B"]) / statistics.median(cpu["A"])
        print(f"B/A CPU per request: {ratio:.3f}")
    finally:
        for stop in reversed(stoppers):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
