"""The configuration file, reloaded without a restart: in every worker, on change and on SIGHUP.

One proxy with WORKERS=2 and CONFIG_POLL_SECONDS=0.2 serves the end-to-end tests; each test
writes the whole file it needs (atomically, as Kubernetes swaps a ConfigMap) and polls the
proxy, with a bounded deadline, until the change shows. Requests go over a fresh connection
each, so they land on either worker. The unit tests at the end drive service.reload in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from service import reload
from service.backends import pools
from service.config import ConfigError, Settings, load_settings
from service.metrics import ModelLabels
from service.options import RESTART_ONLY
from tests.conftest import Proxy, StartProxy, eventually
from tests.fake_upstream import FakeUpstream

KEY_A = "sk-reload-key-a"
KEY_B = "sk-reload-key-b"
DEADLINE = 10.0
FLIGHT_EVENTS = 30  # slow-stream-30: 1.5 s


def write_atomically(path: Path, text: str) -> None:
    """Write beside, then rename over: a reader sees the old file or the new one, never half."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_text(text)
    os.replace(temporary, path)


def yaml_config(target: str, *extra: str) -> str:
    """A ConfigMap-style file: the upstream_url in it loses to the environment's."""
    return "\n".join(
        [
            "# openai-model-rerouter settings",
            "upstream_url: http://127.0.0.1:9/v1  # the environment's UPSTREAM_URL wins",
            "model_map:",
            f"  gpt-reload: {target}",
            f"  gpt-flight: slow-stream-{FLIGHT_EVENTS}",
            "  /gpt-4.*/: echo-model",
            "request_timeout: 30",
            *extra,
            "",
        ]
    )


# --- the proxy --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("reload")
    return SimpleNamespace(config=folder / "config.yaml", keys=folder / "keys")


@pytest.fixture(scope="module")
def own() -> FakeUpstream:
    server = FakeUpstream()
    server.start()
    return server


@pytest.fixture(scope="module")
def reloading(start_proxy: StartProxy, own: FakeUpstream, files: SimpleNamespace) -> Iterator[Proxy]:
    write_atomically(files.config, yaml_config("echo-model"))
    write_atomically(files.keys, KEY_A + "\n")
    proxy = start_proxy(
        UPSTREAM_URL=own.url,
        MODEL_MAP=None,  # the map comes from the file
        WORKERS="2",
        CONFIG_FILE=str(files.config),
        CONFIG_POLL_SECONDS="0.2",
        PROXY_API_KEYS_FILE=str(files.keys),
    )
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def fresh() -> Iterator[httpx.Client]:
    """A new connection per request, so requests spread over both workers."""
    with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


