"""The command: --help, --version, one-line errors that exit 2 before binding, and --demo."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service import __version__
from service.config import OPTIONS
from tests.conftest import SANIC_ACK_SETTLE, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30


@dataclass
class Run:
    code: int
    out: str
    err: str


def clean_env(**env: str) -> dict[str, str]:
    """The test process's environment without any rerouter setting, plus ``env``."""
    names = {option.env for option in OPTIONS} | {"PROMETHEUS_MULTIPROC_DIR"}
    return {**{k: v for k, v in os.environ.items() if k not in names}, **env}


def run(*args: str, **env: str) -> Run:
    """``python -m service`` in its own process group, killed whole if it outlives TIMEOUT."""
    process = subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        env=clean_env(**env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"`{' '.join(args)}` with {env} still ran after {TIMEOUT}s:\n{out}\n{err}")
    return Run(process.returncode, out, err)


def test_help_lists_every_flag() -> None:
    result = run("--help")
    assert result.code == 0
    assert result.err == ""
    assert result.out.startswith("usage: openai-model-rerouter")
    for option in OPTIONS:
        assert option.flag in result.out
        assert option.env in result.out
    for flag in ("--demo", "--version", "--help"):
        assert flag in result.out


def test_version() -> None:
    result = run("--version")
    assert result.code == 0
    assert result.out.strip() == f"openai-model-rerouter {__version__}"


