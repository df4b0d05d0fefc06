"""Settings: read once at start-up from the environment and CLI flags, validated, then frozen.

Every variable has a matching flag (``LISTEN_PORT`` -> ``--listen-port``); a flag wins over the
environment. A bad value raises ``ConfigError`` whose message starts with the name at fault, so
the CLI can print one line and exit 2 before anything binds.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from service import __version__
from service.mapping import MappingError, ModelMap, is_regex_key
from service.thinking import ThinkingPolicy

DEMO_MODEL_MAP = '{"gpt-3.5-turbo-16k": "demo-qwen3-4b", "/gpt-4.*/": "demo-qwen3-4b"}'


class ConfigError(ValueError):
    """A setting that cannot be used; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Settings:
    upstream_url: str
    model_map: ModelMap = field(default_factory=lambda: ModelMap.parse({}))
    disable_thinking: bool | re.Pattern[str] = False
    thinking_switch: str = "suffix"
    think_output: str | None = None
    listen_host: str = "0.0.0.0"
    listen_port: int = 1234
    workers: int = 1
    log_format: str = "json"
    log_level: str = "info"
    metrics_max_models: int = 100
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    shutdown_grace: float = 5.0
    shutdown_timeout: float = 30.0
    demo: bool = False

    @cached_property
    def thinking(self) -> ThinkingPolicy:
        return ThinkingPolicy(self.disable_thinking, self.thinking_switch, self.think_output)

    def upstream(self, path: str) -> str:
        """The upstream URL for a ``/v1/...`` path (raw, query string included)."""
        return self.upstream_url + path


def parse_upstream_url(value: str) -> str:
    """Accept ``http://h:8000`` and ``http://h:8000/v1`` alike; keep the base without ``/v1``."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not carry a query or fragment: {value!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def parse_model_map(value: str) -> ModelMap:
    try:
        raw = json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    try:
        return ModelMap.parse(raw)
    except MappingError as exc:
        raise ValueError(str(exc)) from None


def parse_thinking_scope(value: str) -> bool | re.Pattern[str]:
    """true/false for every model, or a ``/regex/`` the whole target model id must match."""
    stripped = value.strip()
    if not is_regex_key(stripped):
        return parse_bool(stripped)
    try:
        return re.compile(stripped[1:-1])
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, 1/0 or yes/no, got {value!r}")


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range {low}..{high}")
        return number

    return parse


def _seconds(*, zero_ok: bool) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            seconds = float(value.strip())
        except ValueError:
            raise ValueError(f"expected seconds, got {value!r}") from None
        if not (seconds >= 0 if zero_ok else seconds > 0) or seconds == float("inf"):
            kind = "a non-negative" if zero_ok else "a positive"
            raise ValueError(f"expected {kind} number of seconds, got {value!r}")
        return seconds

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return lowered

    return parse


def _host(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


@dataclass(frozen=True)
class _Option:
    env: str
    field: str
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


OPTIONS = (
    _Option("UPSTREAM_URL", "upstream_url", parse_upstream_url, "OpenAI-compatible server base URL"),
    _Option("MODEL_MAP", "model_map", parse_model_map, "JSON object: source id or /regex/ -> target"),
    _Option(
        "DISABLE_THINKING",
        "disable_thinking",
        parse_thinking_scope,
        "switch thinking off: true/false, or /regex/ of target models",
    ),
    _Option(
        "THINKING_SWITCH",
        "thinking_switch",
        _choice("suffix", "template", "both"),
        "how: suffix (' /no_think'), template (enable_thinking=false) or both",
    ),
    _Option(
        "THINK_OUTPUT",
        "think_output",
        _choice("strip", "keep", "reasoning"),
        "<think> blocks in answers: strip, keep or reasoning (default: strip where disabled)",
    ),
    _Option("LISTEN_HOST", "listen_host", _host, "address to listen on (default 0.0.0.0)"),
    _Option("LISTEN_PORT", "listen_port", _int_between(0, 65535), "port (default 1234)"),
    _Option("WORKERS", "workers", _int_between(1, 256), "worker processes (default 1)"),
    _Option("LOG_FORMAT", "log_format", _choice("json", "console"), "json or console"),
    _Option(
        "LOG_LEVEL",
        "log_level",
        _choice("debug", "info", "warning", "error", "critical"),
        "log level (default info)",
    ),
    _Option(
        "METRICS_MAX_MODELS",
        "metrics_max_models",
        _int_between(1, 100_000),
        "distinct model label values per worker before 'other' (default 100)",
    ),
    _Option(
        "UPSTREAM_CONNECT_TIMEOUT",
        "upstream_connect_timeout",
        _seconds(zero_ok=False),
        "seconds to open an upstream connection (default 10)",
    ),
    _Option(
        "UPSTREAM_READ_TIMEOUT",
        "upstream_read_timeout",
        _seconds(zero_ok=False),
        "seconds the upstream may stay silent, streams included (default 600)",
    ),
    _Option(
        "SHUTDOWN_GRACE",
        "shutdown_grace",
        _seconds(zero_ok=True),
        "on SIGTERM, seconds /readyz says 503 while new connections are still accepted (default 5)",
    ),
    _Option(
        "SHUTDOWN_TIMEOUT",
        "shutdown_timeout",
        _seconds(zero_ok=True),
        "then, seconds in-flight requests and streams may take to finish (default 30)",
    ),
)


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-model-rerouter",
        description="Proxy for OpenAI-compatible APIs that rewrites the requested model id. "
        "Every flag can also be set by the environment variable named in its help.",
    )
    for option in OPTIONS:
        parser.add_argument(option.flag, metavar="VALUE", help=f"{option.help} [{option.env}]")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve against a built-in demo upstream (what `make run` does without UPSTREAM_URL)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def load_settings(environ: Mapping[str, str], argv: Sequence[str] = ()) -> Settings:
    """Build Settings from the environment and flags; raise ConfigError naming the culprit."""
    args = vars(_argument_parser().parse_args(list(argv)))
    demo = bool(args.pop("demo"))
    values: dict[str, Any] = {"demo": demo}
    for option in OPTIONS:
        flag_value = args[option.field]
        name, raw = (
            (option.flag, flag_value) if flag_value is not None else (option.env, environ.get(option.env))
        )
        if raw is None:
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if demo:
        values.setdefault("model_map", parse_model_map(DEMO_MODEL_MAP))
        values["upstream_url"] = "http://127.0.0.1:0"
    if "upstream_url" not in values:
        raise ConfigError("UPSTREAM_URL: required (or run with --demo for a built-in upstream)")
    return Settings(**values)
