"""Per-route policy end to end: two names for one served model that behave differently.

One proxy process, with DISABLE_THINKING=true for every model, MODEL_PARAMS for the served
Qwen3, and MODEL_MAP routes that carry their own ``thinking``, ``think_output`` and ``params``,
in front of the fake upstream's Qwen3-like model (full think block when thinking is on, an empty
one when told not to think, tags cut across events). THINK_TAGS adds ``thinking``, which the
``...-tag-thinking`` model names its block. Clients are the official SDK, sync and async.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Proxy, StartProxy, eventually
from tests.fake_upstream import QWEN_REASONING, FakeUpstream, qwen_answer
from tests.test_e2e_thinking import ENDPOINTS, MODES, STREAMING, ask, user_text

TIMEOUT = 10
QWEN = "qwen3-think-8b"
TAGGED = "qwen3-think-8b-tag-thinking"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL_MAP = {
    # The cot_proxy recipe: one served model, a fast name and a thinking name.
    "qwen3-fast": {
        "model": QWEN,
        "thinking": "off",
        "params": {"defaults": {"temperature": 0.7}, "overrides": {"top_p": 0.8}},
    },
    "qwen3-thinking": {
        "model": QWEN,
        "thinking": "on",
        "think_output": "reasoning",
        "params": {"defaults": {"temperature": 0.6}, "drop": ["top_k"]},
    },
    # Every id it matches gets the route's settings, with the target expanded per id.
    "/deep-(\\d+b)/": {
        "model": "qwen3-think-\\1",
        "thinking": "on",
        "think_output": "reasoning",
        "params": {"overrides": {"max_tokens": 99}},
    },
    # Each fallback target with its own settings: the first fails with a 503.
    "qwen3-fallback": [
        {"model": "status-503-route", "thinking": "on", "params": {"overrides": {"temperature": 0.1}}},
        {"model": QWEN, "thinking": "off", "params": {"overrides": {"temperature": 0.2}}},
    ],
    "qwen3-tagged": TAGGED,
}
MODEL_PARAMS = {"/qwen3-think-.*/": {"defaults": {"temperature": 1.0, "top_k": 20}, "drop": ["logit_bias"]}}


@pytest.fixture(scope="module")
def routed(start_proxy: StartProxy) -> Proxy:
    return start_proxy(
        MODEL_MAP=orjson.dumps(MODEL_MAP).decode(),
        MODEL_PARAMS=orjson.dumps(MODEL_PARAMS).decode(),
        DISABLE_THINKING="true",
        THINKING_SWITCH=None,
        THINK_OUTPUT=None,
        THINK_TAGS="think,thinking",
    )


def seen(upstream: FakeUpstream, chat: bool, model: str) -> dict[str, Any]:
    """The last body the upstream got for ``model`` on this endpoint."""
    path = CHAT if chat else COMPLETIONS
    for request in reversed(upstream.requests):
        if request.path.split("?")[0] == path:
            with contextlib.suppress(ValueError):
                body = request.json()
                if isinstance(body, dict) and body.get("model") == model:
                    return body
    raise AssertionError(f"the upstream saw no request for {model}")


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_two_aliases_of_one_model_think_and_sample_differently(
    routed: Proxy, upstream: FakeUpstream, mode: str, chat: bool, stream: bool
) -> None:
    fast = ask(routed, mode, chat, stream, model="qwen3-fast", extra_body={"top_k": 5})
    sent_fast = seen(upstream, chat, QWEN)
    thinking = ask(routed, mode, chat, stream, model="qwen3-thinking", extra_body={"top_k": 5})
    sent_thinking = seen(upstream, chat, QWEN)

    assert (fast.content, fast.reasoning) == ({0: qwen_answer(QWEN, 0)}, {})
    assert user_text(sent_fast, chat).endswith(" /no_think")
    # The route's default fills before the model's; the client's top_k stays.
    assert (sent_fast["temperature"], sent_fast["top_p"], sent_fast["top_k"]) == (0.7, 0.8, 5)

    assert thinking.content == {0: qwen_answer(QWEN, 0)}
    assert thinking.reasoning == {0: QWEN_REASONING}
    assert "/no_think" not in user_text(sent_thinking, chat)  # thinking on, DISABLE_THINKING aside
    assert sent_thinking["temperature"] == 0.6
    assert "top_k" not in sent_thinking  # the route drops it
    assert "top_p" not in sent_thinking  # the other route's override stays there
    assert fast.models == thinking.models == {QWEN}


@pytest.mark.parametrize("mode", MODES)
def test_a_route_override_wins_over_what_the_client_sends(
    routed: Proxy, upstream: FakeUpstream, mode: str
) -> None:
    """A client of the fast name cannot sample outside its route: overrides are not negotiable."""
    answer = ask(
        routed, mode, True, False, model="qwen3-fast", top_p=0.01, temperature=0.3, logit_bias={"1": 5}
    )
    sent = seen(upstream, True, QWEN)
    assert answer.content == {0: qwen_answer(QWEN, 0)}
    assert (sent["top_p"], sent["temperature"]) == (0.8, 0.3)  # the client's own temperature stays
    assert "logit_bias" not in sent  # the model's drop still applies under the route


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_regex_route_carries_its_settings_to_every_id_it_matches_streamed(
    routed: Proxy, upstream: FakeUpstream, mode: str, chat: bool
) -> None:
    for size in ("8b", "32b"):
        served = f"qwen3-think-{size}"
        answer = ask(routed, mode, chat, True, model=f"deep-{size}", n=2)
        sent = seen(upstream, chat, served)
        assert answer.content == {i: qwen_answer(served, i) for i in range(2)}
        assert answer.reasoning == dict.fromkeys(range(2), QWEN_REASONING)
        assert answer.finish == dict.fromkeys(range(2), "stop")
        assert "/no_think" not in user_text(sent, chat)
        assert (sent["max_tokens"], sent["temperature"], sent["top_k"]) == (99, 1.0, 20)


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("mode", MODES)
def test_each_fallback_target_gets_its_own_route_settings(
    routed: Proxy, upstream: FakeUpstream, mode: str, stream: bool
) -> None:
    answer = ask(routed, mode, True, stream, model="qwen3-fallback")
    failed = seen(upstream, True, "status-503-route")
    served = seen(upstream, True, QWEN)
    assert answer.content == {0: qwen_answer(QWEN, 0)}
    assert answer.reasoning == {}
    assert failed["temperature"] == 0.1
    assert "/no_think" not in user_text(failed, True)  # its route says on
    assert served["temperature"] == 0.2
    assert user_text(served, True).endswith(" /no_think")


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_think_tags_strip_a_thinking_block(
    routed: Proxy, upstream: FakeUpstream, mode: str, chat: bool, stream: bool
) -> None:
    answer = ask(routed, mode, chat, stream, model="qwen3-tagged", n=2)
    assert user_text(seen(upstream, chat, TAGGED), chat).endswith(" /no_think")
    assert answer.content == {i: qwen_answer(TAGGED, i) for i in range(2)}
    assert answer.reasoning == {}


def test_the_thinking_block_is_relayed_without_think_tags(start_proxy: StartProxy) -> None:
    """The control for the test above: without THINK_TAGS only <think> counts."""
    proxy = start_proxy(
        MODEL_MAP=orjson.dumps(MODEL_MAP).decode(),
        DISABLE_THINKING="true",
        THINK_TAGS=None,
        THINK_OUTPUT=None,
    )
    answer = ask(proxy, "sync", True, True, model="qwen3-tagged")
    assert answer.content == {0: "<thinking>\n\n</thinking>\n\n" + qwen_answer(TAGGED, 0)}


def test_route_settings_in_the_config_file_reload(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """YAML's bare off/on (booleans to YAML) work as written, and a changed route applies live."""
    config = tmp_path / "config.yaml"

    def write(thinking: str, temperature: float) -> None:
        temporary = tmp_path / "next.yaml"
        temporary.write_text(
            "model_map:\n"
            "  qwen3-live:\n"
            f"    model: {QWEN}\n"
            f"    thinking: {thinking}\n"
            f"    params: {{defaults: {{temperature: {temperature}}}}}\n"
        )
        temporary.replace(config)

    write("off", 0.3)
    proxy = start_proxy(
        MODEL_MAP=None, CONFIG_FILE=str(config), CONFIG_POLL_SECONDS="0.2", DISABLE_THINKING=None
    )
    body = {"model": "qwen3-live", "messages": [{"role": "user", "content": "hi"}]}

    def sent() -> dict[str, Any]:
        response = httpx.post(f"{proxy.v1}/chat/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == 200
        return seen(upstream, True, QWEN)

    first = sent()
    assert (first["messages"][-1]["content"], first["temperature"]) == ("hi /no_think", 0.3)
    write("on", 0.9)

    def reloaded() -> None:
        now = sent()
        assert (now["messages"][-1]["content"], now["temperature"]) == ("hi", 0.9)

    eventually(reloaded, timeout=15)
