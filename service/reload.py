"""Re-reading the settings without a restart, in every worker.

Each worker checks ``CONFIG_FILE`` every ``CONFIG_POLL_SECONDS`` (a stat: Kubernetes swaps a
ConfigMap's symlink, which changes it) and reloads at once on SIGHUP. SIGHUP goes to the main
process (PID 1 in a container, systemd's MainPID), which forwards it to every worker
(``service.lifecycle``). A file caught empty is taken for one being written (truncate, then
write): it is applied only if it is still empty at the next check. A reload builds a whole new
Settings the way start-up does and swaps it in with one assignment: a request takes its settings
once, when it starts, so requests in flight finish on the old ones. A file that does not
validate is logged and counted, and the old settings stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, replace

import structlog
from sanic import Sanic

from service import backends, metrics
from service.config import ConfigError, Settings, load_settings
from service.options import RESTART_ONLY

log = structlog.get_logger("rerouter")


@dataclass(frozen=True)
class Sources:
    """Where settings come from, kept so a worker can build them again."""

    environ: Mapping[str, str]
    argv: tuple[str, ...]


def reloaded(current: Settings, sources: Sources) -> tuple[Settings, list[str]]:
    """New settings, with the ones only a restart can change kept; and those that differed."""
    fresh = load_settings(sources.environ, sources.argv)
    if current.api_keys and not fresh.api_keys:
        raise ConfigError("the new settings hold no API key: a restart is needed to turn the key check off")
    ignored = sorted(name for name in RESTART_ONLY if getattr(fresh, name) != getattr(current, name))
    frozen = set(RESTART_ONLY) | ({"upstream_url"} if current.demo else set())
    return replace(fresh, **{name: getattr(current, name) for name in frozen}), ignored


def _signature(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def is_blank(path: str | None) -> bool:
    """True for an existing file holding nothing but white space."""
    if path is None:
        return False
    try:
        with open(path, "rb") as handle:
            return not handle.read(65536).strip() and not handle.read(1)
    except OSError:
        return False


def apply(app: Sanic, sources: Sources) -> None:
    current: Settings = app.ctx.settings
    try:
        fresh, ignored = reloaded(current, sources)
    except Exception as exc:  # the watcher must outlive any bad file; ConfigError is the usual case
        metrics.CONFIG_RELOADS.labels("error").inc()
        reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        log.error("config reload rejected, keeping the running settings", error=reason)
        return
    app.ctx.settings = fresh
    app.config.RESPONSE_TIMEOUT = fresh.response_timeout
    app.ctx.labels.known = fresh.model_map.known_ids()
    app.ctx.replicas = backends.pools(fresh.backends, fresh.upstream_cooldown, app.ctx.replicas)
    metrics.CONFIG_RELOADS.labels("success").inc()
    if ignored:
        log.warning("config reloaded; these changes need a restart", settings=ignored)
    else:
        log.info("config reloaded")


async def watch(app: Sanic, sources: Sources) -> None:
    """The worker's reload loop; runs until the server stops and cancels it. That cancel is its
    normal end: Sanic would log each task it cancels as a warning, on every shutdown."""
    try:
        await _watch(app, sources)
    except asyncio.CancelledError:
        if not app.ctx.draining:
            raise


async def _watch(app: Sanic, sources: Sources) -> None:
    wake = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, wake.set)
    path = app.ctx.settings.config_file
    last = _signature(path)
    held = False  # the file was blank at the last check and has not been applied
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), app.ctx.settings.config_poll_seconds)
        now = _signature(path)
        if wake.is_set() or now != last or held:
            changed = now != last
            wake.clear()
            last = now
            if is_blank(path) and (changed or not held):
                held = True
                log.info("config file is empty; keeping the running settings unless it stays empty")
                continue
            held = False
            apply(app, sources)
