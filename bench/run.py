"""Loopback benchmark of the proxy against the stack's floor, its upstream directly, nginx and
(with ``--peers``) LiteLLM's proxy.

    python -m bench.run            # full run, about 4 minutes
    python -m bench.run --peers    # with LiteLLM (make bench-peers installs it)
    python -m bench.run --quick    # smoke run, about a minute
    make bench                     # installs wrk and nginx-light first, then the full run

Prints one table and writes the numbers to bench/results/<UTC timestamp>.json and
bench/results/latest.json (``--out`` for another folder). bench/README.md explains each number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import nginx, payloads, peers, proc, report

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LUA = BENCH_DIR / "wrk_chat.lua"
PYTHON = sys.executable


@dataclass(frozen=True)
class Profile:
    name: str
    warmup_s: float  # wrk, before each requests/s and latency measurement
    rps_s: float  # wrk at `connections`
    latency_s: float  # wrk at 1 connection
    stream_rps_s: float  # wrk at `connections`, stream=true, canned stream
    connections: int
    streams: int
    events: int  # per stream
    rate: float  # events/s per stream
    ramp_s: float  # the streams open evenly over this time
    idle_streams: int
    warm_hold_s: float  # the streaming warm-up keeps every stream open this long


PROFILES = {
    "full": Profile("full", 2, 10, 5, 4, 32, 500, 100, 20.0, 1.0, 1000, 2.5),
    "quick": Profile("quick", 1, 3, 2, 2, 32, 100, 40, 20.0, 0.5, 200, 1.0),
}

# A peer's streaming numbers count at a load where its p99 delay stays below this.
KEEPS_UP_P99_MS = 500.0
# Outside load (cores) above which the run warns that its numbers are noisy.
NOISY_CORES = 0.25


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, alive: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"process serving {url} exited")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


def stop_process(process: subprocess.Popen[bytes], extra_pids: list[int], sig: int = signal.SIGTERM) -> None:
    """Stop a process we started, then any of its children still there (by their pids)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    for pid in extra_pids:
        proc.kill(pid)