@pytest.fixture(scope="module")
def occupied_port() -> Iterator[int]:
    """A port this test listens on: a proxy that tried to bind it would fail differently."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


BAD_SETTINGS: list[tuple[dict[str, str], list[str], str]] = [
    ({"MODEL_MAP": "{not json"}, [], "MODEL_MAP"),
    ({"MODEL_MAP": '{"/gpt-(4/": "x"}'}, [], "MODEL_MAP"),
    ({"MODEL_MAP": '{"/gpt-4/": "\\\\1"}'}, [], "MODEL_MAP"),
    ({"UPSTREAM_URL": "localhost:8000"}, [], "UPSTREAM_URL"),
    ({"LISTEN_PORT": "70000"}, [], "LISTEN_PORT"),
    ({"WORKERS": "0"}, [], "WORKERS"),
    ({"DISABLE_THINKING": "maybe"}, [], "DISABLE_THINKING"),
    ({"LOG_FORMAT": "xml"}, [], "LOG_FORMAT"),
    ({"LOG_LEVEL": "verbose"}, [], "LOG_LEVEL"),
    ({"MODEL_MAP": '{"gpt-4o": "a", "gpt-4o": "b"}'}, [], "MODEL_MAP"),
    ({}, ["--workers", "many"], "--workers"),
]


def test_each_bad_setting_exits_2_with_one_line_naming_it(occupied_port: int) -> None:
    def attempt(case: tuple[dict[str, str], list[str], str]) -> tuple[str, Run]:
        env, args, name = case
        base = {
            "UPSTREAM_URL": "http://127.0.0.1:9",
            "LISTEN_HOST": "127.0.0.1",
            "LISTEN_PORT": str(occupied_port),
        }
        return name, run(*args, **{**base, **env})

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, BAD_SETTINGS))
    for name, result in results:
        lines = result.err.splitlines()
        assert result.code == 2, (name, result)
        assert len(lines) == 1, (name, result.err)
        assert lines[0].startswith(f"openai-model-rerouter: {name}: "), (name, lines[0])
        assert result.out == "", (name, result.out)


def test_missing_upstream_url_exits_2_and_points_at_demo() -> None:
    result = run(LISTEN_HOST="127.0.0.1", LISTEN_PORT=str(free_port()))
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith("openai-model-rerouter: UPSTREAM_URL: ")
    assert "--demo" in line


def test_demo_serves_a_rewrite_without_any_upstream(tmp_path: Path) -> None:
    port = free_port()
    stderr_path, stdout_path = tmp_path / "stderr", tmp_path / "stdout"
    with stderr_path.open("w") as stderr, stdout_path.open("w") as stdout:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--demo",
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                str(port),
            ],
            env=clean_env(SHUTDOWN_GRACE="0"),
            cwd=ROOT,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, stderr_path.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200 and (
                    "Worker ready [" in stdout_path.read_text()
                ):
                    time.sleep(SANIC_ACK_SETTLE)  # see tests.conftest.wait_until_healthy
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.1)
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.json()["model"] == "demo-qwen3-4b"
        assert "demo-qwen3-4b" in response.json()["choices"][0]["message"]["content"]
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert {m["id"] for m in models["data"]} >= {"demo-qwen3-4b", "gpt-3.5-turbo-16k"}
        assert "built-in demo upstream" in stderr_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0


MAP = '{"gpt-3.5-turbo-16k": "qwen3-4b", "/gpt-4(.*)/": "q4\\\\1"}'


@pytest.mark.parametrize(
    ("model", "line"),
    [
        (
            "gpt-3.5-turbo-16k",
            "gpt-3.5-turbo-16k -> qwen3-4b  [rule 'gpt-3.5-turbo-16k'; upstream default: http://h:8000]",
        ),
        ("gpt-4o", "gpt-4o -> q4o  [rule '/gpt-4(.*)/'; upstream default: http://h:8000]"),
        ("llama", "llama -> llama  [no rule (passed through); upstream default: http://h:8000]"),
    ],
)
def test_resolve_prints_rule_target_and_upstream(model: str, line: str) -> None:
    result = run("resolve", model, UPSTREAM_URL="http://h:8000/v1", MODEL_MAP=MAP)
    policy = "    thinking on (DISABLE_THINKING); think blocks: keep (thinking on)"
    assert (result.code, result.out.splitlines(), result.err) == (0, [line, policy], "")


def test_check_accepts_valid_settings_and_refuses_bad_ones() -> None:
    good = run("--model-map", MAP, "check", UPSTREAM_URL="http://h:8000")
    assert good.code == 0
    assert "settings are valid" in good.out
    bad = run("check", UPSTREAM_URL="http://h:8000", MODEL_MAP='{"/(/": "x"}')
    assert bad.code == 2
    assert bad.err.strip().startswith("openai-model-rerouter: MODEL_MAP: key '/(/'")
    assert run("resolve", "gpt-4o", MODEL_MAP=MAP).code == 2  # no UPSTREAM_URL: not valid settings


def test_resolve_lists_every_target_with_its_backend_and_params() -> None:
    result = run(
        "resolve",
        "gpt-4o",
        UPSTREAM_URL="http://h:8000",
        UPSTREAMS='{"big": {"urls": ["http://a:8000", "http://b:8000/v1"]}}',
        MODEL_MAP='{"gpt-4o": [{"model": "qwen3-32b", "upstream": "big"}, "qwen3-4b"]}',
        MODEL_PARAMS='{"qwen3-32b": {"defaults": {"temperature": 0.7}, "drop": ["logit_bias"]}}',
    )
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines() == [
        "gpt-4o -> qwen3-32b  [rule 'gpt-4o'; upstream big: http://a:8000, http://b:8000]",
        "    thinking on (DISABLE_THINKING); think blocks: keep (thinking on)",
        "    params: defaults temperature=0.7; drop logit_bias",
        "  then qwen3-4b  [upstream default: http://h:8000]",
        "    thinking on (DISABLE_THINKING); think blocks: keep (thinking on)",
    ]


def test_resolve_shows_each_fallback_routes_own_policy_and_check_refuses_a_bad_one() -> None:
    routes = (
        '{"qwen3-fast": [{"model": "qwen3-32b", "thinking": "off", "params": {"overrides": {"top_p": 0.8}}},'
        ' {"model": "qwen3-4b", "think_output": "reasoning"}]}'
    )
    result = run("resolve", "qwen3-fast", UPSTREAM_URL="http://h:8000", MODEL_MAP=routes)
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines() == [
        "qwen3-fast -> qwen3-32b  [rule 'qwen3-fast'; upstream default: http://h:8000]",
        "    thinking off (route); think blocks: strip (thinking off)",
        "    params: overrides top_p=0.8",
        "  then qwen3-4b  [upstream default: http://h:8000]",
        "    thinking on (DISABLE_THINKING); think blocks: reasoning (route)",
    ]
    bad = run(
        "check", UPSTREAM_URL="http://h:8000", MODEL_MAP='{"qwen3-fast": {"model": "m", "thinking": "no"}}'
    )
    assert bad.code == 2
    assert bad.err.strip() == (
        "openai-model-rerouter: MODEL_MAP: key 'qwen3-fast': "
        'target "thinking" must be "on" or "off", got \'no\''
    )


def test_check_names_every_backend_and_refuses_an_unknown_one() -> None:
    good = run("check", UPSTREAM_URL="http://h:8000", UPSTREAMS='{"big": "http://a:8000"}')
    assert good.code == 0
    assert "upstreams: default http://h:8000; big http://a:8000" in good.out
    bad = run(
        "check", UPSTREAM_URL="http://h:8000", MODEL_MAP='{"gpt-4o": {"model": "m", "upstream": "big"}}'
    )
    assert bad.code == 2
    assert bad.err.strip() == (
        "openai-model-rerouter: MODEL_MAP: key 'gpt-4o': unknown upstream 'big' (UPSTREAMS names: default)"
    )


def test_a_port_in_use_is_one_line_naming_it_and_no_traceback(occupied_port: int) -> None:
    for args in ((), ("--demo",)):
        result = run(
            *args, UPSTREAM_URL="http://127.0.0.1:9", LISTEN_HOST="127.0.0.1", LISTEN_PORT=str(occupied_port)
        )
        assert result.code == 1, result
        assert result.err.splitlines() == [
            f"openai-model-rerouter: cannot listen on 127.0.0.1:{occupied_port}: Address already in use"
        ], result.err
        assert result.out == ""


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses a process listens on for ``port``, from /proc (hex, as the kernel writes)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_demo_banner_names_the_bound_port_and_listens_on_loopback_only(tmp_path: Path) -> None:
    """LISTEN_PORT=0 picks a free port: the banner shows that one. The demo checks no key, so
    without LISTEN_HOST it listens on 127.0.0.1 only."""
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--demo"],
            env=clean_env(LISTEN_PORT="0", SHUTDOWN_GRACE="0"),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:

        def banner_port() -> int:
            found = re.search(r"Try: curl -s http://127\.0\.0\.1:(\d+)/v1/", stderr_path.read_text())
            assert found, stderr_path.read_text()
            return int(found.group(1))

        port = eventually(banner_port, TIMEOUT)
        assert port != 0

        def answers() -> None:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError as exc:
                raise AssertionError(exc) from exc

        eventually(answers, TIMEOUT)
        assert listening_addresses(process.pid, port) == {"0100007F"}  # 127.0.0.1, nothing else
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
