"""The settings table: every setting's variable, flag, default, example, description and parser.

One source for three readers: ``service.config`` parses the environment, flags and config file
with it, ``--help`` is generated from it, and so is the configuration reference
(``python -m service.config_docs``). A parser raises ValueError with a message that the loader
prefixes with the name at fault.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

import yaml

from service import cores
from service.access import parse_keys, read_keys_file
from service.backends import (
    parse_credential,
    parse_upstream_url,
    parse_upstreams,
)
from service.cors import parse_origins
from service.mapping import MappingError, ModelMap
from service.params import ParamPolicy, ParamsError
from service.patterns import compile_key, is_regex_key
from service.reasoning import ThinkTags

MAX_WORKERS = 256


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: they would reach the upstream as null."""
    raise ValueError(f"{name} is not valid JSON")


class DuplicateKeyError(ValueError):
    """The same key twice in one object: JSON parsers keep the last silently, we refuse."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    unique: dict[str, Any] = {}
    for key, value in pairs:
        if key in unique:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        unique[key] = value
    return unique


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping at any depth (a merge key's
    entries, ``<<: *base``, may still be overridden: that is what merging is for)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # unhashable: PyYAML's own error follows
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise DuplicateKeyError(f"duplicate key {key!r} (line {line})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _json_object(parse: Callable[[object], Any], error: type[ValueError]) -> Callable[[str], Any]:
    def parse_text(value: str) -> Any:
        try:
            text = value.strip()
            raw = json.loads(value, parse_constant=_no_constant, object_pairs_hook=_unique) if text else {}
        except DuplicateKeyError:
            raise
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
    return compile_key(stripped)


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


def _workers(value: str) -> int:
    """A number, or ``auto``: one worker per CPU the process may use (service/cores.py)."""
    if value.strip().lower() == "auto":
        return min(cores.usable_cpus(), MAX_WORKERS)
    if not value.strip().isdigit():
        raise ValueError(f"expected a whole number or auto, got {value!r}")
    return _int_between(1, MAX_WORKERS)(value)


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


SECTIONS = (
    "Upstreams and routing",
    "Thinking control",
    "Server",
    "Timeouts and limits",
    "Security",
    "Logging and metrics",
    "Configuration file",
)


@dataclass(frozen=True)
class _Option:
    """One setting: what the parser reads, what --help says and what the reference page lists.

    ``help`` is plain text (no Markdown: --help shows it too); ``default`` is the value as it would
    be written (None: unset), ``example`` a value worth copying, ``see`` a page of the docs
    (``routing.md#backends``) that says more.
    """

    env: str
    field: str
    parse: Callable[[str], Any]
    help: str
    _: KW_ONLY
    default: str | None
    example: str
    section: str
    see: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def help_line(self) -> str:
        """What --help shows for it: the description, its default, its variable."""
        default = "" if self.default is None else f" (default {self.default})"
        return f"{self.help}{default} [{self.env}]"


_ROUTING, _THINKING, _SERVER, _LIMITS, _SECURITY, _OBSERVE, _FILE = SECTIONS

OPTIONS = (
    _Option(
        "UPSTREAM_URL",
        "upstream_url",
        parse_upstream_url,
        "Base URL of the model server (http or https), the backend named default. A trailing /v1 is "
        "optional; a path prefix is kept. Required unless UPSTREAMS defines default, or with --demo.",
        default=None,
        example="http://localhost:8000",
        section=_ROUTING,
        see="routing.md#backends",
    ),
    _Option(
        "UPSTREAMS",
        "upstreams",
        _json_object(parse_upstreams, ValueError),
        "JSON object of named backends: name -> URL, or "
        '{"urls": [...], "api_key", "connect_timeout", "read_timeout"}.',
        default="{}",
        example='{"big": {"urls": ["http://a:8000", "http://b:8000"]}}',
        section=_ROUTING,
        see="routing.md#backends",
    ),
    _Option(
        "MODEL_MAP",
        "model_map",
        parse_model_map,
        "JSON object: requested id or /regex/ -> target id, "
        '{"model", "upstream", "thinking", "think_output", "params"}, or a list of those tried in '
        "order. Unmatched ids pass through.",
        default="{}",
        example='{"gpt-3.5-turbo-16k": "qwen3-4b", "/gpt-4.*/": "qwen3-14b"}',
        section=_ROUTING,
        see="routing.md#model-mapping",
    ),
    _Option(
        "DISABLE_THINKING",
        "disable_thinking",
        parse_thinking_scope,
        "Switch thinking off: true or false for every model, or a /regex/ the whole target model id "
        "must match.",
        default="false",
        example="/qwen3.*/",
        section=_THINKING,
        see="thinking.md",
    ),
    _Option(
        "THINKING_SWITCH",
        "thinking_switch",
        _choice("suffix", "template", "both"),
        "How thinking is switched off: suffix (append /no_think), template "
        "(chat_template_kwargs.enable_thinking=false) or both.",
        default="suffix",
        example="template",
        section=_THINKING,
        see="thinking.md#the-switch",
    ),
    _Option(
        "THINK_OUTPUT",
        "think_output",
        _choice("strip", "keep", "reasoning"),
        "A leading <think> block in answers: strip it, keep it, or move it to reasoning_content. "
        "Unset: strip where thinking is disabled, keep elsewhere.",
        default=None,
        example="reasoning",
        section=_THINKING,
        see="thinking.md#the-output",
    ),
    _Option(
        "LISTEN_HOST",
        "listen_host",
        _nonempty,
        "Address to listen on; with --demo, 127.0.0.1 unless set.",
        default="0.0.0.0",
        example="127.0.0.1",
        section=_SERVER,
    ),
    _Option(
        "LISTEN_PORT",
        "listen_port",
        _int_between(0, 65535),
        "Port to listen on, 0-65535.",
        default="1234",
        example="8080",
        section=_SERVER,
    ),
    _Option(
        "WORKERS",
        "workers",
        _workers,
        "Worker processes, 1-256, or auto: one per usable CPU (affinity and cgroup CPU limit).",
        default="1",
        example="auto",
        section=_SERVER,
        see="deployment.md#workers-and-cpu-limits",
    ),
    _Option(
        "LOG_FORMAT",
        "log_format",
        _choice("json", "console"),
        "Log lines as json or console (human-readable key=value).",
        default="json",
        example="console",
        section=_OBSERVE,
        see="logging.md",
    ),
    _Option(
        "THINK_TAGS",
        "think_tags",
        ThinkTags.parse,
        "Comma-separated tag names that open a leading reasoning block; each block ends with its "
        "own closing tag.",
        default="think",
        example="think,thinking,reasoning",
        section=_THINKING,
        see="thinking.md#other-think-tags",
    ),
    _Option(
        "LOG_LEVEL",
        "log_level",
        _choice("debug", "info", "warning", "error", "critical"),
        "Lowest level logged; request events are info, so warning hides them.",
        default="info",
        example="warning",
        section=_OBSERVE,
        see="logging.md",
    ),
    _Option(
        "METRICS_MAX_MODELS",
        "metrics_max_models",
        _int_between(1, 100_000),
        "Distinct model label values per worker before new ids are reported as other.",
        default="100",
        example="500",
        section=_OBSERVE,
        see="metrics.md#label-cap",
    ),
    _Option(
        "UPSTREAM_CONNECT_TIMEOUT",
        "upstream_connect_timeout",
        _seconds(zero_ok=False),
        "Seconds to open a connection to the upstream; then 504.",
        default="10",
        example="3",
        section=_LIMITS,
    ),
    _Option(
        "UPSTREAM_READ_TIMEOUT",
        "upstream_read_timeout",
        _seconds(zero_ok=False),
        "Seconds the upstream may stay silent, before its headers and between any two chunks, "
        "streams included. Streams have no total limit.",
        default="600",
        example="1800",
        section=_LIMITS,
    ),
    _Option(
        "SHUTDOWN_GRACE",
        "shutdown_grace",
        _seconds(zero_ok=True),
        "On SIGTERM, seconds /readyz answers 503 while new requests are still served.",
        default="5",
        example="10",
        section=_SERVER,
        see="reliability.md#graceful-shutdown",
    ),
    _Option(
        "SHUTDOWN_TIMEOUT",
        "shutdown_timeout",
        _seconds(zero_ok=True),
        "Then, seconds requests and streams in flight may take to finish.",
        default="30",
        example="300",
        section=_SERVER,
        see="reliability.md#graceful-shutdown",
    ),
    _Option(
        "PROXY_API_KEYS",
        "proxy_api_keys",
        _keys,
        "Comma-separated keys clients must present (Authorization: Bearer, api-key or x-api-key). "
        "Unset: no check.",
        default=None,
        example="key-one,key-two",
        section=_SECURITY,
        see="security.md#client-keys",
    ),
    _Option(
        "PROXY_API_KEYS_FILE",
        "proxy_api_keys_file",
        read_keys_file,
        "File of client keys, one per line or comma-separated (e.g. a mounted Secret); re-read on SIGHUP.",
        default=None,
        example="/etc/rerouter/keys",
        section=_SECURITY,
        see="security.md#client-keys",
    ),
    _Option(
        "UPSTREAM_API_KEY",
        "upstream_api_key",
        parse_credential,
        "Key sent upstream as Authorization: Bearer (and x-api-key on /v1/messages), replacing the "
        "client's credential.",
        default=None,
        example="sk-...",
        section=_SECURITY,
        see="security.md#the-upstream-key",
    ),
    _Option(
        "MAX_REQUEST_BYTES",
        "max_request_bytes",
        _int_between(1024, 2**40),
        "Largest request body accepted, in bytes (32 MiB by default); a larger one gets 413.",
        default="33554432",
        example="104857600",
        section=_LIMITS,
    ),
    _Option(
        "REQUEST_TIMEOUT",
        "request_timeout",
        _seconds(zero_ok=False),
        "Total seconds for an upstream call that is not streamed; then 504.",
        default="600",
        example="120",
        section=_LIMITS,
    ),
    _Option(
        "UPSTREAM_MAX_CONNECTIONS",
        "upstream_max_connections",
        _int_between(0, 1_000_000),
        "Upstream connections per worker, a stream holding one throughout; 0 means no limit.",
        default="1024",
        example="4096",
        section=_LIMITS,
    ),
    _Option(
        "MAX_CLIENT_CONNECTIONS",
        "max_client_connections",
        _int_between(1, 1_000_000),
        "Open client connections per worker; past it a new one gets 503 and is closed.",
        default="1024",
        example="4096",
        section=_LIMITS,
        see="security.md#limits-and-their-settings",
    ),
    _Option(
        "CLIENT_HEADER_TIMEOUT",
        "client_header_timeout",
        _seconds(zero_ok=False),
        "Seconds for a whole request head, from the connection's start or a later request's "
        "first byte; then 408. A trickle of bytes does not extend it.",
        default="10",
        example="5",
        section=_LIMITS,
        see="security.md#limits-and-their-settings",
    ),
    _Option(
        "CLIENT_BODY_TIMEOUT",
        "client_body_timeout",
        _seconds(zero_ok=False),
        "Seconds for a whole request body, from the end of its head; then 408. A trickle of "
        "bytes does not extend it.",
        default="120",
        example="300",
        section=_LIMITS,
        see="security.md#limits-and-their-settings",
    ),
    _Option(
        "RETRIES",
        "retries",
        _int_between(0, 10),
        "Extra tries of the same target after a failure before any byte reached the client, before "
        "the next fallback.",
        default="0",
        example="2",
        section=_ROUTING,
        see="routing.md#fallbacks-and-retries",
    ),
    _Option(
        "UPSTREAM_COOLDOWN",
        "upstream_cooldown",
        _seconds(zero_ok=True),
        "Seconds a replica that failed is skipped while its backend has healthy ones; 0: never.",
        default="10",
        example="30",
        section=_ROUTING,
        see="routing.md#replicas",
    ),
    _Option(
        "RESPONSE_MODEL",
        "response_model",
        _choice("upstream", "requested"),
        "Model named in answers: upstream (as served) or requested (the client's id).",
        default="upstream",
        example="requested",
        section=_ROUTING,
        see="routing.md#honest-model-names",
    ),
    _Option(
        "STREAM_USAGE",
        "stream_usage",
        _choice("client", "always"),
        "Usage chunk of streamed completions: client (when the client asks) or always (asked for "
        "every stream so tokens are counted, hidden from clients that did not ask; the upstream "
        "must accept stream_options).",
        default="client",
        example="always",
        section=_OBSERVE,
        see="metrics.md#tokens-per-model",
    ),
    _Option(
        "MODEL_PARAMS",
        "model_params",
        _json_object(ParamPolicy.parse, ParamsError),
        "JSON object: target id or /regex/ -> {defaults, overrides, drop} for its request bodies.",
        default="{}",
        example='{"/qwen3-.*/": {"defaults": {"temperature": 0.6}, "drop": ["logit_bias"]}}',
        section=_ROUTING,
        see="routing.md#parameters-per-model",
    ),
    _Option(
        "MAX_MODEL_ID_LENGTH",
        "max_model_id_length",
        _int_between(16, 4096),
        "Longest model id accepted, in characters, 16-4096; a longer one gets 400 invalid_model.",
        default="256",
        example="128",
        section=_LIMITS,
        see="security.md#limits-and-their-settings",
    ),
    _Option(
        "MAX_SSE_EVENT_BYTES",
        "max_sse_event_bytes",
        _int_between(1024, 2**30),
        "Largest stream event, in bytes, the think and rename filters hold; from a larger one on, "
        "the stream is relayed as it comes, with a warning.",
        default="1048576",
        example="4194304",
        section=_LIMITS,
        see="security.md#limits-and-their-settings",
    ),
    _Option(
        "STREAM_KEEPALIVE_SECONDS",
        "stream_keepalive_seconds",
        _seconds(zero_ok=True),
        "Seconds a stream may send the client nothing (think text withheld, a slow first token) "
        "before an SSE comment keeps it alive; 0 = never.",
        default="15",
        example="10",
        section=_SERVER,
        see="reliability.md#keep-alive-comments-on-quiet-streams",
    ),
    _Option(
        "CORS_ALLOW_ORIGINS",
        "cors_allow_origins",
        parse_origins,
        "Browser origins (comma-separated, or *) the proxy answers CORS for itself. Unset: CORS "
        "preflights and headers pass through to and from the upstream.",
        default=None,
        example="https://chat.example.com",
        section=_SECURITY,
        see="endpoints.md#cors-for-browser-clients",
    ),
    _Option(
        "CONFIG_FILE",
        "config_file",
        _nonempty,
        "YAML or JSON file of these settings (lower-case keys), re-read on change and on SIGHUP.",
        default=None,
        example="/etc/rerouter/config.yaml",
        section=_FILE,
        see="configuration.md#configuration-file-and-reloads",
    ),
    _Option(
        "CONFIG_POLL_SECONDS",
        "config_poll_seconds",
        _seconds(zero_ok=False),
        "How often each worker checks the configuration file for changes, in seconds.",
        default="2",
        example="10",
        section=_FILE,
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
