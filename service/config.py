"""Settings: read at start-up from CLI flags, the environment and an optional config file,
validated, then frozen.

Every variable has a matching flag (``LISTEN_PORT`` -> ``--listen-port``) and a key in the
``CONFIG_FILE`` (``listen_port``); a flag wins over the environment, which wins over the file.
A bad value raises ``ConfigError`` whose message starts with the name at fault, so the CLI can
print one line and exit 2 before anything binds. Reloads build a new Settings the same way.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from service import __version__
from service.access import parse_keys, read_keys_file
from service.backends import BACKOFF_CAP, Backend, parse_upstream_url, parse_upstreams, with_default
from service.cors import parse_origins
from service.mapping import MappingError, ModelMap, is_regex_key
from service.params import ParamPolicy, ParamsError
from service.payload import Policy
from service.thinking import ThinkingPolicy

DEMO_MODEL_MAP = '{"gpt-3.5-turbo-16k": "demo-qwen3-4b", "/gpt-4.*/": "demo-qwen3-4b"}'


class ConfigError(ValueError):
    """A setting that cannot be used; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Settings:
    upstream_url: str | None
    upstreams: Mapping[str, Backend] = field(default_factory=dict)
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
    proxy_api_keys: tuple[str, ...] = field(default=(), repr=False)
    proxy_api_keys_file: tuple[str, ...] = field(default=(), repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    max_request_bytes: int = 32 * 1024 * 1024
    request_timeout: float = 600.0
    upstream_max_connections: int = 1024
    config_file: str | None = None
    config_poll_seconds: float = 2.0
    retries: int = 0
    upstream_cooldown: float = 10.0
    response_model: str = "upstream"
    model_params: ParamPolicy = field(default_factory=ParamPolicy)
    stream_keepalive_seconds: float = 15.0
    cors_allow_origins: tuple[str, ...] = ()
    demo: bool = False

    @property
    def response_timeout(self) -> int:
        """Sanic's RESPONSE_TIMEOUT runs until the first byte of the answer and also counts gaps
        inside a stream: above the longest a request may take, every attempt of the longest
        fallback list at its backend's limits plus the waits between retries, so it never
        fires first."""
        per_attempt = max(
            max(
                self.request_timeout,
                self.connect_timeout(backend) + self.read_timeout(backend),
            )
            for backend in self.backends.values()
        )
        attempts = self.model_map.most_targets() * (self.retries + 1)
        return int(attempts * per_attempt + attempts * BACKOFF_CAP) + 60

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Keys clients may present: PROXY_API_KEYS and the keys file together."""
        return self.proxy_api_keys + self.proxy_api_keys_file

    @cached_property
    def thinking(self) -> ThinkingPolicy:
        return ThinkingPolicy(self.disable_thinking, self.thinking_switch, self.think_output)

    @cached_property
    def policy(self) -> Policy:
        return Policy(self.thinking, self.model_params)

    @cached_property
    def backends(self) -> dict[str, Backend]:
        """Every backend by name, ``default`` (UPSTREAM_URL, or UPSTREAMS' own) first."""
        return with_default(self.upstreams, self.upstream_url)

    def connect_timeout(self, backend: Backend | None) -> float:
        """The backend's own limit, else UPSTREAM_CONNECT_TIMEOUT."""
        return (backend and backend.connect_timeout) or self.upstream_connect_timeout

    def read_timeout(self, backend: Backend | None) -> float:
        """The backend's own limit, else UPSTREAM_READ_TIMEOUT."""
        return (backend and backend.read_timeout) or self.upstream_read_timeout


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: they would reach the upstream as null."""
    raise ValueError(f"{name} is not valid JSON")


def _json_object(parse: Callable[[object], Any], error: type[ValueError]) -> Callable[[str], Any]:
    def parse_text(value: str) -> Any:
        try:
            raw = json.loads(value, parse_constant=_no_constant) if value.strip() else {}
        except ValueError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        try:
            return parse(raw)
        except error as exc:
            raise ValueError(str(exc)) from None

    return parse_text


parse_model_map = _json_object(ModelMap.parse, MappingError)


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


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _keys(value: str) -> tuple[str, ...]:
    keys = parse_keys(value)
    if not keys:
        raise ValueError("holds no key")
    return keys


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
    _Option(
        "UPSTREAMS",
        "upstreams",
        _json_object(parse_upstreams, ValueError),
        'JSON object: backend name -> URL or {"urls": [...], "api_key", "connect_timeout", "read_timeout"}',
    ),
    _Option(
        "MODEL_MAP",
        "model_map",
        parse_model_map,
        'JSON object: source id or /regex/ -> target id, {"model", "upstream"}, or a fallback list',
    ),
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
    _Option("LISTEN_HOST", "listen_host", _nonempty, "address to listen on (default 0.0.0.0)"),
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
    _Option(
        "PROXY_API_KEYS",
        "proxy_api_keys",
        _keys,
        "comma-separated keys clients must present (Authorization: Bearer, or api-key)",
    ),
    _Option(
        "PROXY_API_KEYS_FILE",
        "proxy_api_keys_file",
        read_keys_file,
        "file of client keys, one per line or comma-separated (e.g. a mounted Secret)",
    ),
    _Option(
        "UPSTREAM_API_KEY",
        "upstream_api_key",
        _nonempty,
        "key sent upstream as Authorization: Bearer, replacing the client's credential",
    ),
    _Option(
        "MAX_REQUEST_BYTES",
        "max_request_bytes",
        _int_between(1024, 2**40),
        "largest request body accepted, in bytes (default 33554432 = 32 MiB; beyond: 413)",
    ),
    _Option(
        "REQUEST_TIMEOUT",
        "request_timeout",
        _seconds(zero_ok=False),
        "total seconds for a non-streamed upstream call (default 600)",
    ),
    _Option(
        "UPSTREAM_MAX_CONNECTIONS",
        "upstream_max_connections",
        _int_between(0, 1_000_000),
        "upstream connections per worker, streams included; 0 = no limit (default 1024)",
    ),
    _Option(
        "RETRIES",
        "retries",
        _int_between(0, 10),
        "extra tries of the same target on a retryable failure, before the next fallback (default 0)",
    ),
    _Option(
        "UPSTREAM_COOLDOWN",
        "upstream_cooldown",
        _seconds(zero_ok=True),
        "seconds a replica that failed is skipped while others are healthy (default 10)",
    ),
    _Option(
        "RESPONSE_MODEL",
        "response_model",
        _choice("upstream", "requested"),
        "model named in answers: upstream (as served) or requested (the client's id) (default upstream)",
    ),
    _Option(
        "MODEL_PARAMS",
        "model_params",
        _json_object(ParamPolicy.parse, ParamsError),
        "JSON object: target id or /regex/ -> {defaults, overrides, drop}",
    ),
    _Option(
        "STREAM_KEEPALIVE_SECONDS",
        "stream_keepalive_seconds",
        _seconds(zero_ok=True),
        "send an SSE comment when a stream sent nothing for this long; 0 = never (default 15)",
    ),
    _Option(
        "CORS_ALLOW_ORIGINS",
        "cors_allow_origins",
        parse_origins,
        "browser origins (comma-separated, or *) the proxy answers CORS for (default none: passed through)",
    ),
    _Option(
        "CONFIG_FILE",
        "config_file",
        _nonempty,
        "YAML or JSON file of these settings (lower-case keys), re-read on change and SIGHUP",
    ),
    _Option(
        "CONFIG_POLL_SECONDS",
        "config_poll_seconds",
        _seconds(zero_ok=False),
        "how often the config file is checked for changes (default 2)",
    ),
)
FILE_KEYS = {option.env.lower(): option for option in OPTIONS if option.env != "CONFIG_FILE"}
RESTART_ONLY = frozenset(
    {
        "listen_host",
        "listen_port",
        "workers",
        "log_format",
        "log_level",
        "metrics_max_models",
        "max_request_bytes",
        "upstream_max_connections",
        "config_file",
        "demo",
    }
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
    commands = parser.add_subparsers(dest="command", metavar="[COMMAND]", help="default: serve")
    resolve = commands.add_parser("resolve", help="print where MODEL goes with these settings")
    resolve.add_argument("model", metavar="MODEL")
    commands.add_parser("check", help="validate the settings and exit 0, or 2 naming the problem")
    return parser


def command_of(argv: Sequence[str]) -> tuple[str, str | None]:
    """The command the CLI was given (``serve`` when none) and, for ``resolve``, its model."""
    args = _argument_parser().parse_args(list(argv))
    return args.command or "serve", getattr(args, "model", None)


def read_config_file(path: str) -> dict[str, str]:
    """The file's settings as text, keyed by field; YAML (a superset of JSON) or JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"CONFIG_FILE: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"CONFIG_FILE: {path!r} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"CONFIG_FILE: {path!r} is not valid YAML or JSON: {reason}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"CONFIG_FILE: {path!r} must hold a mapping of setting names to values")
    values: dict[str, str] = {}
    for key, value in loaded.items():
        option = FILE_KEYS.get(str(key))
        if option is None:
            raise ConfigError(f"CONFIG_FILE: {path!r}: unknown key {key!r}")
        if value is None:
            continue
        try:
            values[option.field] = _as_text(value)
        except TypeError as exc:
            raise ConfigError(f"CONFIG_FILE {option.field}: unsupported value: {exc}") from None
    return values


def _as_text(value: object) -> str:
    """File values may be typed; the parsers take the text an environment variable would hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def load_settings(environ: Mapping[str, str], argv: Sequence[str] = ()) -> Settings:
    """Build Settings from flags, environment and CONFIG_FILE; raise ConfigError naming the culprit."""
    args = vars(_argument_parser().parse_args(list(argv)))
    demo = bool(args.pop("demo"))
    values: dict[str, Any] = {"demo": demo}
    config_file = args["config_file"] or environ.get("CONFIG_FILE")
    from_file = read_config_file(config_file.strip()) if config_file and config_file.strip() else {}
    for option in OPTIONS:
        if args[option.field] is not None:
            name, raw = option.flag, args[option.field]
        elif option.env in environ:
            name, raw = option.env, environ[option.env]
        elif option.field in from_file:
            name, raw = f"CONFIG_FILE {option.field}", from_file[option.field]
        else:
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if demo:
        values.setdefault("model_map", parse_model_map(DEMO_MODEL_MAP))
        values["upstream_url"] = "http://127.0.0.1:0"
    if "upstream_url" not in values and "default" not in values.get("upstreams", {}):
        raise ConfigError("UPSTREAM_URL: required (or run with --demo for a built-in upstream)")
    settings = Settings(**{"upstream_url": None, **values})
    try:
        backends = settings.backends
    except ValueError as exc:
        raise ConfigError(f"UPSTREAMS: {exc}") from None
    try:
        settings.model_map.check_upstreams(backends)
    except MappingError as exc:
        raise ConfigError(f"MODEL_MAP: {exc}") from None
    return settings
