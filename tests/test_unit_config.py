"""load_settings: environment and flags, defaults, normalisation, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import (
    DEMO_MODEL_MAP,
    ConfigError,
    Settings,
    load_settings,
    read_config_file,
)
from service.mapping import ModelMap
from service.options import FILE_KEYS, OPTIONS, RESTART_ONLY, parse_upstream_url

BASE = {"UPSTREAM_URL": "http://upstream.test:8000"}


def test_defaults() -> None:
    loaded = load_settings(BASE)
    assert loaded.upstream_url == "http://upstream.test:8000"
    assert loaded.listen_port == 1234
    assert loaded.listen_host == "0.0.0.0"
    assert loaded.workers == 1
    assert loaded.log_format == "json"
    assert loaded.log_level == "info"
    assert loaded.metrics_max_models == 100
    assert loaded.disable_thinking is False
    assert loaded.demo is False
    assert loaded.upstream_connect_timeout == 10.0
    assert loaded.upstream_read_timeout == 600.0
    assert loaded.model_map.resolve("gpt-4").rule is None


def test_settings_are_frozen() -> None:
    loaded = load_settings(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.listen_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "given_url",
    [
        "http://h:8000",
        "http://h:8000/",
        "http://h:8000/v1",
        "http://h:8000/v1/",
        "  http://h:8000/v1  ",
    ],
)
def test_upstream_url_with_or_without_v1_and_slash_normalises_to_one_base(given_url: str) -> None:
    loaded = load_settings({"UPSTREAM_URL": given_url})
    assert loaded.upstream_url == "http://h:8000"
    assert loaded.backends["default"].urls == ("http://h:8000",)


@pytest.mark.parametrize(
    "given_url", ["https://gw.example/openai", "https://gw.example/openai/", "https://gw.example/openai/v1/"]
)
def test_a_sub_path_base_keeps_its_prefix(given_url: str) -> None:
    loaded = load_settings({"UPSTREAM_URL": given_url})
    assert loaded.upstream_url == "https://gw.example/openai"
    assert loaded.backends["default"].urls == ("https://gw.example/openai",)


@settings(max_examples=40, deadline=None)
@given(prefix=st.lists(st.text(alphabet="abcxyz019-_.~", min_size=1, max_size=8), max_size=3))
def test_normalisation_is_the_same_with_and_without_v1(prefix: list[str]) -> None:
    base = "http://h:1" + "".join(f"/{segment}" for segment in prefix)
    normalised = {parse_upstream_url(u) for u in (base, base + "/", base + "/v1", base + "/v1/")}
    assert normalised == {base}


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"MODEL_MAP": "{not json"}, "MODEL_MAP"),
        ({"MODEL_MAP": '["gpt-4"]'}, "MODEL_MAP"),
        ({"MODEL_MAP": '{"/gpt-(4/": "x"}'}, "MODEL_MAP"),
        ({"MODEL_MAP": '{"gpt-4": ""}'}, "MODEL_MAP"),
        ({"UPSTREAM_URL": "not a url"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "ftp://h/"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "http://h:99999"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "http://h/?a=1"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "http://[::1"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": ""}, "UPSTREAM_URL"),
        ({"LISTEN_PORT": "70000"}, "LISTEN_PORT"),
        ({"LISTEN_PORT": "-1"}, "LISTEN_PORT"),
        ({"LISTEN_PORT": "http"}, "LISTEN_PORT"),
        ({"LISTEN_HOST": "  "}, "LISTEN_HOST"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"WORKERS": "two"}, "WORKERS"),
        ({"DISABLE_THINKING": "maybe"}, "DISABLE_THINKING"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"METRICS_MAX_MODELS": "0"}, "METRICS_MAX_MODELS"),
        ({"UPSTREAM_CONNECT_TIMEOUT": "0"}, "UPSTREAM_CONNECT_TIMEOUT"),
        ({"UPSTREAM_READ_TIMEOUT": "-5"}, "UPSTREAM_READ_TIMEOUT"),
        ({"UPSTREAM_READ_TIMEOUT": "inf"}, "UPSTREAM_READ_TIMEOUT"),
        ({"UPSTREAM_READ_TIMEOUT": "nan"}, "UPSTREAM_READ_TIMEOUT"),
    ],
)
def test_bad_values_raise_config_error_starting_with_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **env})
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        (" Yes ", True),
        ("on", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (" true ", True),
        ("", False),
    ],
)
def test_boolean_spellings(raw: str, expected: bool) -> None:
    assert load_settings({**BASE, "DISABLE_THINKING": raw}).disable_thinking is expected


def test_values_are_parsed_to_their_types() -> None:
    loaded = load_settings(
        {
            **BASE,
            "LISTEN_HOST": " 127.0.0.1 ",
            "LISTEN_PORT": " 8080 ",
            "WORKERS": "4",
            "LOG_FORMAT": "CONSOLE",
            "LOG_LEVEL": "Debug",
            "METRICS_MAX_MODELS": "7",
            "UPSTREAM_CONNECT_TIMEOUT": "1.5",
            "UPSTREAM_READ_TIMEOUT": "30",
            "MODEL_MAP": '{"a": "b", "/c.*/": "d"}',
        }
    )
    assert loaded.listen_host == "127.0.0.1"
    assert loaded.listen_port == 8080
    assert loaded.workers == 4
    assert loaded.log_format == "console"
    assert loaded.log_level == "debug"
    assert loaded.metrics_max_models == 7
    assert loaded.upstream_connect_timeout == 1.5
    assert loaded.upstream_read_timeout == 30.0
    assert loaded.model_map.resolve("a").target == "b"
    assert loaded.model_map.resolve("cx").target == "d"


def test_empty_model_map_is_an_empty_map() -> None:
    assert load_settings({**BASE, "MODEL_MAP": "  "}).model_map == ModelMap.parse({})


def test_flags_win_over_the_environment() -> None:
    env = {**BASE, "LISTEN_PORT": "6", "WORKERS": "3", "MODEL_MAP": '{"a": "from-env"}'}
    loaded = load_settings(
        env,
        [
            "--listen-port",
            "5",
            "--workers",
            "2",
            "--model-map",
            '{"a": "from-flag"}',
            "--upstream-url",
            "http://f:1/v1",
        ],
    )
    assert loaded.listen_port == 5
    assert loaded.workers == 2
    assert loaded.model_map.resolve("a").target == "from-flag"
    assert loaded.upstream_url == "http://f:1"


def test_a_flag_hides_a_bad_environment_value() -> None:
    loaded = load_settings({**BASE, "LISTEN_PORT": "not-a-port"}, ["--listen-port", "9"])
    assert loaded.listen_port == 9


def test_a_bad_flag_is_named_as_the_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "LISTEN_PORT": "6"}, ["--listen-port", "70000"])
    assert str(caught.value).startswith("--listen-port: ")


def test_every_variable_has_a_matching_flag() -> None:
    env = {
        "UPSTREAM_URL": "http://e:1",
        "DISABLE_THINKING": "false",
        "LISTEN_HOST": "10.0.0.1",
        "LISTEN_PORT": "1",
        "WORKERS": "1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "METRICS_MAX_MODELS": "1",
        "UPSTREAM_CONNECT_TIMEOUT": "1",
        "UPSTREAM_READ_TIMEOUT": "1",
    }
    flags = [
        *("--upstream-url", "http://f:2"),
        *("--disable-thinking", "true"),
        *("--listen-host", "10.0.0.2"),
        *("--listen-port", "2"),
        *("--workers", "2"),
        *("--log-format", "console"),
        *("--log-level", "error"),
        *("--metrics-max-models", "2"),
        *("--upstream-connect-timeout", "2"),
        *("--upstream-read-timeout", "2"),
    ]
    loaded = load_settings(env, flags)
    assert loaded == Settings(
        upstream_url="http://f:2",
        disable_thinking=True,
        listen_host="10.0.0.2",
        listen_port=2,
        workers=2,
        log_format="console",
        log_level="error",
        metrics_max_models=2,
        upstream_connect_timeout=2.0,
        upstream_read_timeout=2.0,
    )


def test_missing_upstream_url_is_an_error_without_demo() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({})
    assert str(caught.value).startswith("UPSTREAM_URL: ")
    assert "--demo" in str(caught.value)


def test_demo_supplies_an_upstream_and_a_default_map() -> None:
    loaded = load_settings({}, ["--demo"])
    assert loaded.demo is True
    assert loaded.upstream_url.startswith("http://127.0.0.1")
    assert loaded.model_map.resolve("gpt-3.5-turbo-16k").target == "demo-qwen3-4b"
    assert loaded.model_map.resolve("gpt-4o").target == "demo-qwen3-4b"
    assert loaded.model_map.resolve("other").rule is None
    assert DEMO_MODEL_MAP  # the default map the demo uses is non-empty


def test_demo_keeps_a_model_map_given_by_the_operator() -> None:
    loaded = load_settings({"MODEL_MAP": '{"mine": "theirs"}'}, ["--demo"])
    assert loaded.model_map.resolve("mine").target == "theirs"
    assert loaded.model_map.resolve("gpt-3.5-turbo-16k").rule is None


def test_unknown_flag_exits_2_through_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(BASE, ["--no-such-flag"])
    assert caught.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


# --- security, limits and the configuration file --------------------------------------------------------


def test_defaults_of_the_security_and_limit_settings() -> None:
    loaded = load_settings(BASE)
    assert loaded.api_keys == ()
    assert loaded.upstream_api_key is None
    assert loaded.max_request_bytes == 32 * 1024 * 1024
    assert loaded.request_timeout == 600.0
    assert loaded.upstream_max_connections == 1024
    assert loaded.config_file is None
    assert loaded.config_poll_seconds == 2.0
    assert loaded.max_model_id_length == 256
    assert loaded.max_sse_event_bytes == 1024 * 1024
    assert loaded.policy.max_model_id == 256


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PROXY_API_KEYS": " , ,"}, "PROXY_API_KEYS"),
        ({"PROXY_API_KEYS_FILE": "/nonexistent/keys"}, "PROXY_API_KEYS_FILE"),
        ({"UPSTREAM_API_KEY": "  "}, "UPSTREAM_API_KEY"),
        ({"MAX_REQUEST_BYTES": "1023"}, "MAX_REQUEST_BYTES"),
        ({"MAX_REQUEST_BYTES": "32MiB"}, "MAX_REQUEST_BYTES"),
        ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT"),
        ({"REQUEST_TIMEOUT": "inf"}, "REQUEST_TIMEOUT"),
        ({"UPSTREAM_MAX_CONNECTIONS": "-1"}, "UPSTREAM_MAX_CONNECTIONS"),
        ({"CONFIG_POLL_SECONDS": "0"}, "CONFIG_POLL_SECONDS"),
        ({"CONFIG_FILE": "/nonexistent/config.yaml"}, "CONFIG_FILE"),
        ({"UPSTREAM_API_KEY": "sk-a\nb"}, "UPSTREAM_API_KEY"),
        ({"UPSTREAM_API_KEY": "sk-a\x00b"}, "UPSTREAM_API_KEY"),
        ({"UPSTREAM_URL": "http://user:pass@upstream:8000"}, "UPSTREAM_URL"),
        ({"UPSTREAMS": '{"b": {"urls": ["http://u:p@b:1"]}}'}, "UPSTREAMS"),
        ({"MAX_MODEL_ID_LENGTH": "15"}, "MAX_MODEL_ID_LENGTH"),
        ({"MAX_SSE_EVENT_BYTES": "1023"}, "MAX_SSE_EVENT_BYTES"),
    ],
)
def test_bad_security_and_limit_values_name_their_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **env})
    assert str(caught.value).startswith(f"{name}: ")
    assert "\n" not in str(caught.value)


def test_client_keys_from_the_variable_and_the_file_add_up(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file-1\nsk-file-2\n")
    loaded = load_settings({**BASE, "PROXY_API_KEYS": "sk-env-1, sk-env-2", "PROXY_API_KEYS_FILE": str(keys)})
    assert loaded.api_keys == ("sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2")
    assert load_settings({**BASE, "PROXY_API_KEYS_FILE": str(keys)}).api_keys == ("sk-file-1", "sk-file-2")
    assert load_settings({**BASE, "PROXY_API_KEYS": "sk-env-1"}).api_keys == ("sk-env-1",)


def test_keys_never_show_in_the_settings_repr_or_a_keys_file_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-in-file-secret\n")
    loaded = load_settings(
        {
            **BASE,
            "PROXY_API_KEYS": "sk-env-secret",
            "PROXY_API_KEYS_FILE": str(keys),
            "UPSTREAM_API_KEY": "sk-upstream-secret",
        }
    )
    shown = repr(loaded) + str(loaded)
    for secret in ("sk-env-secret", "sk-in-file-secret", "sk-upstream-secret"):
        assert secret not in shown
    keys.write_text(" ,\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "PROXY_API_KEYS_FILE": str(keys)})
    assert str(caught.value).startswith("PROXY_API_KEYS_FILE: ")


@settings(max_examples=100, deadline=None)
@given(
    request_timeout=st.floats(0.001, 1e7),
    connect=st.floats(0.001, 1e7),
    read=st.floats(0.001, 1e7),
)
def test_sanics_response_timeout_exceeds_every_upstream_limit(
    request_timeout: float, connect: float, read: float
) -> None:
    """Sanic's own response timeout also counts gaps inside a stream, so it must never fire
    before REQUEST_TIMEOUT or a connect plus the longest silence the upstream is allowed."""
    loaded = Settings(
        upstream_url="http://h:1",
        request_timeout=request_timeout,
        upstream_connect_timeout=connect,
        upstream_read_timeout=read,
    )
    assert isinstance(loaded.response_timeout, int)
    assert loaded.response_timeout > request_timeout
    assert loaded.response_timeout > connect + read


CONFIG_YAML = r"""# as mounted from a ConfigMap
upstream_url: http://file-upstream:8000/v1
model_map:
  gpt-4o: qwen3-32b
  /llama-(\d+)b/: llama-\1-served
