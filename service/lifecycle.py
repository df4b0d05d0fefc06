"""Start and stop: the listening socket, signals in the main process, workers tied to it.

Sanic 25.12's main process waits for every worker to acknowledge its start-up before it looks
at a stop request, and a SIGTERM in that window makes it wait for good (the workers it stops
never acknowledge). A SIGKILLed main process leaves its workers serving. So:

- The main process handles SIGTERM and SIGINT itself. Its handler only records the signal
  (Sanic's worker state lives in a manager process, and a signal handler must not talk to it
  while the interrupted code may be doing so); a thread does the rest. Once every worker has
  acknowledged, it hands over to Sanic's own graceful shutdown. Before that, it stops the
  workers with SIGTERM, waits for them to exit and then releases Sanic's wait. Either way a
  watchdog kills whatever still runs SHUTDOWN_GRACE + SHUTDOWN_TIMEOUT + KILL_AFTER seconds
  after the signal. A second signal stops everything at once.
- Each worker asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and exits
  quietly on SIGTERM or SIGINT until Sanic installs its own graceful handlers.
- SIGHUP to the main process is forwarded to the workers that finished starting, so a reload
  happens in every worker at once.
- Each worker, once serving, sets the garbage collector for serving (``tune_collector``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sanic import Sanic
from sanic.server.socket import bind_socket

from service.config import Settings

KILL_AFTER = 5.0  # seconds past SHUTDOWN_GRACE + SHUTDOWN_TIMEOUT before the watchdog kills
PR_SET_PDEATHSIG = 1
_cleanups: list[Callable[[], None]] = []


class Stopped(BaseException):
    """A stop signal that came before any worker was started: unwinds start-up quietly."""


def at_exit(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` at exit, also when a second signal or the watchdog ends the process."""
    _cleanups.append(cleanup)
    atexit.register(cleanup)