class PyServer:
    """A bench module serving in its own process; it prints ``listening PORT`` when ready."""

    def __init__(self, workdir: Path, module: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", module, "--port", "0", *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(workdir / f"{module}.log", "wb"),  # noqa: SIM115 - lives as long as it
        )
        line = self.process.stdout.readline().decode()  # type: ignore[union-attr]
        if not line.startswith("listening "):
            stop_process(self.process, [])
            raise RuntimeError(f"{module} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.pid = self.process.pid

    def stop(self) -> None:
        stop_process(self.process, [])


def proxy_settings(upstream_port: int, port: int, metrics_dir: Path) -> dict[str, str]:
    """The proxy's configuration in every measurement: the 20-entry map, one worker, JSON logs,
    metrics."""
    return {
        "UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "MODEL_MAP": json.dumps(payloads.MODEL_MAP),
        "WORKERS": "1",
        "LISTEN_HOST": "127.0.0.1",
        "LISTEN_PORT": str(port),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "SHUTDOWN_GRACE": "0",
        "SHUTDOWN_TIMEOUT": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }


class Proxy:
    """The proxy under test: one worker, a realistic configuration, its logs to a file."""

    def __init__(
        self, workdir: Path, name: str, upstream_port: int, source: Path | None = None, **settings: str
    ) -> None:
        """``source``: a folder holding another version's ``service/`` (bench/ab.py)."""
        self.port = free_port()
        self.logs = (workdir / f"{name}.stdout.log", workdir / f"{name}.stderr.log")
        env = {
            **proc.inherited_env(),
            **proxy_settings(upstream_port, self.port, workdir / f"{name}.metrics"),
            **settings,
        }
        self.settings = {key: value for key, value in env.items() if key not in ("PATH", "HOME")}
        command = shutil.which("openai-model-rerouter", path=str(Path(PYTHON).parent))
        argv = [command] if command and source is None else [PYTHON, "-m", "service"]
        if source is not None:
            env["PYTHONPATH"] = str(source)
        self.process = subprocess.Popen(
            argv,
            cwd=source or ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(self.logs[0], "wb"),  # noqa: SIM115 - lives as long as the proxy
            stderr=open(self.logs[1], "wb"),  # noqa: SIM115
        )
        try:
            wait_http(f"http://127.0.0.1:{self.port}/healthz", 120, lambda: self.process.poll() is None)
            self.worker = self._find_worker()
        except Exception:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _find_worker(self) -> int:
        """The worker that serves: Sanic logs ``Worker ready [pid]``; else the newest spawned child."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for path in self.logs:
                match = re.search(r"Worker ready \[(\d+)\]", path.read_text(errors="replace"))
                if match and int(match.group(1)) in proc.children(self.process.pid):
                    return int(match.group(1))
            time.sleep(0.1)
        spawned = [pid for pid in proc.children(self.process.pid) if "spawn_main" in proc.cmdline(pid)]
        if not spawned:
            raise RuntimeError("cannot find the proxy's worker process")
        return spawned[-1]

    def log_summary(self) -> dict[str, int]:
        """Statuses of the request events it logged, to catch a run that measured errors."""
        counts: dict[str, int] = {}
        with open(self.logs[0], "rb") as handle:
            for line in handle:
                match = re.search(rb'"status":(\d+)', line)
                if match:
                    key = match.group(1).decode()
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        stop_process(self.process, proc.descendants(self.process.pid))


@dataclass
class Window:
    """CPU seconds of some processes over a measurement, and what else kept the machine busy."""

    cpu: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    children_cpu_s: float = 0.0  # finished children we waited for (wrk, the stream client)
    other_cores: float = 0.0  # cores busy running processes other than this benchmark's
    irq_cores: float = 0.0  # cores busy in interrupts (loopback networking, partly)
    steal_cores: float = 0.0  # cores the hypervisor gave to other machines


@contextlib.contextmanager
def measure(watch: dict[str, list[int]]) -> Iterator[Window]:
    """CPU of each named group of pids across the block; other processes' load on the machine."""
    window = Window()
    me = os.getpid()

    def ours() -> dict[int, float]:
        return {pid: proc.cpu_seconds(pid) for pid in [me, *proc.descendants(me)]}

    def children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    before = {name: sum(proc.cpu_seconds(pid) for pid in pids) for name, pids in watch.items()}
    ours0, children0, machine0, wall0 = ours(), children(), proc.machine_cpu_seconds(), time.monotonic()
    yield window
    window.wall_s = time.monotonic() - wall0
    machine1 = proc.machine_cpu_seconds()
    window.children_cpu_s = children() - children0
    ours1 = ours()
    own = sum(ours1[pid] - ours0[pid] for pid in ours1 if pid in ours0) + window.children_cpu_s
    wall = window.wall_s or 1.0
    window.other_cores = max(0.0, machine1["tasks"] - machine0["tasks"] - own) / wall
    window.irq_cores = (machine1["irq"] - machine0["irq"]) / wall
    window.steal_cores = (machine1["steal"] - machine0["steal"]) / wall
    for name, pids in watch.items():
        window.cpu[name] = sum(proc.cpu_seconds(pid) for pid in pids) - before[name]


@contextlib.contextmanager
def py_spy(out_dir: Path | None, name: str, pids: list[int], seconds: float) -> Iterator[None]:
    """With ``--py-spy DIR``: the proxy worker's sampled stacks while the block runs."""
    if out_dir is None or not pids:
        yield
        return
    binary = shutil.which("py-spy", path=f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if binary is None:
        log("py-spy not found (pip install py-spy): not profiling")
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "record",
        "--pid",
        str(pids[0]),
        "--duration",
        f"{max(1, int(seconds))}",
        "--rate",
        "200",
    ]
    # Collapsed stacks: self time per function with a one-line awk, a flame graph with
    # speedscope.app or inferno-flamegraph.
    command += ["--nonblocking", "--format", "raw", "-o", str(out_dir / f"{name}.txt")]
    spy = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield
    finally:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def run_wrk(url: str, connections: int, seconds: float, body_file: Path, path: str) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_PATH": path}
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(LUA), url]
    done = subprocess.run(command, env=env, capture_output=True, timeout=seconds + 60, check=False)
    out = done.stdout.decode(errors="replace")
    match = re.search(r"^BENCH_JSON (.*)$", out, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({done.returncode}): {out[-500:]} {done.stderr.decode()[-500:]}")
    result = json.loads(match.group(1))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["error_count"] = sum(result["errors"].values())
    return result


def run_stream_client(
    url: str,
    profile: Profile,
    *,
    streams: int,
    events: int,
    think: bool = False,
    ramp: float | None = None,
    rate: float | None = None,
    fingerprint: bool = False,
) -> dict[str, Any]:
    rate = profile.rate if rate is None else rate
    ramp = profile.ramp_s if ramp is None else ramp
    timeout = ramp + events / rate + 60
    command = [
        PYTHON,
        "-m",
        "bench.stream_client",
        "--url",
        url,
        "--streams",
        str(streams),
        "--events",
        str(events),
        "--rate",
        f"{rate:g}",
        "--ramp",
        f"{ramp:g}",
        "--timeout",
        f"{timeout - 30:g}",
    ]
    if think:
        command.append("--think")
    if fingerprint:
        command.append("--fingerprint")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=timeout, check=False)
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"stream client failed ({done.returncode}): {done.stderr.decode()[-1000:]}")
    return json.loads(lines[-1])