disable_thinking: true
thinking_switch: template
listen_port: 8080
workers: 2
request_timeout: 1.5
upstream_read_timeout: 30
proxy_api_keys:
  - sk-list-1
  - sk-list-2
upstream_api_key: sk-upstream
max_request_bytes: 4096
upstream_max_connections: 0
log_level: DEBUG
config_poll_seconds: 0.5
shutdown_grace: 0
"""


def check_file_settings(loaded: Settings) -> None:
    assert loaded.upstream_url == "http://file-upstream:8000"
    assert loaded.model_map.resolve("gpt-4o").target == "qwen3-32b"
    assert loaded.model_map.resolve("llama-70b").target == "llama-70-served"
    assert loaded.disable_thinking is True
    assert loaded.thinking_switch == "template"
    assert loaded.listen_port == 8080
    assert loaded.workers == 2
    assert loaded.request_timeout == 1.5
    assert loaded.upstream_read_timeout == 30.0
    assert loaded.api_keys == ("sk-list-1", "sk-list-2")
    assert loaded.upstream_api_key == "sk-upstream"
    assert loaded.max_request_bytes == 4096
    assert loaded.upstream_max_connections == 0
    assert loaded.log_level == "debug"
    assert loaded.config_poll_seconds == 0.5
    assert loaded.shutdown_grace == 0.0


def test_a_yaml_config_file_with_typed_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML)
    loaded = load_settings({"CONFIG_FILE": str(path)})
    check_file_settings(loaded)
    assert loaded.config_file == str(path)


def test_a_json_config_file_with_typed_values(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(yaml.safe_load(CONFIG_YAML), indent=2))
    check_file_settings(load_settings({"CONFIG_FILE": str(path)}))


def test_read_config_file_gives_the_text_a_variable_would_hold(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "disable_thinking: false\nlisten_port: 8080\nrequest_timeout: 2.5\n"
        "proxy_api_keys: [a, b]\nmodel_map: {x: y}\nthink_output: ~\n"
    )
    assert read_config_file(str(path)) == {
        "disable_thinking": "false",
        "listen_port": "8080",
        "request_timeout": "2.5",
        "proxy_api_keys": "a,b",
        "model_map": '{"x": "y"}',
    }


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "~\n", "---\n"])
def test_an_empty_config_file_sets_nothing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert read_config_file(str(path)) == {}
    loaded = load_settings({**BASE, "CONFIG_FILE": str(path)})
    assert dataclasses.replace(loaded, config_file=None) == load_settings(BASE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("listen_port: 1\nlisten_prot: 2\n", "unknown key 'listen_prot'", id="typo"),
        pytest.param("LISTEN_PORT: 1\n", "unknown key 'LISTEN_PORT'", id="upper-case"),
        pytest.param("config_file: /other.yaml\n", "unknown key 'config_file'", id="config-file-itself"),
        pytest.param("demo: true\n", "unknown key 'demo'", id="demo"),
        pytest.param("- listen_port\n", "must hold a mapping", id="list"),
        pytest.param("just text\n", "must hold a mapping", id="scalar"),
        pytest.param("42\n", "must hold a mapping", id="number"),
        pytest.param("listen_port: [1\n", "not valid YAML or JSON", id="yaml-syntax"),
        pytest.param('{"listen_port": 1', "not valid YAML or JSON", id="json-syntax"),
        pytest.param("a: 1\na: 2\n\t- x", "not valid YAML or JSON", id="tab"),
    ],
)
def test_a_config_file_that_cannot_be_used_is_a_one_line_error_naming_the_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "CONFIG_FILE": str(path)})
    message = str(caught.value)
    assert message.startswith("CONFIG_FILE: ")
    assert expected in message
    assert "\n" not in message


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(ConfigError) as caught:
            read_config_file(str(path))
        assert str(caught.value).startswith("CONFIG_FILE: cannot read ")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"model_map: {a: caf\xe9}\n", id="latin-1-not-utf-8"),
        pytest.param(b"model_map: {a: 2024-05-13}\n", id="date-inside-a-mapping"),
        pytest.param(b"model_map: {a: !!binary aGk=}\n", id="binary-inside-a-mapping"),
    ],
)
def test_a_file_yaml_can_read_but_not_as_settings_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    """Anything but ConfigError escapes the CLI's one-line message (a traceback at start-up) and
    the reload loop's handler (which then stops reloading in that worker for good)."""
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "CONFIG_FILE": str(path)})
    assert str(caught.value).startswith("CONFIG_FILE")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("listen_port: 70000", "listen_port"),
        ("workers: 0", "workers"),
        ("request_timeout: -1", "request_timeout"),
        ("max_request_bytes: lots", "max_request_bytes"),
        ("model_map: {'/gpt-(/': x}", "model_map"),
        ("model_map: [a, b]", "model_map"),
        ("disable_thinking: maybe", "disable_thinking"),
        ("upstream_url: ftp://x", "upstream_url"),
        ("proxy_api_keys: []", "proxy_api_keys"),
        ("proxy_api_keys_file: /nonexistent/keys", "proxy_api_keys_file"),
        ("upstream_api_key: ''", "upstream_api_key"),
    ],
)
def test_a_bad_value_in_the_file_is_named_config_file_and_key(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "config.yaml"
    upstream = "" if key == "upstream_url" else "upstream_url: http://h:1\n"
    path.write_text(upstream + line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"CONFIG_FILE": str(path)})
    assert str(caught.value).startswith(f"CONFIG_FILE {key}: ")
    assert "\n" not in str(caught.value)


