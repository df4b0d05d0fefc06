"""ParamPolicy: one entry per target (exact first, then regexes in order); exact change reporting."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.params import ParamPolicy, ParamRule, ParamsError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
names = st.sampled_from(["temperature", "top_p", "max_tokens", "seed", "extra_body", "n"])
bodies = st.dictionaries(names, json_values, max_size=5).map(lambda body: {"model": "m", **body})


def test_defaults_fill_only_what_the_client_left_out() -> None:
    policy = ParamPolicy.parse({"m": {"defaults": {"temperature": 0.7, "top_p": 0.8}}})
    body: dict[str, Any] = {"model": "m", "temperature": 0.1}
    assert policy.apply(body, "m") is True
    assert body == {"model": "m", "temperature": 0.1, "top_p": 0.8}


def test_an_explicit_null_counts_as_sent() -> None:
    policy = ParamPolicy.parse({"m": {"defaults": {"temperature": 0.7}}})
    body: dict[str, Any] = {"model": "m", "temperature": None}
    assert policy.apply(body, "m") is False
    assert body == {"model": "m", "temperature": None}


def test_overrides_always_win() -> None:
    policy = ParamPolicy.parse({"m": {"overrides": {"temperature": 0.6, "seed": 1}}})
    body: dict[str, Any] = {"model": "m", "temperature": 1.5}
    assert policy.apply(body, "m") is True
    assert body == {"model": "m", "temperature": 0.6, "seed": 1}


def test_an_override_replaces_a_nested_object_whole() -> None:
    policy = ParamPolicy.parse({"m": {"overrides": {"chat_template_kwargs": {"enable_thinking": False}}}})
    body: dict[str, Any] = {"model": "m", "chat_template_kwargs": {"enable_thinking": True, "x": 1}}
    assert policy.apply(body, "m") is True
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_drop_removes_keys_the_backend_refuses() -> None:
    policy = ParamPolicy.parse({"m": {"drop": ["logit_bias", "user", "absent"]}})
    body: dict[str, Any] = {"model": "m", "logit_bias": {"1": 2}, "user": "u", "n": 1}
    assert policy.apply(body, "m") is True
    assert body == {"model": "m", "n": 1}


def test_all_three_sections_together() -> None:
    policy = ParamPolicy.parse(
        {"m": {"drop": ["user"], "defaults": {"top_p": 0.9}, "overrides": {"max_tokens": 512}}}
    )
    body: dict[str, Any] = {"model": "m", "user": "u", "top_p": 0.5, "max_tokens": 9000}
    assert policy.apply(body, "m") is True
    assert body == {"model": "m", "top_p": 0.5, "max_tokens": 512}


@pytest.mark.parametrize(
    ("rule", "body"),
    [
        ({"defaults": {"temperature": 0.7}}, {"temperature": 0.7}),
        ({"defaults": {"temperature": 0.7}}, {"temperature": 0.2}),
        ({"overrides": {"temperature": 0.7}}, {"temperature": 0.7}),
        ({"overrides": {"stop": ["a", {"b": [1]}]}}, {"stop": ["a", {"b": [1]}]}),
        ({"overrides": {"opts": {"a": 1, "b": 2}}}, {"opts": {"b": 2, "a": 1}}),
        ({"drop": ["user"]}, {"temperature": 0.7}),
        ({}, {"temperature": 0.7}),
    ],
)
def test_nothing_to_do_is_not_a_change(rule: dict[str, Any], body: dict[str, Any]) -> None:
    policy = ParamPolicy.parse({"m": rule})
    before = copy.deepcopy(body)
    assert policy.apply(body, "m") is False
    assert body == before


@pytest.mark.parametrize(
    ("override", "sent"),
    [
        (True, 1),
        (1, True),
        (1, 1.0),
        (0, False),
        (0.0, -0.0),
        ([1], [True]),
        ({"a": 1}, {"a": 1.0}),
        (None, 0),
    ],
)
def test_an_override_equal_only_to_python_is_a_change(override: object, sent: object) -> None:
    """``True == 1 == 1.0`` and ``0.0 == -0.0`` in Python, but they are different JSON on the wire."""
    policy = ParamPolicy.parse({"m": {"overrides": {"logprobs": override}}})
    body: dict[str, Any] = {"model": "m", "logprobs": sent}
    assert policy.apply(body, "m") is True
    assert body["logprobs"] is not sent
    assert repr(body["logprobs"]) == repr(override)


def test_an_exact_entry_wins_over_a_regex_written_before_it() -> None:
    policy = ParamPolicy.parse(
        {"/qwen3-.*/": {"overrides": {"temperature": 0.6}}, "qwen3-4b": {"overrides": {"temperature": 0.1}}}
    )
    body: dict[str, Any] = {"model": "qwen3-4b"}
    policy.apply(body, "qwen3-4b")
    assert body["temperature"] == 0.1


def test_only_one_entry_applies_and_regexes_go_in_order() -> None:
    policy = ParamPolicy.parse(
        {
            "/qwen3-.*/": {"defaults": {"top_p": 0.8}},
            "/qwen.*/": {"defaults": {"top_k": 20}},
        }
    )
    first: dict[str, Any] = {"model": "qwen3-4b"}
    policy.apply(first, "qwen3-4b")
    assert first == {"model": "qwen3-4b", "top_p": 0.8}
    second: dict[str, Any] = {"model": "qwen2-7b"}
    policy.apply(second, "qwen2-7b")
    assert second == {"model": "qwen2-7b", "top_k": 20}


def test_an_empty_exact_entry_exempts_a_model_from_the_regexes() -> None:
    policy = ParamPolicy.parse({"/.*/": {"overrides": {"seed": 1}}, "special": {}})
    body: dict[str, Any] = {"model": "special"}
    assert policy.apply(body, "special") is False
    assert body == {"model": "special"}


def test_a_regex_must_match_the_whole_target_id() -> None:
    policy = ParamPolicy.parse({"/qwen3/": {"overrides": {"seed": 1}}})
    assert policy.rule_for("qwen3") is not None
    assert policy.rule_for("qwen3-4b") is None
    assert policy.rule_for("my-qwen3") is None


def test_the_policy_looks_at_the_target_id_not_the_body() -> None:
    policy = ParamPolicy.parse({"qwen3-4b": {"overrides": {"seed": 1}}})
    body: dict[str, Any] = {"model": "gpt-4o"}
    assert policy.apply(body, "qwen3-4b") is True
    assert body == {"model": "gpt-4o", "seed": 1}


def test_no_matching_entry_leaves_the_body_alone() -> None:
    policy = ParamPolicy.parse({"a": {"overrides": {"seed": 1}}, "/b.*/": {"drop": ["user"]}})
    body: dict[str, Any] = {"model": "c", "user": "u"}
    assert policy.rule_for("c") is None
    assert policy.apply(body, "c") is False
    assert body == {"model": "c", "user": "u"}


def test_applied_values_are_copies_shared_by_no_two_requests() -> None:
    raw = {"m": {"defaults": {"stop": ["\n"]}, "overrides": {"extra": {"tags": ["a"]}}}}
    policy = ParamPolicy.parse(raw)
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    policy.apply(first, "m")
    policy.apply(second, "m")
    first["stop"].append("END")
    first["extra"]["tags"].append("b")
    raw["m"]["overrides"]["extra"]["tags"].append("from-config")
    assert second == {"stop": ["\n"], "extra": {"tags": ["a"]}}
    third: dict[str, Any] = {}
    policy.apply(third, "m")
    assert third == {"stop": ["\n"], "extra": {"tags": ["a"]}}


def test_an_empty_policy_is_falsy() -> None:
    assert not ParamPolicy()
    assert not ParamPolicy.parse({})
    assert ParamPolicy.parse({"m": {}})
    assert ParamPolicy.parse({"/m/": {}})
    assert ParamPolicy() == ParamPolicy.parse({})


def test_duplicate_drop_names_collapse() -> None:
    assert ParamPolicy.parse({"m": {"drop": ["user", "user"]}}).exact["m"] == ParamRule(drop=("user",))


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"m": []}, "m", "must be an object"),
        ({"m": None}, "m", "must be an object"),
        ({"ok": {}, "m": {"default": {}}}, "m", "unknown field 'default'"),
        ({"m": {"defaults": []}}, "m", "defaults must be an object"),
        ({"m": {"overrides": "x"}}, "m", "overrides must be an object"),
        ({"m": {"drop": "user"}}, "m", "drop must be a list of parameter names"),
        ({"m": {"drop": ["user", 3]}}, "m", "drop must be a list of parameter names"),
        ({"m": {"overrides": {"model": "x"}}}, "m", "overrides cannot touch 'model'"),
        ({"m": {"defaults": {"model": "x"}}}, "m", "defaults cannot touch 'model'"),
        ({"m": {"drop": ["model"]}}, "m", "drop cannot touch 'model'"),
        ({"/m.*/": {"overrides": {"stream": False}}}, "/m.*/", "overrides cannot touch 'stream'"),
        ({"m": {"defaults": {"stream": True}}}, "m", "defaults cannot touch 'stream'"),
        ({"m": {"drop": ["stream"]}}, "m", "drop cannot touch 'stream'"),
        ({"m": {"drop": ["n"], "overrides": {"n": 1}}}, "m", "'n' is in both drop and overrides"),
        ({"m": {"defaults": {"n": 2}, "overrides": {"n": 1}}}, "m", "'n' is in both defaults and overrides"),
        ({"m": {"drop": ["n"], "defaults": {"n": 1}}}, "m", "'n' is in both drop and defaults"),
        ({"/m(/": {}}, "/m(/", "invalid regular expression"),
    ],
)
def test_bad_entries_raise_params_error_naming_the_key(raw: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ParamsError) as caught:
        ParamPolicy.parse(raw)
    message = str(caught.value)
    assert message.startswith(f"key {key!r}: ")
    assert fragment in message


@pytest.mark.parametrize("raw", [[], "m", 3, None])
def test_a_policy_that_is_not_an_object_is_refused(raw: object) -> None:
    with pytest.raises(ParamsError, match="JSON object"):
        ParamPolicy.parse(raw)


def test_params_error_is_a_value_error() -> None:
    assert issubclass(ParamsError, ValueError)


def _rule(drop: list[str], defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Disjoint sections, as parse demands: overrides win a name, then defaults, then drop."""
    defaults = {k: v for k, v in defaults.items() if k not in overrides}
    drop = [k for k in drop if k not in overrides and k not in defaults]
    return {"drop": drop, "defaults": defaults, "overrides": overrides}


rules = st.builds(
    _rule,
    st.lists(names, max_size=3),
    st.dictionaries(names, json_values, max_size=3),
    st.dictionaries(names, json_values, max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(rule=rules, body=bodies)
def test_apply_is_idempotent_and_reports_change_exactly(rule: dict[str, Any], body: dict[str, Any]) -> None:
    policy = ParamPolicy.parse({"m": rule})
    before = copy.deepcopy(body)
    changed = policy.apply(body, "m")
    assert changed == (repr(body) != repr(before))
    assert policy.apply(body, "m") is False
    assert body["model"] == "m"
    assert not set(rule["drop"]) & body.keys()
    for name, value in rule["overrides"].items():
        assert repr(body[name]) == repr(value)
    for name, value in rule["defaults"].items():
        assert repr(body[name]) == repr(before.get(name, value))
