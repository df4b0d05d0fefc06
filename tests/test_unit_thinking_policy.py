"""ThinkingPolicy (which targets, which switch, which output), its settings, and the template merge."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from service.config import ConfigError, load_settings
from service.thinking import NO_THINK, ThinkingPolicy, disable_in_template

BASE = {"UPSTREAM_URL": "http://upstream.test:8000"}
QWEN_SCOPE = re.compile("qwen3-.*")


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        **extra,
    }


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "once", **extra}


# --- disabled_for / output_for -----------------------------------------------------------------


@pytest.mark.parametrize("model", ["qwen3-8b", "echo-model", ""])
def test_bool_scopes_cover_every_model(model: str) -> None:
    assert ThinkingPolicy(True).disabled_for(model) is True
    assert ThinkingPolicy(False).disabled_for(model) is False
    assert ThinkingPolicy().disabled_for(model) is False


@pytest.mark.parametrize(
    ("model", "disabled"),
    [
        ("qwen3-8b", True),
        ("qwen3-", True),
        ("Qwen/qwen3-8b", False),  # contains a match, but the whole id must match
        ("my-qwen3-8b", False),
        ("qwen2-7b", False),
        ("QWEN3-8B", False),
        ("", False),
    ],
)
def test_regex_scope_must_match_the_whole_id(model: str, disabled: bool) -> None:
    policy = ThinkingPolicy(QWEN_SCOPE)
    assert policy.disabled_for(model) is disabled
    assert policy.output_for(model) == ("strip" if disabled else "keep")


def test_regex_scope_anchors_alternatives_as_a_whole() -> None:
    policy = ThinkingPolicy(re.compile("qwen3-8b|deepseek"))
    assert policy.disabled_for("deepseek")
    assert policy.disabled_for("qwen3-8b")
    assert not policy.disabled_for("qwen3-8b-awq")
    assert not policy.disabled_for("deepseek-r1")


def test_default_output_strips_only_where_thinking_is_off() -> None:
    assert ThinkingPolicy(True).output_for("any") == "strip"
    assert ThinkingPolicy(False).output_for("any") == "keep"


@pytest.mark.parametrize("output", ["strip", "keep", "reasoning"])
@pytest.mark.parametrize("disable", [True, False, QWEN_SCOPE], ids=["true", "false", "regex"])
def test_explicit_output_applies_to_every_model(disable: bool | re.Pattern[str], output: str) -> None:
    policy = ThinkingPolicy(disable, output=output)
    assert [policy.output_for(m) for m in ("qwen3-8b", "echo-model", "")] == [output] * 3


# --- apply -------------------------------------------------------------------------------------


def test_apply_suffix_chat_and_completions() -> None:
    policy = ThinkingPolicy(True)
    chat = chat_body()
    assert policy.apply(chat, "qwen3-8b", chat=True) is True
    assert chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"hi {NO_THINK}"},
        ],
    }
    completion = completion_body()
    assert policy.apply(completion, "qwen3-8b", chat=False) is True
    assert completion == {"model": "m", "prompt": f"once {NO_THINK}"}


def test_apply_template_chat_only() -> None:
    policy = ThinkingPolicy(True, switch="template")
    chat = chat_body(chat_template_kwargs={"foo": 1})
    assert policy.apply(chat, "qwen3-8b", chat=True) is True
    assert chat == chat_body(chat_template_kwargs={"foo": 1, "enable_thinking": False})
    completion = completion_body()
    assert policy.apply(completion, "qwen3-8b", chat=False) is False
    assert completion == completion_body()


def test_apply_both() -> None:
    policy = ThinkingPolicy(True, switch="both")
    chat = chat_body()
    assert policy.apply(chat, "qwen3-8b", chat=True) is True
    assert chat["messages"][-1]["content"] == f"hi {NO_THINK}"
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    completion = completion_body()
    assert policy.apply(completion, "qwen3-8b", chat=False) is True
    assert completion == {"model": "m", "prompt": f"once {NO_THINK}"}


@pytest.mark.parametrize("switch", ["suffix", "template", "both"])
def test_apply_changes_nothing_for_a_model_out_of_scope(switch: str) -> None:
    for policy, model in [
        (ThinkingPolicy(False, switch=switch), "qwen3-8b"),
        (ThinkingPolicy(QWEN_SCOPE, switch=switch), "echo-model"),
        (ThinkingPolicy(QWEN_SCOPE, switch=switch), "org/qwen3-8b"),
    ]:
        chat, completion = chat_body(), completion_body()
        assert policy.apply(chat, model, chat=True) is False
        assert policy.apply(completion, model, chat=False) is False
        assert (chat, completion) == (chat_body(), completion_body())


def test_apply_regex_scope_on_a_matching_target() -> None:
    chat = chat_body()
    assert ThinkingPolicy(QWEN_SCOPE).apply(chat, "qwen3-8b", chat=True) is True
    assert chat["messages"][-1]["content"] == f"hi {NO_THINK}"


def test_apply_reports_no_change_when_every_switch_is_already_set() -> None:
    done = chat_body(chat_template_kwargs={"enable_thinking": False})
    done["messages"][-1]["content"] = f"hi {NO_THINK}"
    for switch in ("suffix", "template", "both"):
        body = copy.deepcopy(done)
        assert ThinkingPolicy(True, switch=switch).apply(body, "m", chat=True) is False
        assert body == done


def test_apply_both_still_sets_the_missing_switch() -> None:
    suffixed = chat_body()
    suffixed["messages"][-1]["content"] = f"hi {NO_THINK}"
    assert ThinkingPolicy(True, switch="both").apply(suffixed, "m", chat=True) is True
    assert suffixed["chat_template_kwargs"] == {"enable_thinking": False}
    templated = chat_body(chat_template_kwargs={"enable_thinking": False})
    assert ThinkingPolicy(True, switch="both").apply(templated, "m", chat=True) is True
    assert templated["messages"][-1]["content"] == f"hi {NO_THINK}"


# --- disable_in_template -----------------------------------------------------------------------


def test_template_added_when_absent() -> None:
    body: dict[str, Any] = {"model": "m"}
    assert disable_in_template(body) is True
    assert body == {"model": "m", "chat_template_kwargs": {"enable_thinking": False}}


def test_template_keeps_the_clients_other_kwargs() -> None:
    body = {"chat_template_kwargs": {"foo": 1, "tools_style": "x"}}
    assert disable_in_template(body) is True
    assert body == {"chat_template_kwargs": {"foo": 1, "tools_style": "x", "enable_thinking": False}}


@pytest.mark.parametrize("value", [True, None, 0, "false"])
def test_template_overrides_anything_but_false(value: Any) -> None:
    body = {"chat_template_kwargs": {"enable_thinking": value, "foo": 1}}
    assert disable_in_template(body) is True
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "foo": 1}
    assert body["chat_template_kwargs"]["enable_thinking"] is False


def test_template_already_false_is_unchanged() -> None:
    kwargs = {"enable_thinking": False, "foo": 1}
    body = {"chat_template_kwargs": kwargs}
    assert disable_in_template(body) is False
    assert body["chat_template_kwargs"] is kwargs
    assert kwargs == {"enable_thinking": False, "foo": 1}


@pytest.mark.parametrize("value", [None, "enable_thinking=false", ["enable_thinking"], 1])
def test_template_replaces_what_is_not_an_object(value: Any) -> None:
    body = {"chat_template_kwargs": value}
    assert disable_in_template(body) is True
    assert body == {"chat_template_kwargs": {"enable_thinking": False}}


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    loaded = load_settings(BASE)
    assert (loaded.disable_thinking, loaded.thinking_switch, loaded.think_output) == (False, "suffix", None)
    assert loaded.thinking == ThinkingPolicy(False, "suffix", None)


def test_disable_thinking_regex_matches_whole_target_ids() -> None:
    loaded = load_settings({**BASE, "DISABLE_THINKING": " /qwen3-.*|deepseek-r1/ "})
    scope = loaded.disable_thinking
    assert isinstance(scope, re.Pattern)
    assert scope.pattern == "qwen3-.*|deepseek-r1"
    policy = loaded.thinking
    assert policy.disabled_for("qwen3-8b")
    assert policy.disabled_for("deepseek-r1")
    assert not policy.disabled_for("deepseek-r1-distill")
    assert not policy.disabled_for("Qwen/qwen3-8b")
    assert policy.output_for("qwen3-8b") == "strip"
    assert policy.output_for("llama-3") == "keep"


@pytest.mark.parametrize("raw", ["template", "TEMPLATE", "both", " suffix "])
def test_thinking_switch_values(raw: str) -> None:
    loaded = load_settings({**BASE, "THINKING_SWITCH": raw})
    assert loaded.thinking_switch == raw.strip().lower()
    assert loaded.thinking.switch == raw.strip().lower()


@pytest.mark.parametrize("raw", ["strip", "keep", "Reasoning"])
def test_think_output_values(raw: str) -> None:
    loaded = load_settings({**BASE, "THINK_OUTPUT": raw})
    assert loaded.think_output == raw.lower()
    assert loaded.thinking.output_for("anything") == raw.lower()


def test_settings_build_the_policy_from_all_three() -> None:
    loaded = load_settings(
        {**BASE, "DISABLE_THINKING": "/qwen3-.*/", "THINKING_SWITCH": "both", "THINK_OUTPUT": "reasoning"}
    )
    policy = loaded.thinking
    assert isinstance(policy, ThinkingPolicy)
    assert policy.disable is loaded.disable_thinking
    assert (policy.switch, policy.output) == ("both", "reasoning")
    assert loaded.thinking is policy  # built once
    chat = chat_body()
    assert policy.apply(chat, "qwen3-8b", chat=True) is True
    assert chat["messages"][-1]["content"] == f"hi {NO_THINK}"
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}


def test_flags_win_over_the_environment() -> None:
    env = {**BASE, "DISABLE_THINKING": "false", "THINKING_SWITCH": "suffix", "THINK_OUTPUT": "keep"}
    argv = ["--disable-thinking", "/x/", "--thinking-switch", "template", "--think-output", "strip"]
    loaded = load_settings(env, argv)
    assert isinstance(loaded.disable_thinking, re.Pattern)
    assert loaded.disable_thinking.pattern == "x"
    assert (loaded.thinking_switch, loaded.think_output) == ("template", "strip")


@pytest.mark.parametrize(
    ("env", "argv", "name"),
    [
        ({"DISABLE_THINKING": "/(/"}, [], "DISABLE_THINKING"),
        ({"DISABLE_THINKING": "maybe"}, [], "DISABLE_THINKING"),
        ({"DISABLE_THINKING": "/qwen"}, [], "DISABLE_THINKING"),
        ({"THINKING_SWITCH": "x"}, [], "THINKING_SWITCH"),
        ({"THINKING_SWITCH": ""}, [], "THINKING_SWITCH"),
        ({"THINK_OUTPUT": "x"}, [], "THINK_OUTPUT"),
        ({}, ["--think-output", "hide"], "--think-output"),
        ({}, ["--disable-thinking", "/[/"], "--disable-thinking"),
    ],
)
def test_bad_thinking_settings_name_the_culprit(env: dict[str, str], argv: list[str], name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **env}, argv)
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message