def test_precedence_flag_over_environment_over_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("listen_port: 3\nworkers: 3\nrequest_timeout: 3\nmodel_map: {a: from-file}\n")
    env = {**BASE, "CONFIG_FILE": str(path), "LISTEN_PORT": "2", "WORKERS": "2"}
    loaded = load_settings(env, ["--listen-port", "1"])
    assert loaded.listen_port == 1  # flag, over environment and file
    assert loaded.workers == 2  # environment, over file
    assert loaded.request_timeout == 3.0  # file only
    assert loaded.model_map.resolve("a").target == "from-file"
    assert (
        load_settings({**env, "MODEL_MAP": '{"a": "from-env"}'}).model_map.resolve("a").target == "from-env"
    )


def test_the_environment_hides_a_bad_file_value_and_a_flag_hides_a_bad_environment_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("listen_port: not-a-port\n")
    env = {**BASE, "CONFIG_FILE": str(path)}
    assert load_settings({**env, "LISTEN_PORT": "7"}).listen_port == 7
    assert load_settings({**env, "LISTEN_PORT": "bad"}, ["--listen-port", "8"]).listen_port == 8


def test_the_config_file_path_comes_from_the_flag_before_the_environment(tmp_path: Path) -> None:
    by_flag, by_env = tmp_path / "flag.yaml", tmp_path / "env.yaml"
    by_flag.write_text("listen_port: 11\n")
    by_env.write_text("listen_port: 22\n")
    env = {**BASE, "CONFIG_FILE": str(by_env)}
    assert load_settings(env).listen_port == 22
    assert load_settings(env, ["--config-file", str(by_flag)]).listen_port == 11