def hold_idle_streams(url: str, streams: int, pids: list[int]) -> dict[str, Any]:
    """RSS of ``pids`` before and with ``streams`` idle open streams (first event received)."""
    rss_before = sum(proc.rss_kib(pid) for pid in pids)
    client = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "bench.stream_client",
            "--url",
            url,
            "--streams",
            str(streams),
            "--idle",
            "--hold",
            "--ramp",
            "2",
            "--timeout",
            "30",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready_line = client.stdout.readline().decode()  # type: ignore[union-attr]
        ready = json.loads(ready_line) if ready_line.startswith("{") else {}
        time.sleep(1.0)  # let the servers settle (buffers, allocator)
        rss_with = sum(proc.rss_kib(pid) for pid in pids)
        _out, err = client.communicate(b"\n", timeout=60)
        if client.returncode != 0:
            log(f"idle stream client failed: {err.decode(errors='replace')[-500:]}")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    held = ready.get("ready", 0)
    return {
        "streams": streams,
        "held": held,
        "failed": ready.get("failed"),
        "errors": ready.get("errors"),
        "rss_before_kib": rss_before,
        "rss_with_streams_kib": rss_with,
        "kib_per_stream": (rss_with - rss_before) / held if held else None,
    }


# --- the three parts ------------------------------------------------------------------------------


