"""The `openai-model-rerouter` command: settings, metrics directory, demo upstream, workers."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from sanic import Sanic
from sanic.worker.loader import AppLoader

from service import demo
from service.config import ConfigError, Settings, load_settings


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = load_settings(os.environ, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"openai-model-rerouter: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
    serve(settings)


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


def serve(settings: Settings) -> None:
    """Workers rebuild the app from a factory: spawned processes cannot find it by name inside
    a zipapp, and this keeps `python -m service` and the zipapp on one path."""
    from service.app import create_app  # imported only now: it loads prometheus_client

    loader = AppLoader(factory=partial(create_app, settings))
    app = loader.load()
    app.prepare(
        host=settings.listen_host,
        port=settings.listen_port,
        workers=settings.workers,
        access_log=False,
        motd=False,
    )
    Sanic.serve(primary=app, app_loader=loader)