def test_every_file_key_is_a_variable_in_lower_case() -> None:
    assert set(FILE_KEYS) == {option.env.lower() for option in OPTIONS} - {"config_file"}
    assert {option.field for option in OPTIONS} - {"config_file"} == set(FILE_KEYS)
    restart_only = RESTART_ONLY
    assert restart_only <= {field.name for field in dataclasses.fields(Settings)}


# --- issue 7: backends, fallbacks, response model, parameter policy ---------------------------


def test_upstreams_add_named_backends_next_to_the_default() -> None:
    loaded = load_settings(
        {**BASE, "UPSTREAMS": '{"big": {"urls": ["http://a:1/v1", "http://b:1"], "read_timeout": 5}}'}
    )
    assert list(loaded.backends) == ["default", "big"]
    assert loaded.backends["default"].urls == ("http://upstream.test:8000",)
    assert loaded.backends["big"].urls == ("http://a:1", "http://b:1")
    assert loaded.read_timeout(loaded.backends["big"]) == 5.0
    assert loaded.read_timeout(loaded.backends["default"]) == loaded.upstream_read_timeout


def test_upstreams_may_define_the_default_instead_of_upstream_url() -> None:
    loaded = load_settings({"UPSTREAMS": '{"default": {"urls": ["http://a:1", "http://b:1"]}}'})
    assert loaded.upstream_url is None
    assert loaded.backends["default"].urls == ("http://a:1", "http://b:1")


