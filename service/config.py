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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from service import __version__
from service.backends import (
    BACKOFF_CAP,
    Backend,
    with_default,
)
from service.mapping import MappingError, ModelMap
from service.options import (
    FILE_KEYS,
    OPTIONS,
    SECTIONS,
    DuplicateKeyError,
    UniqueKeyLoader,
    parse_model_map,
)
from service.params import ParamPolicy
from service.payload import Policy
from service.reasoning import DEFAULT_TAGS, ThinkTags
from service.thinking import ThinkingPolicy

DEMO_MODEL_MAP = (
    '{"gpt-3.5-turbo-16k": "demo-qwen3-4b", "/gpt-4.*/": "demo-qwen3-4b", '
    '"text-embedding-3-small": "demo-bge-m3"}'
)


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
    think_tags: ThinkTags = DEFAULT_TAGS
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
    max_client_connections: int = 1024
    client_header_timeout: float = 10.0
    client_body_timeout: float = 120.0
    config_file: str | None = None
    config_poll_seconds: float = 2.0
    retries: int = 0
    upstream_cooldown: float = 10.0
    response_model: str = "upstream"
    stream_usage: str = "client"
    model_params: ParamPolicy = field(default_factory=ParamPolicy)
    max_model_id_length: int = 256
    max_sse_event_bytes: int = 1024 * 1024
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
        return Policy(
            self.thinking, self.model_params, self.max_model_id_length, self.stream_usage == "always"
        )

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


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-model-rerouter",
        description="Proxy for OpenAI-compatible APIs that rewrites the requested model id. "
        "Every flag can also be set by the environment variable named in its help.",
    )
    groups = {section: parser.add_argument_group(section.lower()) for section in SECTIONS}
    for option in OPTIONS:
        groups[option.section].add_argument(option.flag, metavar="VALUE", help=option.help_line)
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
            loaded = yaml.load(handle, Loader=UniqueKeyLoader)  # a SafeLoader
    except DuplicateKeyError as exc:
        raise ConfigError(f"CONFIG_FILE: {path!r}: {exc}") from None
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
    if demo:  # the demo checks no key: loopback only, unless asked
        values.setdefault("listen_host", "127.0.0.1")
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
