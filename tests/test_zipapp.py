"""The shiv zipapp: one file that runs on a bare Python, with several workers.

The zipapp is built as ``make zipapp`` builds it (shiv, console-script entry point), from a copy
of the sources so the build leaves nothing in the work tree. It is kept in pytest's cache under
a key of the sources, pyproject.toml and the interpreter, so a rerun with no change reuses it.

It runs on the interpreter the venv was made from, in isolated mode (``-I``) and with an
environment that names no venv, as on a host where nothing but the file was copied.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT_MAP, free_port, wait_until_healthy
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "service")
ENTRY_POINT = "openai-model-rerouter"
BUILD_TIMEOUT = 300


def sources_key() -> str:
    digest = hashlib.sha256(f"{sys.version}\n{sys.platform}".encode())
    for name in SOURCES:
        path = ROOT / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def base_python() -> str:
    """The interpreter the venv was made from: no venv's site-packages on its path."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.base_prefix) / "bin" / version, Path(sys.base_prefix) / "bin" / "python3"):
        if candidate.exists():
            return str(candidate)
    pytest.fail(f"no base interpreter under {sys.base_prefix}")


def bare_env(home: Path, **env: str) -> dict[str, str]:
    """What a bare host has: a system PATH, a HOME, a locale; no venv, no rerouter setting."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "SHIV_ROOT": str(home / "shiv"),
        **env,
    }


@pytest.fixture(scope="session")
def zipapp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shiv = Path(sys.executable).parent / "shiv"
    assert shiv.exists(), "shiv is missing: `make install` brings it (the test extra)"
    cache_provider = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(cache_provider.mkdir("zipapp")) if cache_provider else tmp_path_factory.mktemp("zipapp")
    target = cache / f"openai-model-rerouter-{sources_key()}.pyz"
    # pytest-xdist runs a session per worker: one builds while the others wait for the file
    # (a reader of a zipapp being written, or replaced, fails on a bad zip header).
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            build(shiv, target, tmp_path_factory)
    return target


def build(shiv: Path, target: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = target.parent
    work = tmp_path_factory.mktemp("zipapp-build")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / "src").mkdir(exist_ok=True)
            shutil.copy2(source, work / "src" / name)
    built = work / "openai-model-rerouter.pyz"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    result = subprocess.run(
        [str(shiv), "-c", ENTRY_POINT, "-o", str(built), str(work / "src")],
        env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"shiv failed:\n{result.stdout}\n{result.stderr}"
    for old in cache.glob("openai-model-rerouter-*.pyz"):
        old.unlink()
    partial = cache / f"{target.name}.partial"
    shutil.copyfile(built, partial)
    partial.replace(target)  # whole or not at all, even for a run interrupted mid-copy


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_help_on_a_bare_python(zipapp: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [base_python(), "-I", str(zipapp), "--help"],
        env=bare_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: openai-model-rerouter")
    assert "--upstream-url" in result.stdout


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_two_workers_serve_count_and_stop(zipapp: Path, upstream: FakeUpstream, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = bare_env(
        tmp_path,
        UPSTREAM_URL=upstream.url,
        MODEL_MAP=orjson.dumps(DEFAULT_MAP).decode(),
        LISTEN_HOST="127.0.0.1",
        LISTEN_PORT=str(port),
        WORKERS="2",
        SHUTDOWN_GRACE="0",
    )
    log_path = tmp_path / "zipapp.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [base_python(), "-I", str(zipapp)],
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(url, process, log_path, workers=2)
        assert any((tmp_path / "shiv").iterdir()), "dependencies are extracted under SHIV_ROOT"
        messages = [{"role": "user", "content": "hi"}]
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-zipapp", max_retries=0, timeout=10) as client:
            stream = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=messages, stream=True)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            assert streamed.strip() == "reply from qwen3-4b"

            plain = client.chat.completions.create(model="gpt-4o", messages=messages)
            assert plain.choices[0].message.content == "reply from echo-model"

        assert requests_counted(url) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def requests_counted(url: str) -> float:
    """rerouter_requests_total summed over every label set: whichever worker serves /metrics
    adds up all workers. A request is counted once its response ended, so wait a moment for 2."""
    deadline = time.monotonic() + 5
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        total = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "rerouter_requests_total"
        )
        if total >= 2 or time.monotonic() > deadline:
            return total
        time.sleep(0.1)