@pytest.mark.parametrize(
    ("environ", "start"),
    [
        (
            {"UPSTREAMS": '{"default": "http://a:1"}'},
            "UPSTREAMS: key 'default': already defined by UPSTREAM_URL",
        ),
        ({"UPSTREAMS": '{"big": "ftp://a"}'}, "UPSTREAMS: key 'big': "),
        ({"UPSTREAMS": "[1]"}, "UPSTREAMS: must be a JSON object"),
        ({"UPSTREAMS": "{"}, "UPSTREAMS: invalid JSON"),
        (
            {"MODEL_MAP": '{"gpt-4o": {"model": "m", "upstream": "big"}}'},
            "MODEL_MAP: key 'gpt-4o': unknown upstream 'big'",
        ),
        (
            {"MODEL_MAP": '{"/gpt-(.*)/": ["a", {"model": "b", "upstream": "nope"}]}'},
            "MODEL_MAP: key '/gpt-(.*)/'",
        ),
        ({"RETRIES": "11"}, "RETRIES: 11 is out of range 0..10"),
        ({"RESPONSE_MODEL": "client"}, "RESPONSE_MODEL: expected one of upstream, requested"),
        ({"UPSTREAM_COOLDOWN": "-1"}, "UPSTREAM_COOLDOWN: expected a non-negative number of seconds"),
        ({"MODEL_PARAMS": '{"m": {"overrides": {"model": "x"}}}'}, "MODEL_PARAMS: key 'm'"),
        ({"MODEL_PARAMS": '{"m": {"typo": {}}}'}, "MODEL_PARAMS: key 'm'"),
    ],
)
def test_routing_settings_fail_at_start_naming_the_variable(environ: dict[str, str], start: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({**BASE, **environ})
    assert str(raised.value).startswith(start)
    assert "\n" not in str(raised.value)


def test_routing_settings_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "upstream_url: http://d:1\n"
        "upstreams:\n  big: {urls: [http://a:1, http://b:1], api_key: sk-big}\n"
        "model_map:\n  gpt-4o: [{model: qwen3-32b, upstream: big}, qwen3-4b]\n"
        "retries: 2\nresponse_model: requested\nupstream_cooldown: 0.5\n"
        "model_params:\n  qwen3-32b: {defaults: {temperature: 0.7}, drop: [logit_bias]}\n"
    )
    loaded = load_settings({"CONFIG_FILE": str(config)})
    targets = loaded.model_map.resolve("gpt-4o").targets
    assert [(t.model, t.upstream) for t in targets] == [("qwen3-32b", "big"), ("qwen3-4b", "default")]
    assert loaded.backends["big"].api_key == "sk-big"
    assert (loaded.retries, loaded.response_model, loaded.upstream_cooldown) == (2, "requested", 0.5)
    body = {"model": "qwen3-32b", "logit_bias": {"1": 2}}
    assert loaded.model_params.apply(body, "qwen3-32b")
    assert body == {"model": "qwen3-32b", "temperature": 0.7}


