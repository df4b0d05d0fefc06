"""Start and stop as real processes: a stop signal at any instant ends the whole process tree
in bounded time, workers die with their main process, and Ctrl-C says what it does."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import StartProxy, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
GRACE, TIMEOUT = 1.0, 2.0
# SHUTDOWN_GRACE + SHUTDOWN_TIMEOUT + "a few seconds", and room for a machine busy with other work.
BOUND = GRACE + TIMEOUT + 12.0


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (the proxy runs in a session of its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def spawn(log: Path, **env: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full.update(
        UPSTREAM_URL="http://127.0.0.1:9",
        LISTEN_HOST="127.0.0.1",
        LISTEN_PORT=str(free_port()),
        WORKERS="2",
        SHUTDOWN_GRACE=str(GRACE),
        SHUTDOWN_TIMEOUT=str(TIMEOUT),
        **env,
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=full,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_and_measure(
    process: subprocess.Popen[bytes], log: Path, when: Callable[[], None], group: bool
) -> str | None:
    """Wait for ``when``, SIGTERM the main process (or, as systemd does, its whole process group)
    and return a failure, or None if the whole tree was gone within BOUND (the process group is
    killed either way)."""
    try:
        when()
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while group_members(process.pid) or process.poll() is None:
            if time.monotonic() - sent > BOUND:
                return (
                    f"still running {BOUND:g}s after SIGTERM: {group_members(process.pid)}\n{log.read_text()}"
                )
            time.sleep(0.05)
        if process.returncode not in (0, -signal.SIGTERM):
            return f"exit code {process.returncode}:\n{log.read_text()}"
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def after_seconds(delay: float) -> Callable[[], None]:
    return lambda: time.sleep(delay)


def after_line(log: Path, marker: bytes, delay: float) -> Callable[[], None]:
    def wait() -> None:
        deadline = time.monotonic() + 60
        while marker not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)

    return wait


# The fixed instants after spawn land anywhere from Python's imports to serving, depending on how
# busy the machine is; the instants after a log line land in Sanic's start-up wait for its
# workers' acknowledgements, where the main process used to hang for good.
INSTANTS: list[tuple[str, float | tuple[bytes, float], bool]] = [
    ("0.1s", 0.1, False),
    ("0.5s", 0.5, False),
    ("1s", 1.0, False),
    ("2s", 2.0, False),
    ("3s", 3.0, False),
    ("first-worker-starting", (b"Starting worker", 0.0), False),
    ("first-worker-starting+0.2s", (b"Starting worker", 0.2), False),
    ("first-worker-ready", (b"Worker ready", 0.0), False),
    ("group-at-first-worker-starting", (b"Starting worker", 0.0), True),
    ("group-at-first-worker-ready+0.5s", (b"Worker ready", 0.5), True),
]


@pytest.mark.timeout(180)
def test_sigterm_at_any_instant_ends_the_whole_process_tree(tmp_path: Path) -> None:
    def attempt(instant: tuple[str, float | tuple[bytes, float], bool]) -> str | None:
        name, when, group = instant
        log = tmp_path / f"{name}.log"
        process = spawn(log)
        wait = after_seconds(when) if isinstance(when, float) else after_line(log, *when)
        failure = stop_and_measure(process, log, wait, group)
        return None if failure is None else f"SIGTERM at {name}: {failure}"

    with ThreadPoolExecutor(4) as pool:
        failures = [failure for failure in pool.map(attempt, INSTANTS) if failure]
    assert failures == []


def worker_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(rb"Starting worker \[(\d+)\]", log.read_bytes())]


def test_workers_die_with_a_sigkilled_main_process(start_proxy: StartProxy) -> None:
    proxy = start_proxy(WORKERS="2")
    workers = worker_pids(proxy.log_path)
    assert len(workers) == 2
    assert all(alive(pid) for pid in workers)
    proxy.process.send_signal(signal.SIGKILL)
    proxy.process.wait()

    def workers_gone() -> None:
        assert [pid for pid in workers if alive(pid)] == []

    try:
        eventually(workers_gone, 10)
    finally:
        for pid in workers:  # if the test failed: no worker left serving
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proxy.process.pid, signal.SIGKILL)  # Sanic's state manager lingers


def test_ctrl_c_says_it_drains_and_a_second_one_stops_at_once(start_proxy: StartProxy) -> None:
    """As a terminal does it: SIGINT to the whole foreground process group, twice."""
    proxy = start_proxy(WORKERS="2", SHUTDOWN_GRACE="30", SHUTDOWN_TIMEOUT="40")
    os.killpg(proxy.process.pid, signal.SIGINT)

    def says_draining() -> None:
        text = proxy.log_path.read_text()
        assert (
            "openai-model-rerouter: draining: /readyz answers 503 for 30 s, then requests in flight "
            "get up to 40 s; press Ctrl-C again to stop at once"
        ) in text

    eventually(says_draining, 10)
    assert proxy.process.poll() is None  # draining, for up to 70 s
    os.killpg(proxy.process.pid, signal.SIGINT)
    stopped = time.monotonic()
    proxy.process.wait(timeout=15)
    assert time.monotonic() - stopped < 15
    assert proxy.process.returncode != 0

    def tree_gone() -> None:
        assert group_members(proxy.process.pid) == []

    eventually(tree_gone, 10)
    assert "stopping at once" in proxy.log_path.read_text()


def test_a_worker_sets_the_garbage_collector_for_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full collections would otherwise walk the worker's ~50,000 start-up objects, and young
    ones come every 700 allocations, each pause stalling every stream of the worker."""
    from service import cli, lifecycle
    from service.config import load_settings
    from service.reload import Sources

    monkeypatch.setattr(lifecycle, "guard_worker", lambda main_pid: None)  # not a real worker
    settings = load_settings({"UPSTREAM_URL": "http://127.0.0.1:9"}, [])
    app = cli._worker_app(settings, Sources({}, ()), os.getpid())
    on_start = [future.listener for future in app._future_listeners if future.event == "after_server_start"]
    assert lifecycle.tune_collector_once_serving in on_start
    frozen, threshold = gc.get_freeze_count(), gc.get_threshold()

    async def serving() -> None:
        lifecycle.tune_collector_once_serving(app)
        assert gc.get_freeze_count() == frozen  # not in the listener: at the loop's next turn
        await asyncio.sleep(0)

    try:
        asyncio.run(serving())
        assert gc.get_freeze_count() > frozen
        assert gc.get_threshold() == (lifecycle.GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
