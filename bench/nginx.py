"""nginx for the benchmark: generated configs, run in the foreground from a temporary prefix.

Two roles, each its own nginx (one master, ``worker_processes 1``) so that their CPU is counted
apart:

- ``canned_config``: the cheap upstream, ``return 200 '<json>'`` for every request, or a whole
  event stream (un-paced) when the query string has ``stream=1``;
- ``proxy_config``: a plain reverse proxy, one ``server`` per route, each ``proxy_pass`` to a
  keepalive upstream with ``proxy_http_version 1.1``; ``proxy_buffering off`` where it relays
  streams, as one would configure nginx in front of a model server.

Everything it writes (pid, error log, temp paths) stays under the prefix; ``access_log off``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import payloads, proc

_COMMON_MAIN = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
{user}
events {{
    worker_connections 8192;
    multi_accept on;
}}
"""

_COMMON_HTTP = """\
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server_tokens off;
"""


def find() -> str | None:
    """The nginx binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def quote(text: bytes) -> str:
    """``text`` as a single-quoted nginx string: only ``\\`` and ``'`` need escaping, and ``$``
    (a variable) must not occur."""
    value = text.decode()
    if "$" in value:
        raise ValueError("nginx would read '$' as a variable")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _long_return(text: bytes, indent: str = " " * 12) -> str:
    """``return 200`` of a text longer than one nginx token may be (4 KB): pieces in variables."""
    pieces = [text[start : start + 3000] for start in range(0, len(text), 3000)]
    lines = [f"{indent}set $part{index} {quote(piece)};" for index, piece in enumerate(pieces)]
    joined = "".join(f"$part{index}" for index in range(len(pieces)))
    return "\n".join([*lines, f'{indent}return 200 "{joined}";'])


def _main(prefix: Path) -> str:
    # A master started as root would drop its workers to nobody, who cannot use the prefix.
    user = "user root;" if os.geteuid() == 0 else ""
    return _COMMON_MAIN.format(prefix=prefix, user=user) + "http {\n" + _COMMON_HTTP.format(prefix=prefix)


def canned_config(prefix: Path, port: int, *, sse_events: int = 20) -> str:
    """Every request gets the canned chat completion; ``?stream=1`` the canned event stream."""
    return (
        _main(prefix)
        + f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            if ($arg_stream) {{
                rewrite ^ /_canned_stream last;
            }}
            default_type application/json;
            return 200 {quote(payloads.CANNED_JSON)};
        }}
        location = /_canned_stream {{
            internal;
            default_type text/event-stream;
            add_header Cache-Control no-cache;
{_long_return(payloads.canned_sse(sse_events))}
        }}
    }}
}}
"""
    )


@dataclass(frozen=True)
class Route:
    """``listen`` on this port and pass everything to ``upstream``; ``stream``: unbuffered."""

    listen: int
    upstream: int
    stream: bool


def proxy_config(prefix: Path, routes: list[Route]) -> str:
    parts = [_main(prefix)]
    for index, route in enumerate(routes):
        buffering = "off" if route.stream else "on"
        parts.append(
            f"""\
    upstream backend{index} {{
        server 127.0.0.1:{route.upstream};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{route.listen} backlog=4096;
        location / {{
            proxy_pass http://backend{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering {buffering};
            proxy_read_timeout 600s;
        }}
    }}
"""
        )
    parts.append("}\n")
    return "".join(parts)


class Nginx:
    """One nginx in the foreground (``daemon off``), stopped with SIGQUIT then SIGKILL."""

    def __init__(self, binary: str, prefix: Path, config: str, ports: list[int]) -> None:
        self.prefix = prefix
        self.ports = ports
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(config)
        self.process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(prefix / "stderr.log", "wb"),  # noqa: SIM115 - lives as long as nginx
        )
        try:
            self._wait_ready(10.0)
        except Exception:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log_tail()}")
            if all(_accepts(port) for port in self.ports) and self.workers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not start in {timeout:g} s: {self.log_tail()}")

    def workers(self) -> list[int]:
        """The worker processes (children of the master), whose CPU and memory count."""
        return proc.children(self.pid)

    def log_tail(self) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        workers = self.workers()
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            for pid in workers:  # a killed master leaves its workers running
                proc.kill(pid)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