def test_routing_defaults() -> None:
    loaded = load_settings(BASE)
    assert (loaded.retries, loaded.response_model, loaded.upstream_cooldown) == (0, "upstream", 10.0)
    assert not loaded.model_params
    assert list(loaded.backends) == ["default"]


def test_sanics_response_timeout_covers_every_attempt_of_the_longest_fallback_list() -> None:
    loaded = load_settings(
        {
            **BASE,
            "UPSTREAMS": '{"slow": {"urls": ["http://a:1"], "connect_timeout": 5, "read_timeout": 1800}}',
            "MODEL_MAP": '{"m": ["a", {"model": "b", "upstream": "slow"}, "c"]}',
            "RETRIES": "1",
        }
    )
    slowest_attempt = 5 + 1800
    assert loaded.response_timeout > 3 * 2 * slowest_attempt + 5 * 4.0


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"MODEL_MAP": '{"a": "x", "a": "y"}'}, "MODEL_MAP: duplicate key 'a'"),
        ({"MODEL_MAP": '{"a": {"model": "x", "model": "y"}}'}, "MODEL_MAP: duplicate key 'model'"),
        ({"UPSTREAMS": '{"b": "http://h:1", "b": "http://h:2"}'}, "UPSTREAMS: duplicate key 'b'"),
        (
            {"MODEL_PARAMS": '{"m": {"defaults": {"temperature": 1, "temperature": 2}}}'},
            "MODEL_PARAMS: duplicate key 'temperature'",
        ),
    ],
)
def test_a_json_setting_with_a_duplicate_key_is_refused_naming_setting_and_key(
    env: dict[str, str], line: str
) -> None:
    """json.loads keeps the last of two equal keys; the operator meant one of them."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **env})
    assert str(caught.value) == line


@pytest.mark.parametrize(
    ("name", "text", "key", "line"),
    [
        ("top.yaml", "listen_port: 1\nlisten_port: 2\n", "listen_port", 2),
        ("deep.yaml", "model_map:\n  gpt-4o: a\n  gpt-4o: b\n", "gpt-4o", 3),
        ("deeper.yaml", "model_params:\n  m:\n    drop: [x]\n    drop: [y]\n", "drop", 4),
        ("flow.yaml", "model_map: {a: x, a: y}\n", "a", 1),
        ("file.json", '{"model_map": {"a": "x"},\n "model_map": {"b": "y"}}', "model_map", 2),
    ],
)
def test_a_config_file_with_a_duplicate_key_at_any_depth_is_refused(
    tmp_path: Path, name: str, text: str, key: str, line: int
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "CONFIG_FILE": str(path)})
    assert str(caught.value) == f"CONFIG_FILE: {str(path)!r}: duplicate key {key!r} (line {line})"


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    """``<<: *base`` then the same key is how YAML overrides a merged entry, not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("model_map:\n  <<: {gpt-4o: a, gpt-4: c}\n  gpt-4o: b\n")
    loaded = load_settings({**BASE, "CONFIG_FILE": str(path)})
    assert loaded.model_map.resolve("gpt-4o").targets[0].model == "b"
    assert loaded.model_map.resolve("gpt-4").targets[0].model == "c"


def test_demo_listens_on_loopback_unless_listen_host_is_set() -> None:
    assert load_settings({}, ["--demo"]).listen_host == "127.0.0.1"
    assert load_settings({"LISTEN_HOST": "0.0.0.0"}, ["--demo"]).listen_host == "0.0.0.0"
    assert load_settings(BASE).listen_host == "0.0.0.0"
