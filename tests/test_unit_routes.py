"""Route settings in MODEL_MAP (thinking, think_output, params): parsing, layering, rewriting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from service import payload
from service.cli import describe
from service.config import ConfigError, load_settings
from service.mapping import MappingError, ModelMap, Target
from service.params import ParamPolicy, ParamRule
from service.routes import NO_ROUTE, Route, parse_route
from service.thinking import NO_THINK, ThinkingPolicy

BASE = {"UPSTREAM_URL": "http://h:8000"}
RECIPE = {
    "qwen3-32b-fast": {
        "model": "qwen3-32b",
        "thinking": "off",
        "params": {"defaults": {"temperature": 0.7, "top_p": 0.8}},
    },
    "qwen3-32b-thinking": {
        "model": "qwen3-32b",
        "thinking": "on",
        "think_output": "reasoning",
        "params": {"overrides": {"temperature": 0.6}},
    },
}


# --- parsing ------------------------------------------------------------------------------------


def test_a_target_object_carries_its_route_and_a_plain_target_none() -> None:
    model_map = ModelMap.parse({**RECIPE, "plain": "qwen3-32b"})
    fast = model_map.resolve("qwen3-32b-fast").targets[0]
    thinking = model_map.resolve("qwen3-32b-thinking").targets[0]
    assert fast == Target(
        "qwen3-32b", "default", Route("off", None, ParamRule(defaults={"temperature": 0.7, "top_p": 0.8}))
    )
    assert thinking.route == Route("on", "reasoning", ParamRule(overrides={"temperature": 0.6}))
    assert model_map.resolve("plain").targets[0].route is NO_ROUTE
    assert ModelMap.parse({"a": {"model": "b"}}).resolve("a").targets[0].route is NO_ROUTE


def test_a_regex_route_gives_its_settings_to_every_expanded_target() -> None:
    model_map = ModelMap.parse(
        {"/fast-(.*)/": [{"model": "\\1", "thinking": "off"}, {"model": "\\1-small", "think_output": "keep"}]}
    )
    targets = model_map.resolve("fast-qwen3").targets
    assert targets == (
        Target("qwen3", route=Route(thinking="off")),
        Target("qwen3-small", route=Route(think_output="keep")),
    )


def test_yaml_booleans_stand_for_on_and_off() -> None:
    assert parse_route({"thinking": False}) == Route(thinking="off")
    assert parse_route({"thinking": True}) == Route(thinking="on")
    assert parse_route({"thinking": None}) == NO_ROUTE


def test_targets_with_params_stay_hashable() -> None:
    targets = ModelMap.parse(RECIPE).resolve("qwen3-32b-fast").targets
    again = ModelMap.parse(RECIPE).resolve("qwen3-32b-fast").targets
    assert {targets[0], again[0]} == {targets[0]}
    assert hash(ParamRule(defaults={"t": 1})) == hash(ParamRule(defaults={"t": 1.0}))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fast": {"model": "m", "thinking": "no"}}, 'key \'fast\': target "thinking" must be "on" or "off"'),
        ({"fast": {"model": "m", "thinking": 0}}, "key 'fast': target \"thinking\""),
        (
            {"fast": {"model": "m", "think_output": "hide"}},
            "key 'fast': target \"think_output\" must be one of",
        ),
        ({"fast": {"model": "m", "think_output": ["strip"]}}, "key 'fast': target \"think_output\""),
        ({"fast": {"model": "m", "temperature": 0.7}}, "key 'fast': target has unknown field 'temperature'"),
        ({"fast": {"model": "m", "params": []}}, "key 'fast': target \"params\": must be an object"),
        (
            {"fast": {"model": "m", "params": {"overrides": {"model": "x"}}}},
            "key 'fast': target \"params\": overrides cannot touch 'model'",
        ),
        (
            {"fast": {"model": "m", "params": {"defaults": {"stream": True}}}},
            "key 'fast': target \"params\": defaults cannot touch 'stream'",
        ),
        (
            {"fast": {"model": "m", "params": {"defaults": {"t": 1}, "overrides": {"t": 2}}}},
            "key 'fast': target \"params\": 't' is in both defaults and overrides",
        ),
        (
            {"fast": {"model": "m", "params": {"default": {}}}},
            "key 'fast': target \"params\": unknown field 'default'",
        ),
        (
            {"/f-(.*)/": [{"model": "\\1"}, {"model": "\\1-b", "thinking": "maybe"}]},
            "key '/f-(.*)/': fallback list item 1 \"thinking\"",
        ),
        (
            {"fast": [{"model": "m", "thinking": "on"}, {"model": "m", "thinking": "off"}]},
            "key 'fast': fallback list names model 'm' on upstream 'default' twice",
        ),
    ],
)
def test_bad_route_settings_name_the_key_and_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(MappingError) as caught:
        ModelMap.parse(raw)
    assert str(caught.value).startswith(message), str(caught.value)


def test_nan_in_route_params_fails_at_start_naming_model_map() -> None:
    raw = '{"fast": {"model": "m", "params": {"defaults": {"temperature": NaN}}}}'
    with pytest.raises(ConfigError, match=r"^MODEL_MAP: invalid JSON: NaN"):
        load_settings({**BASE, "MODEL_MAP": raw})


def test_the_config_file_takes_route_objects_with_bare_yaml_on_and_off(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model_map:\n"
        "  qwen3-32b-fast: {model: qwen3-32b, thinking: off, params: {defaults: {temperature: 0.7}}}\n"
        "  qwen3-32b-thinking: {model: qwen3-32b, thinking: on, think_output: reasoning}\n"
        "disable_thinking: /qwen3-.*/\n"
    )
    settings = load_settings({**BASE, "CONFIG_FILE": str(config)})
    fast = settings.model_map.resolve("qwen3-32b-fast").targets[0]
    thinking = settings.model_map.resolve("qwen3-32b-thinking").targets[0]
    assert fast.route == Route("off", None, ParamRule(defaults={"temperature": 0.7}))
    assert settings.thinking.disabled_for(fast.model, fast.route)
    assert not settings.thinking.disabled_for(thinking.model, thinking.route)
    assert settings.thinking.output_for(thinking.model, thinking.route) == "reasoning"
    config.write_text("model_map:\n  fast: {model: m, thinking: sometimes}\n")
    with pytest.raises(ConfigError, match=r"^CONFIG_FILE model_map: key 'fast': target \"thinking\""):
        load_settings({**BASE, "CONFIG_FILE": str(config)})


# --- thinking: the route's word over DISABLE_THINKING and THINK_OUTPUT ----------------------------


@pytest.mark.parametrize(
    ("disable", "route", "disabled"),
    [
        (True, Route(thinking="on"), False),
        (False, Route(thinking="off"), True),
        (True, NO_ROUTE, True),
        (False, NO_ROUTE, False),
        (True, Route(think_output="keep"), True),
    ],
)
def test_the_routes_thinking_wins_over_disable_thinking(disable: bool, route: Route, disabled: bool) -> None:
    policy = ThinkingPolicy(disable)
    assert policy.disabled_for("m", route) is disabled
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert policy.apply(body, "m", True, route) is disabled
    assert body["messages"][0]["content"] == ("hi " + NO_THINK if disabled else "hi")


@pytest.mark.parametrize(
    ("output", "route", "expected"),
    [
        (None, Route(thinking="off"), "strip"),
        (None, Route(thinking="on"), "keep"),
        ("keep", Route(thinking="off"), "keep"),
        ("keep", Route(thinking="off", think_output="reasoning"), "reasoning"),
        (None, Route(think_output="strip"), "strip"),
    ],
)
def test_the_routes_output_wins_over_think_output_which_wins_over_the_default(
    output: str | None, route: Route, expected: str
) -> None:
    assert ThinkingPolicy(False, output=output).output_for("m", route) == expected


# --- params: the route's rule layered over the model's --------------------------------------------


def test_route_params_layer_over_the_models_entry() -> None:
    model_rule = ParamRule(defaults={"temperature": 1.0, "top_k": 20}, overrides={"seed": 1}, drop=("user",))
    route_rule = ParamRule(defaults={"temperature": 0.7}, overrides={"top_k": 5}, drop=("seed", "logit_bias"))
    assert route_rule.over(model_rule) == ParamRule(
        defaults={"temperature": 0.7}, overrides={"top_k": 5}, drop=("user", "seed", "logit_bias")
    )
    assert route_rule.over(None) is route_rule
    policy = ParamPolicy.parse({"/qwen.*/": {"defaults": {"temperature": 1.0}, "drop": ["user"]}})
    assert policy.rule_for("qwen3", route_rule) == ParamRule(
        defaults={"temperature": 0.7}, overrides={"top_k": 5}, drop=("user", "seed", "logit_bias")
    )
    assert policy.rule_for("other", route_rule) is route_rule


def test_a_route_default_gives_way_to_the_client_where_the_model_would_override() -> None:
    """For a key the route names, the route's section decides: its default, not the model's override."""
    layered = ParamRule(defaults={"temperature": 0.7}).over(ParamRule(overrides={"temperature": 1.0}))
    sent = {"temperature": 0.2}
    assert layered.apply(sent) is False
    assert sent == {"temperature": 0.2}
    empty: dict[str, Any] = {}
    assert layered.apply(empty) is True
    assert empty == {"temperature": 0.7}


def test_each_fallback_body_gets_its_own_targets_route() -> None:
    model_map = ModelMap.parse(
        {
            "fast": [
                {"model": "a", "thinking": "off", "params": {"overrides": {"temperature": 0.1}}},
                {"model": "b", "params": {"defaults": {"top_p": 0.5}}},
                "c",
            ]
        }
    )
    policy = payload.Policy(ThinkingPolicy(False), ParamPolicy.parse({"c": {"defaults": {"seed": 3}}}))
    raw = orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]})

    def body(choice: int) -> Any:
        rewritten = payload.rewrite(
            raw, "application/json", "chat/completions", model_map, policy, choice=choice
        )
        return orjson.loads(rewritten.body)

    assert body(0) == {
        "model": "a",
        "messages": [{"role": "user", "content": "hi /no_think"}],
        "temperature": 0.1,
    }
    assert body(1) == {"model": "b", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}
    assert body(2) == {"model": "c", "messages": [{"role": "user", "content": "hi"}], "seed": 3}


# --- resolve ------------------------------------------------------------------------------------


def test_describe_shows_each_routes_effective_policy() -> None:
    settings = load_settings(
        {
            **BASE,
            "MODEL_MAP": orjson.dumps(RECIPE).decode(),
            "MODEL_PARAMS": orjson.dumps(
                {"qwen3-32b": {"defaults": {"temperature": 1.0, "top_k": 20}, "drop": ["user"]}}
            ).decode(),
            "DISABLE_THINKING": "true",
        }
    )
    assert describe(settings, "qwen3-32b-fast").splitlines()[1:] == [
        "    thinking off (route); think blocks: strip (thinking off)",
        "    params: defaults top_k=20, temperature=0.7, top_p=0.8; drop user",
    ]
    assert describe(settings, "qwen3-32b-thinking").splitlines()[1:] == [
        "    thinking on (route); think blocks: reasoning (route)",
        "    params: defaults top_k=20; overrides temperature=0.6; drop user",
    ]
    assert describe(settings, "qwen3-32b").splitlines()[1:] == [
        "    thinking off (DISABLE_THINKING); think blocks: strip (thinking off)",
        "    params: defaults temperature=1.0, top_k=20; drop user",
    ]


def test_aliases_resolve_once_a_target_is_never_looked_up_again() -> None:
    model_map = ModelMap.parse({"gpt-4o": "smart", "smart": "qwen3-32b", "/s.*/": "other"})
    assert model_map.resolve("gpt-4o").targets == (Target("smart"),)
    policy = payload.Policy(ThinkingPolicy(False))
    raw = orjson.dumps({"model": "gpt-4o", "messages": []})
    rewritten = payload.rewrite(raw, "application/json", "chat/completions", model_map, policy)
    assert orjson.loads(rewritten.body)["model"] == "smart"