def served(client: httpx.Client, proxy: Proxy, model: str = "gpt-reload", key: str = KEY_A) -> str:
    response = client.post(
        f"{proxy.v1}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["model"])


def reloads(client: httpx.Client, proxy: Proxy, result: str) -> float:
    text = client.get(f"{proxy.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rerouter_config_reload_total" and sample.labels.get("result") == result
    )


def events(proxy: Proxy, name: str) -> list[dict[str, Any]]:
    return [event for event in proxy.log_events() if event.get("event") == name]


def all_serve(client: httpx.Client, proxy: Proxy, target: str, times: int = 12) -> None:
    """``times`` requests over fresh connections, every one mapped to ``target``."""
    seen = [served(client, proxy) for _ in range(times)]
    assert set(seen) == {target}


def change_and_wait(
    client: httpx.Client, proxy: Proxy, path: Path, text: str, target: str | None = None
) -> None:
    """Write the file; wait until both workers counted a successful reload (and, given a
    target, until the new mapping answers)."""
    before = reloads(client, proxy, "success")
    write_atomically(path, text)

    def both_reloaded() -> None:
        assert reloads(client, proxy, "success") >= before + 2

    eventually(both_reloaded, DEADLINE)
    if target is not None:
        all_serve(client, proxy, target)


# --- start-up ----------------------------------------------------------------------------------------


def test_the_file_configures_the_proxy_and_the_environment_wins(
    reloading: Proxy, fresh: httpx.Client, own: FakeUpstream
) -> None:
    """model_map comes from the file (no MODEL_MAP in the environment); the file's
    upstream_url (a closed port) loses to UPSTREAM_URL, so requests still reach ``own``."""
    before = len(own.requests)
    all_serve(fresh, reloading, "echo-model", times=4)
    assert served(fresh, reloading, "gpt-4o") == "echo-model"
    assert len(own.requests) == before + 5


# --- a changed file ------------------------------------------------------------------------------------


def test_a_changed_yaml_file_is_applied_in_every_worker(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace
) -> None:
    """Both workers count a reload, and then every request on a fresh connection (either
    worker) sees the new mapping; each worker logged it."""
    logged = len(events(reloading, "config reloaded"))
    change_and_wait(fresh, reloading, files.config, yaml_config("yaml-target-1"))
    all_serve(fresh, reloading, "yaml-target-1", times=40)
    assert len(events(reloading, "config reloaded")) >= logged + 2


def test_a_json_file_is_applied_too(reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace) -> None:
    config = {
        "model_map": {"gpt-reload": "json-target-2", "gpt-flight": f"slow-stream-{FLIGHT_EVENTS}"},
        "request_timeout": 30,
    }
    change_and_wait(fresh, reloading, files.config, json.dumps(config, indent=2), "json-target-2")


def test_typed_values_reload_keys_listed_in_the_file_included(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace
) -> None:
    """A YAML list of client keys is added to the keys file's; a bool and a float parse."""
    extra = ("proxy_api_keys:", "  - sk-from-config-1", "  - sk-from-config-2", "disable_thinking: false")
    change_and_wait(fresh, reloading, files.config, yaml_config("typed-target-3", *extra), "typed-target-3")
    assert served(fresh, reloading, key="sk-from-config-2") == "typed-target-3"
    assert served(fresh, reloading, key=KEY_A) == "typed-target-3"
    # and taken away again by the next file
    change_and_wait(fresh, reloading, files.config, yaml_config("typed-target-4"), "typed-target-4")
    response = fresh.get(f"{reloading.v1}/models", headers={"Authorization": "Bearer sk-from-config-2"})
    assert response.status_code == 401


def test_a_request_in_flight_finishes_on_the_old_settings(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace, own: FakeUpstream
) -> None:
    """A 1.5 s stream mapped by the old file keeps going while the new file is applied; it
    completes, and its upstream request used the old target, while new requests use the new."""
    change_and_wait(fresh, reloading, files.config, yaml_config("before-flight"), "before-flight")
    body: list[bytes] = []
    first = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{reloading.v1}/chat/completions",
                json={"model": "gpt-flight", "messages": [{"role": "user", "content": "x"}], "stream": True},
                headers={"Authorization": f"Bearer {KEY_A}"},
                timeout=15,
            ) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw():
                    body.append(chunk)
                    first.set()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            first.set()

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    assert first.wait(5), "the stream never started"
    new_map = yaml_config("after-flight").replace(f"slow-stream-{FLIGHT_EVENTS}", "echo-model")
    change_and_wait(fresh, reloading, files.config, new_map, "after-flight")
    assert served(fresh, reloading, "gpt-flight") == "echo-model"
    worker.join(10)
    assert not worker.is_alive()
    assert errors == []
    text = b"".join(body).decode()
    assert text.count(f'"model":"slow-stream-{FLIGHT_EVENTS}"') == FLIGHT_EVENTS
    assert text.endswith("data: [DONE]\n\n")
    streamed = [
        seen for seen in own.requests if seen.path == "/v1/chat/completions" and b"stream" in seen.body
    ]
    assert streamed[-1].json()["model"] == f"slow-stream-{FLIGHT_EVENTS}"


# --- a file that does not validate ----------------------------------------------------------------------