def proxy_overhead(url: str) -> dict[str, float] | None:
    """The proxy's own time per request as its rerouter_proxy_overhead_seconds histogram saw it
    (every endpoint together): count, mean, and p50/p99 interpolated within buckets as
    Prometheus' histogram_quantile does."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        page = answer.read().decode()
    buckets: dict[float, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "rerouter_proxy_overhead_seconds_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == "rerouter_proxy_overhead_seconds_sum":
                total += sample.value
            elif sample.name == "rerouter_proxy_overhead_seconds_count":
                count += sample.value
    if not count:
        return None

    def quantile(q: float) -> float:
        lower, below = 0.0, 0.0
        bounds = sorted(buckets.items())
        for upper, seen in bounds:
            if seen >= q * count:
                if upper == float("inf"):
                    return bounds[-2][0]
                return lower + (upper - lower) * (q * count - below) / max(seen - below, 1e-9)
            lower, below = upper, seen
        return lower

    return {
        "count": count,
        "mean_us": total / count * 1e6,
        "p50_us": quantile(0.5) * 1e6,
        "p99_us": quantile(0.99) * 1e6,
    }


def bench_nonstream(
    profile: Profile,
    targets: dict[str, tuple[str, list[int]]],
    body_file: Path,
    stream_body_file: Path,
    repeat: int = 1,
    spy: Path | None = None,
) -> dict[str, Any]:
    """requests/s at N connections, latency at 1, server CPU per request; stream=true canned.

    The requests/s and latency runs go in ``repeat`` rounds, each round every target in turn,
    so that outside load (other tenants, the hypervisor) hits all alike; each number is the
    median of its rounds. A ratio of two targets measured one after the other moved between
    1.2 and 2.1 from run to run on a shared 2-core machine."""
    path = "/v1/chat/completions"
    for name, (url, _) in targets.items():
        log(f"non-streaming: warming up {name} ({url})")
        run_wrk(url, profile.connections, profile.warmup_s, body_file, path)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for round_ in range(repeat):
        for name, (url, pids) in targets.items():
            log(f"non-streaming: {name}, round {round_ + 1} of {repeat}")
            spied = py_spy(
                spy if round_ == 0 else None,
                f"nonstream-{name}",
                pids if name == "proxy" else [],
                profile.rps_s - 1,
            )
            with spied, measure({"server": pids}) as window:
                rps = run_wrk(url, profile.connections, profile.rps_s, body_file, path)
            latency = run_wrk(url, 1, profile.latency_s, body_file, path)
            rounds[name].append(
                {
                    "rps": rps["rps"],
                    "server_cpu_us_per_request": window.cpu["server"] / rps["requests"] * 1e6
                    if rps["requests"]
                    else None,
                    "wrk_cpu_s": window.children_cpu_s,
                    "other_cores": window.other_cores,
                    "irq_cores": window.irq_cores,
                    "steal_cores": window.steal_cores,
                    "latency_p50_us": latency["latency_us"]["p50"],
                    "latency_p90_us": latency["latency_us"]["p90"],
                    "latency_p99_us": latency["latency_us"]["p99"],
                    "latency_requests": latency["requests"],
                    "errors": rps["error_count"] + latency["error_count"],
                    "wrk": {"rps": rps, "latency": latency},
                }
            )
    results: dict[str, Any] = {}
    for name, (url, pids) in targets.items():
        result = merge_runs(rounds[name])
        result["errors"] = sum(each["errors"] for each in rounds[name])
        # Before the stream=true run: the histogram then holds non-streamed requests only.
        result["overhead_histogram"] = proxy_overhead(url) if name == "proxy" else None
        stream_path = "/v1/chat/completions?stream=1&rate=0&events=20"
        streamed = {"rps": None, "requests": 0, "error_count": 0}
        stream_window = Window(cpu={"server": 0.0})
        if name != "litellm":  # it does not forward the query string that asks for the canned stream
            log(f"non-streaming: {name}, stream=true")
            with measure({"server": pids}) as stream_window:
                streamed = run_wrk(
                    url, profile.connections, profile.stream_rps_s, stream_body_file, stream_path
                )
        result["stream_rps"] = streamed["rps"]
        result["stream_server_cpu_us_per_request"] = (
            stream_window.cpu["server"] / streamed["requests"] * 1e6 if streamed["requests"] else None
        )
        result["errors"] += streamed["error_count"]
        result["wrk"] = {**result["wrk"], "stream": streamed}
        results[name] = result
    return results


def bench_streams(
    profile: Profile,
    name: str,
    url: str,
    pids: list[int],
    upstream_pid: int,
    *,
    think: bool = False,
    round_: int = 0,
    spy: Path | None = None,
    fingerprint: bool = False,
) -> dict[str, Any]:
    """Paced streams: warm the connection pools, then measure delay and CPU per event."""
    log(
        f"streaming: {name} ({profile.streams} streams x {profile.events} events @ {profile.rate:g}/s)"
        f", round {round_ + 1}"
    )
    # Warm-up: every stream open at once for a moment (first event at once, the finish after
    # warm_hold_s), so that both proxies measure with a pool of upstream connections as large as
    # the run needs, as a long-running proxy has.
    warm_rate = 1 / profile.warm_hold_s
    run_stream_client(
        url,
        profile,
        streams=profile.streams,
        events=2,
        think=think,
        ramp=0.3,
        rate=warm_rate,
        fingerprint=fingerprint,
    )
    watch = {"server": pids, "upstream": [upstream_pid]}
    spied = py_spy(
        spy if round_ == 0 and name.startswith("proxy") else None,
        f"stream-{name}",
        pids,
        profile.ramp_s + profile.events / profile.rate,
    )
    with spied, measure(watch) as window:
        result = run_stream_client(
            url, profile, streams=profile.streams, events=profile.events, think=think, fingerprint=fingerprint
        )
    sent = result["completed"] * profile.events
    per_k = 1000 / sent if sent else float("nan")
    result.update(
        {
            "events_sent": sent,
            "server_cpu_s": window.cpu["server"],
            "server_cpu_s_per_1k_events": window.cpu["server"] * per_k if pids else None,
            "upstream_cpu_s_per_1k_events": window.cpu["upstream"] * per_k,
            "other_cores": window.other_cores,
            "irq_cores": window.irq_cores,
            "steal_cores": window.steal_cores,
            "window_s": window.wall_s,
        }
    )
    if result["failed"] or result.get("timed_out"):
        log(f"  {name}: {result['failed']} streams failed {result['errors']}")
    return result


def bench_peer_streams(profile: Profile, url: str, pids: list[int], upstream_pid: int) -> dict[str, Any]:
    """A peer at the full streaming load, then at a fifth and a 25th of the streams, until one
    load it keeps up with: every stream completes, every event arrives, p99 delay at most
    ``KEEPS_UP_P99_MS`` (beyond that the numbers measure its backlog). Each try is kept."""
    tries: list[dict[str, Any]] = []
    for streams in (profile.streams, max(1, profile.streams // 5), max(1, profile.streams // 25)):
        load = replace(profile, streams=streams)
        try:
            result = bench_streams(load, "litellm", url, pids, upstream_pid, fingerprint=True)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result = {"streams": streams, "failed": streams, "errors": [str(exc)[-300:]]}
        result["events_per_s"] = streams * profile.rate
        tries.append(result)
        p99 = (result.get("delay_us") or {}).get("p99")
        kept_up = (
            not result.get("failed")
            and not result.get("timed_out")
            and result.get("events_seen") == result.get("events_sent")
            and p99 is not None
            and p99 <= KEEPS_UP_P99_MS * 1000
        )
        if kept_up:
            text = f"kept up with {streams} streams = {streams * profile.rate:,.0f} events/s"
            if tries[:-1]:
                text += "; " + "; ".join(_fell_behind(t) for t in tries[:-1])
            return {**result, "load": text, "tries": tries}
    return {"load": "; ".join(_fell_behind(t) for t in tries), "tries": tries}


def _fell_behind(result: dict[str, Any]) -> str:
    p99 = (result.get("delay_us") or {}).get("p99")
    return (
        f"at {result['events_per_s']:,.0f} events/s: "
        f"{result.get('failed', 0)} of {result['streams']} streams failed, "
        f"{result.get('events_seen', 0)}/{result.get('events_sent', 0)} events"
        + (f", p99 delay {p99 / 1000:,.0f} ms" if p99 is not None else "")
        + (", timed out" if result.get("timed_out") else "")
    )


def start_litellm(workdir: Path, name: str, upstream_port: int) -> peers.LiteLLM:
    log(f"starting LiteLLM {peers.LITELLM_VERSION} ({name}); it takes a minute")
    peer = peers.LiteLLM(workdir, name, upstream_port, free_port())
    deadline = time.monotonic() + 240
    while not peer.ready():
        if peer.process.poll() is not None or time.monotonic() > deadline:
            stop_process(peer.process, peer.pids())
            raise RuntimeError(f"LiteLLM did not start: {peer.log_tail()}")
        time.sleep(1)
    return peer


def peer_nonstream(
    workdir: Path, canned_port: int, profile: Profile, body_file: Path, notes: list[str], repeat: int
) -> dict[str, Any]:
    try:
        peer = start_litellm(workdir, "litellm-json", canned_port)
    except RuntimeError as exc:
        notes.append(f"LiteLLM (non-streaming) failed: {str(exc)[-300:]}")
        return {}
    try:
        return bench_nonstream(profile, {"litellm": (peer.url, peer.pids())}, body_file, body_file, repeat)
    except RuntimeError as exc:
        notes.append(f"LiteLLM (non-streaming) failed: {str(exc)[-300:]}")
        return {}
    finally:
        stop_process(peer.process, peer.pids())


def peer_streams(workdir: Path, upstream: PyServer, profile: Profile, notes: list[str]) -> dict[str, Any]:
    try:
        peer = start_litellm(workdir, "litellm-stream", upstream.port)
    except RuntimeError as exc:
        notes.append(f"LiteLLM (streaming) failed: {str(exc)[-300:]}")
        return {}
    try:
        return {"litellm": bench_peer_streams(profile, peer.url, peer.pids(), upstream.pid)}
    finally:
        stop_process(peer.process, peer.pids())


def bench_memory(profile: Profile, name: str, url: str, pids: list[int]) -> dict[str, Any]:
    log(f"memory: {name}, {profile.idle_streams} idle streams")
    run_stream_client(url, profile, streams=20, events=5, ramp=0.2)
    return hold_idle_streams(url, profile.idle_streams, pids)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from repeated runs: the median of every number, the rest from the first run;
    the runs themselves under ``runs``."""
    if len(runs) == 1:
        return runs[0]

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, bool) or first is None:
            return first
        if isinstance(first, int | float) and all(isinstance(v, int | float) for v in values):
            return statistics.median(values)
        if isinstance(first, dict):
            return {key: merge([v.get(key) for v in values if isinstance(v, dict)]) for key in first}
        return first

    merged = merge(runs)
    merged["runs"] = runs
    return merged


