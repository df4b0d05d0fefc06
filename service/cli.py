"""The `openai-model-rerouter` command: settings, metrics directory, demo upstream, workers."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from sanic import Sanic
from sanic.worker.loader import AppLoader

from service import demo, lifecycle
from service.config import ConfigError, Settings, command_of, load_settings

if TYPE_CHECKING:
    from service.reload import Sources


def main(argv: Sequence[str] | None = None) -> None:
    args = tuple(sys.argv[1:] if argv is None else argv)
    command, model = command_of(args)
    try:
        settings = load_settings(os.environ, args)
    except ConfigError as exc:
        print(f"openai-model-rerouter: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if command == "check":
        named = "; ".join(f"{name} {', '.join(b.urls)}" for name, b in settings.backends.items())
        print(f"openai-model-rerouter: settings are valid (upstreams: {named})")
        return
    if command == "resolve":
        print(describe(settings, model or ""))
        return
    guard = lifecycle.MainGuard(settings)
    try:
        sock = lifecycle.listen(settings.listen_host, settings.listen_port)
        _prepare_metrics_dir()
        if settings.demo:
            settings = replace(settings, upstream_url=demo.start_in_thread())
            print(_demo_banner(settings, sock.getsockname()[1]), file=sys.stderr, flush=True)
        serve(settings, args, sock, guard)
    except lifecycle.Stopped:
        return
    except (OSError, EOFError):
        if not guard.stopping:
            raise
        # Stopping, and the signal also ended Sanic's state manager (a SIGTERM to the whole
        # process group): the workers were stopped already; exit as after any other stop.


def _demo_banner(settings: Settings, port: int) -> str:
    """The hint uses the port really bound (LISTEN_PORT=0 picks one) and an address that answers."""
    host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::") else settings.listen_host
    where = lifecycle.address(host, port)
    return (
        f"openai-model-rerouter: no UPSTREAM_URL, so serving against the built-in demo upstream at "
        f"{settings.upstream_url}.\n  Try: curl -s http://{where}/v1/chat/completions "
        "-H 'Content-Type: application/json' "
        """-d '{"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "hi"}]}'"""
    )


def describe(settings: Settings, model: str) -> str:
    """What `resolve` prints: the rule that matched, then each target in the order tried, with
    its backend's URLs, its thinking and think-block handling (and what decided them), and the
    parameters that apply to it once its route's own are layered over MODEL_PARAMS."""
    resolution = settings.model_map.resolve(model)
    rule = "no rule (passed through)" if resolution.rule is None else f"rule {resolution.rule!r}"
    lines = []
    for position, target in enumerate(resolution.targets):
        urls = ", ".join(settings.backends[target.upstream].urls)
        where = f"upstream {target.upstream}: {urls}"
        if position == 0:
            lines.append(f"{model} -> {target.model}  [{rule}; {where}]")
        else:
            lines.append(f"  then {target.model}  [{where}]")
        lines.append(f"    {settings.thinking.explain(target.model, target.route)}")
        params = settings.model_params.rule_for(target.model, target.route.params)
        if params is not None:
            lines.append(f"    params: {params.describe()}")
    return "\n".join(lines)


def _prepare_metrics_dir() -> None:
    """Multiprocess metrics need one directory shared by all workers, empty at start and set
    before prometheus_client is first imported (workers inherit the variable)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path is None:
        path = tempfile.mkdtemp(prefix="rerouter-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        lifecycle.at_exit(partial(shutil.rmtree, path, ignore_errors=True))
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def _worker_app(settings: Settings, sources: Sources, main_pid: int) -> Sanic:
    lifecycle.guard_worker(main_pid)
    from service.app import create_app  # imported only now: it loads prometheus_client

    app = create_app(settings, sources)
    app.after_server_start(lifecycle.tune_collector_once_serving)
    return app


def serve(settings: Settings, argv: Sequence[str], sock: socket.socket, guard: lifecycle.MainGuard) -> None:
    """Workers rebuild the app from a factory: spawned processes cannot find it by name inside
    a zipapp, and this keeps `python -m service` and the zipapp on one path."""
    from service.app import create_app
    from service.guard import GuardedProtocol
    from service.reload import Sources

    sources = Sources(dict(os.environ), tuple(argv))
    loader = AppLoader(factory=partial(_worker_app, settings, sources, os.getpid()))
    app = create_app(settings, sources)
    app.main_process_ready(guard.attach)
    app.prepare(
        sock=sock,
        workers=settings.workers,
        access_log=False,
        motd=False,
        backlog=lifecycle.LISTEN_BACKLOG,
        protocol=GuardedProtocol,
    )
    Sanic.serve(primary=app, app_loader=loader)