# Connections the kernel may queue before a worker accepts them. Sanic's default, 100, overflows
# when hundreds of clients open streams at once (they then see resets); nginx uses 511. The
# kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def listen(host: str, port: int) -> socket.socket:
    """Bind in the main process, before anything is printed: workers inherit the socket, and
    the banner can name the port really bound (LISTEN_PORT=0 picks a free one)."""
    try:
        return bind_socket(host, port, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"openai-model-rerouter: cannot listen on {address(host, port)}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None


def address(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _kill_now(code: int) -> None:
    """Every child (workers, Sanic's state manager) SIGKILLed, our clean-ups run, exit."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid or 0, signal.SIGKILL)
    for cleanup in _cleanups:
        with contextlib.suppress(Exception):
            cleanup()
    os._exit(code)


class _QuietEarlyStop(logging.Filter):
    """Sanic logs any exception leaving its serve loop as an error; an early stop is not one."""

    def __init__(self, guard: MainGuard) -> None:
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.guard.stopping and record.getMessage().startswith("Experienced exception"))


class MainGuard:
    """The main process's stop and reload signals; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.limit = settings.shutdown_grace + settings.shutdown_timeout + KILL_AFTER
        self.grace = settings.shutdown_grace
        self.timeout = settings.shutdown_timeout
        self.stopping = False
        self.manager: Any = None
        self._signum = signal.SIGTERM
        self._wake = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hangup)
        logging.getLogger("sanic.error").addFilter(_QuietEarlyStop(self))

    def attach(self, app: Sanic) -> None:
        """Sanic's main_process_ready: its manager exists and has installed its handlers, and
        no worker has started yet. Take the signals back."""
        self.manager = app.manager
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        threading.Thread(target=self._stop_when_asked, name="rerouter-stop", daemon=True).start()

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            print("openai-model-rerouter: stopping at once", file=sys.stderr, flush=True)
            _kill_now(128 + signum)
        self.stopping = True
        self._signum = signal.Signals(signum)
        if self.manager is None:  # nothing serves yet: nothing to drain
            raise Stopped
        if signum == signal.SIGINT:
            print(
                f"openai-model-rerouter: draining: /readyz answers 503 for {self.grace:g} s, then "
                f"requests in flight get up to {self.timeout:g} s; press Ctrl-C again to stop at once",
                file=sys.stderr,
                flush=True,
            )
        self._wake.set()

    def _on_hangup(self, signum: int, frame: object) -> None:
        """Forward to each worker that finished starting (one still starting has not set up
        its own handler, and SIGHUP's default action would end it)."""
        manager = self.manager
        if manager is None:
            return
        threading.Thread(target=self._forward_hangup, args=(manager,), daemon=True).start()

    @staticmethod
    def _forward_hangup(manager: Any) -> None:
        for process in list(manager.processes):
            with contextlib.suppress(Exception):
                if manager.worker_state[process.name].get("state") == "ACKED" and process.is_alive():
                    os.kill(process.pid, signal.SIGHUP)

    def _stop_when_asked(self) -> None:
        self._wake.wait()
        watchdog = threading.Timer(self.limit, _kill_now, args=(1,))
        watchdog.daemon = True
        watchdog.start()
        manager = self.manager
        with contextlib.suppress(OSError, EOFError):  # the state manager may be gone (see below)
            if manager._all_workers_ack():  # Sanic's own test for leaving its start-up wait
                manager.shutdown_signal(self._signum, None)
                return
        # A worker that acknowledged serves: SIGTERM lets it drain. One still starting serves
        # nothing, and a SIGTERM in the moment after Sanic took its signals can fail its start-up,
        # which makes Sanic exit 1: it is killed instead.
        processes = list(manager.processes)
        for process in processes:
            with contextlib.suppress(OSError, EOFError):
                acked = manager.worker_state[process.name].get("state") == "ACKED"
                os.kill(process.pid, signal.SIGTERM if acked else signal.SIGKILL)
        deadline = time.monotonic() + self.limit
        while any(process.is_alive() for process in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The workers are gone: end Sanic's wait for their acknowledgements, then let it finish
        # its own shutdown (join, clean-up) as after any other stop. A SIGTERM sent to the whole
        # process group (systemd's default) has also ended Sanic's state manager: then the main
        # thread fails on its next look at the state, and main() takes that as the stop.
        with contextlib.suppress(OSError, EOFError):
            for process in processes:
                state = manager.worker_state[process.name]
                manager.worker_state[process.name] = {**state, "state": "ACKED"}
            manager.shutdown_signal(self._signum, None)


# Container objects allocated, net, before a young collection (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_collector() -> None:
    """The garbage collector set for serving.

    - Start-up objects (modules, the app and its routes, the session: ~50,000) live as long as
      the worker, yet each full collection walked them again, pausing every request and stream
      of the worker for ~30 ms: they are frozen out of its reach.
    - A young collection came every 700 allocations: at 10,000 events/s, many times a second,
      each promoting the streams' objects of the moment (a pending read, its coroutine) to an
      older generation, whose collections then took 3-8 ms. Every 10,000 allocations instead.
    Measured at 10,000 events/s over 500 streams, the p99 delay of a relayed event went from
    5-25 ms to about 4 ms. Only cyclic garbage waits longer; reference counting frees the rest.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def tune_collector_once_serving(app: Sanic) -> None:
    """Sanic's after_server_start: ``tune_collector`` at the loop's next turn, once the worker
    serves. Run in the listener itself, its tens of milliseconds were a window in which a
    SIGTERM stopped the loop before start-up completed, and the worker exited with an error."""
    asyncio.get_running_loop().call_soon(tune_collector)


def guard_worker(main_pid: int) -> None:
    """First thing in a worker: die with the main process, stop quietly until Sanic's graceful
    handlers are installed, and ignore SIGHUP until the reload watcher takes it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != main_pid:  # the main process died before prctl took effect
        os._exit(0)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_quietly)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)