# --- orchestration -------------------------------------------------------------------------------


def _version(command: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(command, capture_output=True, timeout=10, check=False)
        text = (done.stdout + done.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else None
    return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--", "service"],
                capture_output=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            return done.stdout.decode().strip() + ("+dirty" if dirty else "")
    return None


def other_load(seconds: float) -> float:
    """Cores kept busy by processes outside this benchmark (or taken by the hypervisor), sampled
    while it runs nothing."""
    with measure({}) as window:
        time.sleep(seconds)
    return window.other_cores + window.steal_cores


def run(
    profile: Profile, parts: set[str], repeat: int, spy: Path | None = None, with_peers: bool = False
) -> dict[str, Any]:
    started = time.monotonic()
    quiet = other_load(2.0)
    if quiet > NOISY_CORES:
        log(f"other processes keep {quiet:.2f} cores busy: expect noisy numbers")
    nginx_bin = nginx.find()
    wrk_bin = shutil.which("wrk")
    notes: list[str] = []
    if nginx_bin is None:
        notes.append("nginx not found: the Python upstream stands in for the canned one; no nginx columns")
    if wrk_bin is None:
        notes.append("wrk not found: no non-streaming numbers (make bench-deps installs it)")
    if "stream" in parts and profile.streams * profile.rate != 10_000:
        notes.append(
            f"the streaming targets are set for 10,000 events/s; this run sent "
            f"{profile.streams * profile.rate:,.0f} events/s"
        )
    # The proxy's default pool (UPSTREAM_MAX_CONNECTIONS=1024) would queue larger runs.
    pool = max(profile.streams, profile.idle_streams)
    extra = {"UPSTREAM_MAX_CONNECTIONS": str(pool + 24)} if pool > 1000 else {}
    results: dict[str, Any] = {
        "meta": {
            "timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "profile": asdict(profile),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nginx": _version([nginx_bin, "-v"]) if nginx_bin else None,
            "wrk": _version([wrk_bin, "-v"]) if wrk_bin else None,
            "commit": _git_commit(),
            "request_bytes": len(payloads.chat_body()),
            "answer_bytes": len(payloads.CANNED_JSON),
            "requested_model": payloads.REQUESTED_MODEL,
            "served_model": payloads.SERVED_MODEL,
            "model_map_entries": len(payloads.MODEL_MAP),
            "stream_repeats": repeat,
            "other_load_before": quiet,
        },
        "notes": notes,
    }
    workdir = Path(tempfile.mkdtemp(prefix="rerouter-bench-"))
    body_file = workdir / "body.json"
    body_file.write_bytes(payloads.chat_body())
    stream_body_file = workdir / "stream-body.json"
    stream_body_file.write_bytes(payloads.chat_body(stream=True))
    stoppers: list[Any] = []
    try:
        upstream = PyServer(workdir, "bench.sse_upstream")
        stoppers.append(upstream.stop)
        canned: nginx.Nginx | None = None
        ref: nginx.Nginx | None = None
        canned_port = upstream.port
        ref_json_port = ref_stream_port = None
        if nginx_bin:
            canned_port = free_port()
            canned = nginx.Nginx(
                nginx_bin,
                workdir / "nginx-canned",
                nginx.canned_config(workdir / "nginx-canned", canned_port),
                [canned_port],
            )
            stoppers.append(canned.stop)
            ref_json_port, ref_stream_port = free_port(), free_port()
            routes = [
                nginx.Route(ref_json_port, canned_port, stream=False),
                nginx.Route(ref_stream_port, upstream.port, stream=True),
            ]
            ref = nginx.Nginx(
                nginx_bin,
                workdir / "nginx-proxy",
                nginx.proxy_config(workdir / "nginx-proxy", routes),
                [ref_json_port, ref_stream_port],
            )
            stoppers.append(ref.stop)

        if "nonstream" in parts and wrk_bin:
            proxy = Proxy(workdir, "proxy-json", canned_port)
            stoppers.append(proxy.stop)
            targets = {
                "direct": (f"http://127.0.0.1:{canned_port}", canned.workers() if canned else [upstream.pid])
            }
            if ref:
                targets["nginx"] = (f"http://127.0.0.1:{ref_json_port}", ref.workers())
            floor = PyServer(workdir, "bench.floor", "--upstream", f"http://127.0.0.1:{canned_port}")
            stoppers.append(floor.stop)
            targets["floor"] = (f"http://127.0.0.1:{floor.port}", [floor.pid])
            targets["proxy"] = (f"http://127.0.0.1:{proxy.port}", [proxy.worker])
            results["nonstream"] = bench_nonstream(profile, targets, body_file, stream_body_file, repeat, spy)
            floor.stop()
            stoppers.remove(floor.stop)
            if with_peers:
                results["nonstream"].update(
                    peer_nonstream(workdir, canned_port, profile, body_file, notes, repeat)
                )
            results["nonstream"]["proxy"]["logged_statuses"] = proxy.log_summary()
            results["proxy_settings"] = {k: v for k, v in proxy.settings.items() if k != "MODEL_MAP"}
            proxy.stop()
            stoppers.remove(proxy.stop)

        if "memory" in parts or "stream" in parts:
            proxy = Proxy(workdir, "proxy-stream", upstream.port, **extra)
            stoppers.append(proxy.stop)
            ref_url = f"http://127.0.0.1:{ref_stream_port}"
            floor = PyServer(workdir, "bench.floor", "--upstream", f"http://127.0.0.1:{upstream.port}")
            stoppers.append(floor.stop)
            floor_url = f"http://127.0.0.1:{floor.port}"
            if "memory" in parts:  # first, while the proxy is fresh: its heap has not grown yet
                results["memory"] = {
                    "proxy": bench_memory(profile, "proxy", proxy.url, [proxy.worker]),
                    "floor": bench_memory(profile, "floor", floor_url, [floor.pid]),
                }
                if ref:
                    results["memory"]["nginx"] = bench_memory(profile, "nginx", ref_url, ref.workers())
            if "stream" in parts:
                strip = Proxy(workdir, "proxy-strip", upstream.port, DISABLE_THINKING="true", **extra)
                stoppers.append(strip.stop)
                subjects: list[tuple[str, str, list[int], bool]] = [
                    ("direct", f"http://127.0.0.1:{upstream.port}", [], False)
                ]
                if ref:
                    subjects.append(("nginx", ref_url, ref.workers(), False))
                subjects += [
                    ("floor", floor_url, [floor.pid], False),
                    ("proxy", proxy.url, [proxy.worker], False),
                    ("proxy_strip", strip.url, [strip.worker], True),
                ]
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in subjects}
                for round_ in range(repeat):  # interleaved, so that outside load hits all alike
                    for name, url, pids, think in subjects:
                        runs[name].append(
                            bench_streams(
                                profile, name, url, pids, upstream.pid, think=think, round_=round_, spy=spy
                            )
                        )
                results["streaming"] = {name: merge_runs(each) for name, each in runs.items()}
                if with_peers:
                    results["streaming"].update(peer_streams(workdir, upstream, profile, notes))
                results["streaming"]["proxy"]["logged_statuses"] = proxy.log_summary()
                results["streaming"]["proxy_strip"]["logged_statuses"] = strip.log_summary()
    finally:
        for stop in reversed(stoppers):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = report.evaluate(results)
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    results["table"] = report.render(results)
    results["targets_table"] = report.targets_table(results["targets"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback benchmark: the proxy vs its upstream vs nginx.")
    parser.add_argument(
        "--quick", action="store_true", help="a ~1-minute smoke run: fewer streams and requests"
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder for the JSON results")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds of each measurement, interleaved across targets; the table shows medians "
        "(default: 3, --quick: 1)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="write py-spy samples (collapsed stacks) of the proxy's worker to DIR (perturbs its numbers)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help=f"also measure LiteLLM's proxy (installed in {peers.VENV.name} by make bench-peers)",
    )
    parser.add_argument("--streams", type=int, help="concurrent paced streams (full: 500)")
    parser.add_argument("--events", type=int, help="events per stream (full: 100)")
    parser.add_argument("--rate", type=float, help="events per second per stream (full: 20)")
    parser.add_argument("--idle-streams", type=int, help="open idle streams for the memory part (full: 1000)")
    parser.add_argument("--seconds", type=float, help="wrk's requests/s run (full: 10)")
    parser.add_argument(
        "--only",
        default="nonstream,stream,memory",
        help="comma-separated parts to run: nonstream, stream, memory (default: all)",
    )
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    overrides = {
        "streams": args.streams,
        "events": args.events,
        "rate": args.rate,
        "idle_streams": args.idle_streams,
        "rps_s": args.seconds,
    }
    for key, value in overrides.items():
        if value is not None and value <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    profile = replace(profile, **{key: value for key, value in overrides.items() if value is not None})
    parts = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = parts - {"nonstream", "stream", "memory"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.peers and peers.litellm_command() is None:
        parser.error(f"--peers: LiteLLM is not installed in {peers.VENV} (make bench-peers installs it)")
    results = run(profile, parts, repeat, args.py_spy, args.peers)
    if args.py_spy:
        results["notes"].append(
            f"profiled with py-spy (collapsed stacks in {args.py_spy}): proxy numbers perturbed"
        )
    meta = results["meta"]
    print()
    print(
        f"openai-model-rerouter benchmark, {profile.name} profile, commit {meta['commit']}, "
        f"{meta['cpus']} CPUs shared by load generator, upstream and proxy; "
        f"load average {meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end"
    )
    if meta["other_load_before"] > NOISY_CORES:
        print(
            f"warning: before the run, other processes kept {meta['other_load_before']:.2f} of "
            f"{meta['cpus']} cores busy; the 'other load' rows show it during each measurement"
        )
    print(results["table"])
    print()
    print(results["targets_table"])
    for note in results["notes"]:
        print(f"note: {note}")
    passed = sum(1 for t in results["targets"] if t["pass"])
    measured = sum(1 for t in results["targets"] if t["pass"] is not None)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = meta["timestamp"].replace(":", "").replace("-", "")
    name = f"{stamp}{'-quick' if args.quick else ''}.json"
    text = json.dumps(results, indent=2, default=str)
    (args.out / name).write_text(text)
    (args.out / "latest.json").write_text(text)
    print(f"targets: {passed} of {measured} pass; {meta['duration_s']:.0f} s; results in {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