INVALID = [
    pytest.param("model_map: {gpt-reload: [unclosed\n", "not valid YAML", id="yaml-syntax"),
    pytest.param("model_map: {}\nno_such_setting: 1\n", "unknown key 'no_such_setting'", id="unknown-key"),
    pytest.param('model_map:\n  "/gpt-(/": x\n', "CONFIG_FILE model_map: ", id="bad-regex"),
    pytest.param("request_timeout: -1\n", "CONFIG_FILE request_timeout: ", id="bad-value"),
    pytest.param("- model_map\n- request_timeout\n", "must hold a mapping", id="not-a-mapping"),
    pytest.param(None, "cannot read", id="file-removed"),
    pytest.param(
        "model_map:\n  gpt-reload: a\n  gpt-reload: b\n", "duplicate key 'gpt-reload'", id="dup-key"
    ),
]


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_an_invalid_file_is_rejected_logged_counted_and_the_old_settings_keep_serving(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace, text: str | None, reason: str
) -> None:
    good = yaml_config("kept-target")
    if served(fresh, reloading) != "kept-target":
        change_and_wait(fresh, reloading, files.config, good, "kept-target")
    errors_before = reloads(fresh, reloading, "error")
    logged = len(events(reloading, "config reload rejected, keeping the running settings"))
    if text is None:
        files.config.unlink()
    else:
        write_atomically(files.config, text)

    def both_rejected() -> None:
        assert reloads(fresh, reloading, "error") >= errors_before + 2

    eventually(both_rejected, DEADLINE)
    all_serve(fresh, reloading, "kept-target", times=8)
    rejected = events(reloading, "config reload rejected, keeping the running settings")[logged:]
    assert len(rejected) >= 2
    assert all(event["level"] == "error" and reason in event["error"] for event in rejected), rejected
    assert reloading.process.poll() is None
    change_and_wait(fresh, reloading, files.config, good, "kept-target")  # as the next test expects


# --- SIGHUP ------------------------------------------------------------------------------------------------


def test_sighup_with_an_unchanged_file_reloads_every_worker_and_the_proxy_survives(
    reloading: Proxy, fresh: httpx.Client
) -> None:
    target = served(fresh, reloading)
    for round_ in range(2):
        before = reloads(fresh, reloading, "success")
        reloading.process.send_signal(signal.SIGHUP)

        def both_reloaded(before: float = before) -> None:
            assert reloads(fresh, reloading, "success") >= before + 2

        eventually(both_reloaded, DEADLINE)
        assert reloading.process.poll() is None, f"the proxy died on SIGHUP {round_ + 1}"
        assert fresh.get(f"{reloading.url}/healthz").status_code == 200
        all_serve(fresh, reloading, target, times=6)


def test_a_rotated_keys_file_is_read_on_sighup(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace
) -> None:
    """The keys file is not the config file: after rotating it, SIGHUP makes every worker read it."""

    def rotate(old: str, new: str) -> None:
        write_atomically(files.keys, new + "\n")
        reloading.process.send_signal(signal.SIGHUP)

        def swapped() -> None:
            for _ in range(6):
                served(fresh, reloading, key=new)
                answer = fresh.get(f"{reloading.v1}/models", headers={"Authorization": f"Bearer {old}"})
                assert answer.status_code == 401

        eventually(swapped, DEADLINE)

    rotate(KEY_A, KEY_B)
    rotate(KEY_B, KEY_A)


# --- restart-only settings ---------------------------------------------------------------------------------


