"""The /no_think switch: where it goes, that it goes there once, and what it never touches."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service import thinking
from service.thinking import NO_THINK, disable_in_chat, disable_in_completion


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages)}


def test_string_content_of_the_last_user_message_gets_the_suffix() -> None:
    body = chat(
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    )
    assert disable_in_chat(body) is True
    assert [m["content"] for m in body["messages"]] == ["be brief", "first", "answer", f"second {NO_THINK}"]


def test_only_the_last_user_message_even_when_assistant_or_tool_messages_follow() -> None:
    body = chat(
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "tool output"},
    )
    assert disable_in_chat(body) is True
    assert body["messages"][0]["content"] == f"question {NO_THINK}"
    assert body["messages"][2]["content"] == "tool output"


def test_empty_string_content_becomes_the_switch_alone() -> None:
    body = chat({"role": "user", "content": ""})
    assert disable_in_chat(body) is True
    assert body["messages"][0]["content"] == NO_THINK


def test_list_content_gets_the_suffix_on_its_last_text_part() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = chat(
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}, image],
        }
    )
    assert disable_in_chat(body) is True
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "one"},
        {"type": "text", "text": f"two {NO_THINK}"},
        image,
    ]


def test_list_content_without_a_text_part_gets_one_added() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    body = chat({"role": "user", "content": [image]})
    assert disable_in_chat(body) is True
    assert body["messages"][0]["content"] == [image, {"type": "text", "text": NO_THINK}]


def test_a_text_part_without_string_text_counts_as_none() -> None:
    body = chat({"role": "user", "content": [{"type": "text", "text": None}]})
    assert disable_in_chat(body) is True
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": None},
        {"type": "text", "text": NO_THINK},
    ]


def test_never_twice_in_string_content() -> None:
    body = chat({"role": "user", "content": f"hello {NO_THINK}"})
    before = copy.deepcopy(body)
    assert disable_in_chat(body) is False
    assert body == before


def test_never_twice_in_list_content_even_when_an_earlier_part_has_it() -> None:
    body = chat(
        {
            "role": "user",
            "content": [{"type": "text", "text": f"a {NO_THINK}"}, {"type": "text", "text": "b"}],
        }
    )
    before = copy.deepcopy(body)
    assert disable_in_chat(body) is False
    assert body == before


def test_applying_twice_changes_nothing_the_second_time() -> None:
    body = chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]})
    assert disable_in_chat(body) is True
    once = copy.deepcopy(body)
    assert disable_in_chat(body) is False
    assert body == once


def test_no_user_message_leaves_the_body_unchanged() -> None:
    body = chat({"role": "system", "content": "s"}, {"role": "assistant", "content": "a"})
    before = copy.deepcopy(body)
    assert disable_in_chat(body) is False
    assert body == before


def test_malformed_messages_are_left_alone() -> None:
    for body in (
        {"model": "m"},
        {"model": "m", "messages": "hi"},
        {"model": "m", "messages": [1, "x", None]},
        chat({"role": "user", "content": None}),
        chat({"role": "user", "content": 42}),
        chat({"role": "user"}),
    ):
        before = copy.deepcopy(body)
        assert disable_in_chat(body) is False
        assert body == before


def test_completion_string_prompt_gets_the_suffix() -> None:
    body = {"model": "m", "prompt": "Once upon a time"}
    assert disable_in_completion(body) is True
    assert body["prompt"] == f"Once upon a time {NO_THINK}"
    assert disable_in_completion(body) is False
    assert body["prompt"] == f"Once upon a time {NO_THINK}"


def test_completion_list_of_strings_gets_the_suffix_on_each_that_lacks_it() -> None:
    body = {"model": "m", "prompt": ["a", f"b {NO_THINK}", ""]}
    assert disable_in_completion(body) is True
    assert body["prompt"] == [f"a {NO_THINK}", f"b {NO_THINK}", NO_THINK]
    assert disable_in_completion(body) is False


def test_completion_token_ids_and_other_prompts_are_untouched() -> None:
    for prompt in ([1, 2, 3], [[1, 2], [3]], [], ["text", 5], None, 7):
        body = {"model": "m", "prompt": copy.deepcopy(prompt)}
        assert disable_in_completion(body) is False
        assert body == {"model": "m", "prompt": prompt}
    assert disable_in_completion({"model": "m"}) is False


text_parts = st.lists(
    st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=20)),
        st.just({"type": "image_url", "image_url": {"url": "u"}}),
    ),
    max_size=5,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool"]),
            "content": st.one_of(st.text(max_size=20), text_parts),
        }
    ),
    max_size=6,
)


@settings(max_examples=80, deadline=None)
@given(messages=messages)
def test_only_the_last_user_message_ever_changes_and_only_once(messages: list[dict[str, Any]]) -> None:
    body = {"model": "m", "messages": messages}
    before = copy.deepcopy(body)
    changed = disable_in_chat(body)
    users = [i for i, m in enumerate(before["messages"]) if m["role"] == "user"]
    for index, (old, new) in enumerate(zip(before["messages"], body["messages"], strict=True)):
        if not users or index != users[-1]:
            assert old == new
    assert changed == (body != before)
    if users:
        content = body["messages"][users[-1]]["content"]
        text = content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)
        assert NO_THINK in text
    after_first = copy.deepcopy(body)
    assert disable_in_chat(body) is False
    assert body == after_first


def test_template_switch_merges_enable_thinking_false() -> None:
    body: dict[str, Any] = {"model": "m", "chat_template_kwargs": {"other": 1}}
    assert thinking.disable_in_template(body) is True
    assert body["chat_template_kwargs"] == {"other": 1, "enable_thinking": False}
    assert thinking.disable_in_template(body) is False
    fresh: dict[str, Any] = {"model": "m"}
    assert thinking.disable_in_template(fresh) is True
    assert fresh["chat_template_kwargs"] == {"enable_thinking": False}
