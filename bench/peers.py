"""LiteLLM's proxy as a peer in the benchmark (``make bench-peers``, ``python -m bench.run --peers``).

It lives in a venv of its own, ``bench/.peers-venv`` (git-ignored), so that its hundred-odd
dependencies never meet the proxy's. ``make bench-peers`` creates it with the pinned version
below. It runs with one worker, telemetry off, the bundled model cost map (no network), no
database and no key check (as the proxy runs, without API_KEYS), from a generated config that
sends the requested model to the same upstream the proxy uses. The stream parameters travel in
an ``x-bench-query`` header (LiteLLM does not forward the query string;
``forward_client_headers_to_llm_api`` forwards ``x-`` headers).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from bench import payloads, proc

BENCH_DIR = Path(__file__).resolve().parent
VENV = BENCH_DIR / ".peers-venv"
LITELLM_VERSION = "1.106.12"  # later releases need packages PyPI does not have; 1.107.0 was compromised


def litellm_command() -> Path | None:
    command = VENV / "bin" / "litellm"
    return command if command.exists() else None


def litellm_config(upstream_port: int) -> dict[str, object]:
    """The requested model, sent to the upstream as the served one: the proxy's mapping, done
    LiteLLM's way (YAML is a superset of JSON, so the file is written as JSON)."""
    return {
        "model_list": [
            {
                "model_name": payloads.REQUESTED_MODEL,
                "litellm_params": {
                    "model": f"openai/{payloads.SERVED_MODEL}",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "sk-bench-not-a-key",
                },
            }
        ],
        "general_settings": {"forward_client_headers_to_llm_api": True},
        "litellm_settings": {"drop_params": True},
    }


class LiteLLM:
    """``litellm --num_workers 1`` on a port of its own; its log to a file."""

    def __init__(self, workdir: Path, name: str, upstream_port: int, port: int) -> None:
        command = litellm_command()
        if command is None:
            raise RuntimeError(f"LiteLLM is not installed in {VENV} (make bench-peers installs it)")
        self.port = port
        config = workdir / f"{name}.yaml"
        config.write_text(json.dumps(litellm_config(upstream_port), indent=2))
        env = proc.inherited_env()
        env.update(
            {
                "LITELLM_TELEMETRY": "False",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "NO_DOCS": "True",
                # Like the proxy in the bench (no API_KEYS): no key check; loopback only.
                "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
            }
        )
        self.log_path = workdir / f"{name}.log"
        self.process = subprocess.Popen(
            [
                str(command),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(self.log_path, "wb"),  # noqa: SIM115 - lives as long as it
            stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The serving process and any it started (uvicorn workers): their CPU is LiteLLM's."""
        return [self.pid, *proc.descendants(self.pid)]

    def ready(self) -> bool:
        """One real completion through it: its health route answers before its router is ready."""
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            data=payloads.chat_body(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status == 200
        except OSError:
            return False

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:]