def test_restart_only_settings_in_the_file_are_logged_and_not_applied(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace
) -> None:
    """max_request_bytes and log_format need a restart: the reload applies the rest (the map),
    warns naming them, and keeps the running values: a 3000-byte body still passes, logs stay
    JSON."""
    warned = len(events(reloading, "config reloaded; these changes need a restart"))
    restart_only = ("max_request_bytes: 2048", "log_format: console", "metrics_max_models: 3")
    change_and_wait(
        fresh, reloading, files.config, yaml_config("restart-target", *restart_only), "restart-target"
    )
    warnings = events(reloading, "config reloaded; these changes need a restart")[warned:]
    assert len(warnings) >= 2
    for warning in warnings:
        assert warning["level"] == "warning"
        assert {"max_request_bytes", "log_format", "metrics_max_models"} <= set(warning["settings"])
    big = fresh.post(
        f"{reloading.v1}/embeddings",
        json={"model": "plain", "input": "x" * 3000},
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert big.status_code == 200
    assert big.json()["bytes"] > 3000

    def logged_as_json() -> None:  # log_format: console was not applied
        assert events(reloading, "request")[-1]["endpoint"] == "embeddings"

    eventually(logged_as_json, timeout=2)
    change_and_wait(fresh, reloading, files.config, yaml_config("kept-target"), "kept-target")


# --- prompt SIGHUP, and a file caught mid-write ---------------------------------------------------------

HUP_DEADLINE = 5.0  # "within a second", with room for a busy machine; the poll is 60 s


@pytest.fixture(scope="module")
def hup_only(
    start_proxy: StartProxy, own: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """Two workers that would not look at the file for a minute: only SIGHUP makes them."""
    config = tmp_path_factory.mktemp("hup") / "config.yaml"
    write_atomically(config, yaml_config("hup-first"))
    proxy = start_proxy(
        UPSTREAM_URL=own.url, MODEL_MAP=None, WORKERS="2", CONFIG_FILE=str(config), CONFIG_POLL_SECONDS="60"
    )
    yield SimpleNamespace(proxy=proxy, config=config)
    proxy.stop()


def hang_up_and_count(client: httpx.Client, proxy: Proxy, result: str, name: str | None = None) -> float:
    """SIGHUP the main process; wait until both workers counted ``result`` (or logged ``name``)."""
    before = reloads(client, proxy, result) if name is None else len(events(proxy, name))
    sent = time.monotonic()
    proxy.process.send_signal(signal.SIGHUP)

    def both_workers() -> None:
        now = reloads(client, proxy, result) if name is None else len(events(proxy, name))
        assert now >= before + 2

    eventually(both_workers, HUP_DEADLINE)
    return time.monotonic() - sent


def test_sighup_reloads_every_worker_at_once(hup_only: SimpleNamespace, fresh: httpx.Client) -> None:
    write_atomically(hup_only.config, yaml_config("hup-second"))
    hang_up_and_count(fresh, hup_only.proxy, "success")
    all_serve(fresh, hup_only.proxy, "hup-second")


HELD = "config file is empty; keeping the running settings unless it stays empty"


def test_a_file_caught_empty_mid_write_keeps_the_running_settings(
    hup_only: SimpleNamespace, fresh: httpx.Client
) -> None:
    """Truncate, then write, as `>` in a shell or a non-atomic editor does: a reload between the
    two must not run on "no settings" (here: no model map at all)."""
    write_atomically(hup_only.config, yaml_config("before-truncate"))
    hang_up_and_count(fresh, hup_only.proxy, "success")
    successes = reloads(fresh, hup_only.proxy, "success")
    hup_only.config.write_text("")  # truncated in place; the new text is not there yet
    hang_up_and_count(fresh, hup_only.proxy, "success", name=HELD)
    all_serve(fresh, hup_only.proxy, "before-truncate")
    assert reloads(fresh, hup_only.proxy, "success") == successes
    hup_only.config.write_text(yaml_config("after-truncate"))
    hang_up_and_count(fresh, hup_only.proxy, "success")
    all_serve(fresh, hup_only.proxy, "after-truncate")


def test_a_file_that_stays_empty_is_applied_at_the_next_check(
    hup_only: SimpleNamespace, fresh: httpx.Client
) -> None:
    """Empty at two checks in a row: the operator meant it, and it sets nothing (no map here)."""
    hup_only.config.write_text("\n")
    hang_up_and_count(fresh, hup_only.proxy, "success", name=HELD)
    all_serve(fresh, hup_only.proxy, served(fresh, hup_only.proxy))
    hang_up_and_count(fresh, hup_only.proxy, "success")
    all_serve(fresh, hup_only.proxy, "gpt-reload")  # passed through unmapped


# --- last, as it may leave the workers unable to reload ----------------------------------------------


def test_reloading_survives_a_file_that_is_not_utf8(
    reloading: Proxy, fresh: httpx.Client, files: SimpleNamespace
) -> None:
    """A Latin-1 file is an invalid file like any other: rejected and counted, and the next
    good file is still applied (the watcher must not die on it)."""
    errors_before = reloads(fresh, reloading, "error")
    files.config.write_bytes(yaml_config("caf\u00e9-target").encode("latin-1"))
    time.sleep(1.0)  # five polls
    assert reloading.process.poll() is None
    all_serve(fresh, reloading, served(fresh, reloading), times=6)
    assert reloads(fresh, reloading, "error") >= errors_before + 2
    write_atomically(files.config, yaml_config("after-latin-1"))
    eventually(lambda: all_serve(fresh, reloading, "after-latin-1", times=6), timeout=5)


# --- in-process: service.reload ----------------------------------------------------------------------


def fake_app(settings: Settings) -> SimpleNamespace:
    """What reload touches of a Sanic app: ctx.settings, ctx.labels, ctx.replicas and config."""
    return SimpleNamespace(
        ctx=SimpleNamespace(
            settings=settings,
            labels=ModelLabels(10, settings.model_map.known_ids()),
            replicas=pools(settings.backends, settings.upstream_cooldown),
        ),
        config=SimpleNamespace(RESPONSE_TIMEOUT=settings.response_timeout),
    )


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("rerouter_config_reload_total", {"result": result}) or 0.0


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    write_atomically(path, "model_map: {m: one}\n")
    return path


def test_reloaded_keeps_restart_only_settings_and_names_those_that_differ(config: Path) -> None:
    sources = reload.Sources({"UPSTREAM_URL": "http://u:1", "CONFIG_FILE": str(config)}, ())
    current = load_settings(sources.environ)
    write_atomically(
        config,
        "model_map: {m: two}\nlisten_port: 4321\nworkers: 3\nrequest_timeout: 7\nupstream_url: http://v:2\n",
    )
    fresh, ignored = reload.reloaded(current, sources)
    assert ignored == ["listen_port", "workers"]
    assert (fresh.listen_port, fresh.workers) == (current.listen_port, current.workers)
    assert fresh.model_map.resolve("m").target == "two"
    assert fresh.request_timeout == 7
    assert fresh.upstream_url == "http://u:1"  # the environment still wins
    for name in RESTART_ONLY:
        assert getattr(fresh, name) == getattr(current, name)


def test_reloaded_takes_a_new_upstream_from_the_file_unless_in_demo_mode(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    write_atomically(config, "upstream_url: http://u:1\n")
    sources = reload.Sources({"CONFIG_FILE": str(config)}, ())
    current = load_settings(sources.environ)
    write_atomically(config, "upstream_url: http://w:3/v1\n")
    fresh, ignored = reload.reloaded(current, sources)
    assert fresh.upstream_url == "http://w:3"
    assert ignored == []
    kept, _ = reload.reloaded(replace(current, demo=True), sources)
    assert kept.upstream_url == "http://u:1"  # the demo's built-in upstream stays


def test_a_reload_that_would_drop_every_key_is_refused(config: Path) -> None:
    sources = reload.Sources({"UPSTREAM_URL": "http://u:1", "CONFIG_FILE": str(config)}, ())
    write_atomically(config, "proxy_api_keys: [k1]\n")
    current = load_settings(sources.environ)
    write_atomically(config, "proxy_api_keys: [k2]\n")
    assert reload.reloaded(current, sources)[0].api_keys == ("k2",)
    write_atomically(config, "model_map: {m: two}\n")
    with pytest.raises(ConfigError, match="no API key"):
        reload.reloaded(current, sources)


def test_apply_swaps_settings_response_timeout_and_known_models(config: Path) -> None:
    sources = reload.Sources({"UPSTREAM_URL": "http://u:1", "CONFIG_FILE": str(config)}, ())
    app = fake_app(load_settings(sources.environ))
    write_atomically(config, "model_map: {m: two, alias: x}\nrequest_timeout: 5000\n")
    before = counted("success")
    with capture_logs() as logs:
        reload.apply(app, sources)  # type: ignore[arg-type]
    assert counted("success") == before + 1
    assert app.ctx.settings.model_map.resolve("alias").target == "x"
    assert app.config.RESPONSE_TIMEOUT == app.ctx.settings.response_timeout > 5000
    assert {"alias", "x", "m", "two"} <= app.ctx.labels.known
    assert [entry["event"] for entry in logs] == ["config reloaded"]


def test_apply_keeps_the_running_settings_when_the_file_is_bad(config: Path) -> None:
    sources = reload.Sources({"UPSTREAM_URL": "http://u:1", "CONFIG_FILE": str(config)}, ())
    running = load_settings(sources.environ)
    app = fake_app(running)
    write_atomically(config, "model_map: {m: two}\nbogus: 1\n")
    before = counted("error")
    with capture_logs() as logs:
        reload.apply(app, sources)  # type: ignore[arg-type]
    assert counted("error") == before + 1
    assert app.ctx.settings is running
    timeout = app.config.RESPONSE_TIMEOUT
    assert timeout == running.response_timeout
    [entry] = logs
    assert entry["log_level"] == "error"
    assert "unknown key 'bogus'" in entry["error"]


def test_a_change_landing_while_a_reload_runs_is_not_lost(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher must compare against the file it read, not the file as it is after the reload:
    a second change written while the first is being applied is picked up by the next poll."""
    sources = reload.Sources(
        {"UPSTREAM_URL": "http://u:1", "CONFIG_FILE": str(config), "CONFIG_POLL_SECONDS": "0.05"}, ()
    )
    app = fake_app(load_settings(sources.environ))
    real_apply = reload.apply
    applied: list[str] = []

    def apply_then_change_again(app: Any, sources: reload.Sources) -> None:
        real_apply(app, sources)
        applied.append(app.ctx.settings.model_map.resolve("m").target)
        if len(applied) == 1:
            write_atomically(config, "model_map: {m: three}\n")  # lands just after the read

    monkeypatch.setattr(reload, "apply", apply_then_change_again)

    async def run() -> str:
        watcher = asyncio.create_task(reload.watch(app, sources))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        write_atomically(config, "model_map: {m: two}\n")
        await asyncio.sleep(0.8)  # 16 poll intervals
        watcher.cancel()
        return str(app.ctx.settings.model_map.resolve("m").target)

    with capture_logs():
        final = asyncio.run(run())
    assert applied[0] == "two"
    assert final == "three", f"applied {applied}: the second change was never picked up"


def test_create_app_sets_sanics_response_timeout_above_every_upstream_limit() -> None:
    """Sanic's RESPONSE_TIMEOUT also counts the gaps inside a stream; it must never fire before
    the proxy's own limits. (A behavioural test would need a stream over 60 s.)"""
    from service.app import create_app

    settings = load_settings(
        {"UPSTREAM_URL": "http://u:1", "REQUEST_TIMEOUT": "900", "UPSTREAM_READ_TIMEOUT": "1200"}
    )
    try:
        app = create_app(settings, name=f"reload-unit-{uuid.uuid4().hex[:8]}")
    finally:
        structlog.reset_defaults()  # create_app configured logging for a server
    timeout = app.config.RESPONSE_TIMEOUT
    assert timeout == settings.response_timeout
    assert timeout > settings.upstream_connect_timeout + settings.upstream_read_timeout
    assert timeout > settings.request_timeout
