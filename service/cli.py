"""The `openai-model-rerouter` command: settings, metrics directory, demo upstream, workers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from sanic import Sanic
from sanic.worker.loader import AppLoader

from service import demo
from service.config import ConfigError, Settings, command_of, load_settings


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
    _prepare_metrics_dir()
    if settings.demo:
        settings = replace(settings, upstream_url=demo.start_in_thread())
        print(
            f"openai-model-rerouter: no UPSTREAM_URL, so serving against the built-in demo "
            f"upstream at {settings.upstream_url}.\n  Try: curl -s http://127.0.0.1:"
            f"{settings.listen_port}/v1/chat/completions -H 'Content-Type: application/json' "
            """-d '{"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "hi"}]}'""",
            file=sys.stderr,
            flush=True,
        )
    serve(settings, args)


def describe(settings: Settings, model: str) -> str:
    """What `resolve` prints: the rule that matched, then each target in the order tried, with
    its backend's URLs and the parameter policy that applies to it."""
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
        params = settings.model_params.rule_for(target.model)
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
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def _reload_marker() -> str:
    """A file the main process touches on SIGHUP; every worker watches it and reloads."""
    handle, path = tempfile.mkstemp(prefix="rerouter-reload-")
    os.close(handle)
    atexit.register(_remove, path)

    def touch(signum: int, frame: object) -> None:
        os.utime(path)

    signal.signal(signal.SIGHUP, touch)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def serve(settings: Settings, argv: Sequence[str] = ()) -> None:
    """Workers rebuild the app from a factory: spawned processes cannot find it by name inside
    a zipapp, and this keeps `python -m service` and the zipapp on one path."""
    from service.app import create_app  # imported only now: it loads prometheus_client
    from service.guard import GuardedProtocol
    from service.reload import Sources

    sources = Sources(dict(os.environ), tuple(argv), _reload_marker())
    loader = AppLoader(factory=partial(create_app, settings, sources))
    app = loader.load()
    app.prepare(
        host=settings.listen_host,
        port=settings.listen_port,
        workers=settings.workers,
        access_log=False,
        motd=False,
        protocol=GuardedProtocol,
    )
    Sanic.serve(primary=app, app_loader=loader)
