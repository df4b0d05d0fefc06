"""load_settings: environment and flags, defaults, normalisation, and one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import DEMO_MODEL_MAP, ConfigError, Settings, load_settings, parse_upstream_url
from service.mapping import ModelMap

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
    assert loaded.upstream("/v1/chat/completions?x=1") == "http://h:8000/v1/chat/completions?x=1"


@pytest.mark.parametrize(
    "given_url", ["https://gw.example/openai", "https://gw.example/openai/", "https://gw.example/openai/v1/"]
)
def test_a_sub_path_base_keeps_its_prefix(given_url: str) -> None:
    loaded = load_settings({"UPSTREAM_URL": given_url})
    assert loaded.upstream_url == "https://gw.example/openai"
    assert loaded.upstream("/v1/models") == "https://gw.example/openai/v1/models"


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
