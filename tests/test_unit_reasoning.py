"""Think blocks: split_think on whole answers, ThinkFilter on pieces, and both response shapes."""

from __future__ import annotations

import itertools
from typing import Any, AnyStr

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import ConfigError, load_settings
from service.reasoning import (
    DEFAULT_TAGS,
    ThinkFilter,
    ThinkStream,
    ThinkTags,
    split_think,
    transform_message,
)
from service.sse import SSEEvent, SSEParser, encode_data

QWEN3_EMPTY = "<think>\n\n</think>\n\n"
ENVELOPE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "qwen3-4b"}
DONE = b"data: [DONE]\n\n"


def split_at(text: AnyStr, cuts: list[int]) -> list[AnyStr]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def filtered(pieces: list[str], tags: ThinkTags = DEFAULT_TAGS) -> tuple[str, str]:
    think = ThinkFilter(tags)
    outputs = [think.feed(piece) for piece in pieces] + [think.finish()]
    return "".join(r for r, _ in outputs), "".join(c for _, c in outputs)


def chat_chunk(content: str | None = None, index: int = 0, finish: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return encode_data(orjson.dumps({**ENVELOPE, "choices": [choice]}))


def text_chunk(text: str, index: int = 0, finish: str | None = None) -> bytes:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return encode_data(orjson.dumps({**ENVELOPE, "object": "text_completion", "choices": [choice]}))


def usage_chunk() -> bytes:
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    return encode_data(orjson.dumps({**ENVELOPE, "choices": [], "usage": usage}))


def run(stream: ThinkStream, *chunks: bytes) -> bytes:
    return b"".join(stream.feed(chunk) for chunk in chunks) + stream.close()


def payloads(output: bytes) -> list[Any]:
    """The data of every event, which must each be JSON or [DONE]."""
    parser = SSEParser()
    datas = [e.data for e in parser.feed(output) + parser.close() if e.data is not None]
    return [data if data == "[DONE]" else orjson.loads(data) for data in datas]


def texts(output: bytes, field: str, index: int = 0, chat: bool = True) -> str:
    """The concatenated ``field`` of one choice over a stream's chunks."""
    parts = []
    for payload in payloads(output):
        for choice in payload["choices"] if isinstance(payload, dict) else []:
            holder = choice.get("delta", {}) if chat else choice
            if choice["index"] == index:
                parts.append(holder.get(field) or "")
    return "".join(parts)


def test_split_think_qwen3_empty_block() -> None:
    assert split_think(QWEN3_EMPTY + "Hello!") == ("\n\n", "Hello!")


def test_split_think_keeps_reasoning_as_written_and_drops_whitespace_after_the_block() -> None:
    assert split_think(" \n<think> a\n b \n</think> \n\t Answer\n") == (" a\n b \n", "Answer\n")


def test_split_think_without_tags_is_unchanged() -> None:
    assert split_think("  \n Hello") == (None, "  \n Hello")
    assert split_think("") == (None, "")


def test_split_think_only_a_leading_block_counts() -> None:
    assert split_think("Use <think>x</think> tags.") == (
        None,
        "Use <think>x</think> tags.",
    )
    assert split_think("<think>a</think>b <think>c</think>") == ("a", "b <think>c</think>")
    assert split_think("<thinking>x</thinking>") == (None, "<thinking>x</thinking>")


def test_split_think_without_a_closing_tag_is_all_reasoning() -> None:
    assert split_think("<think>still going") == ("still going", "")
    assert split_think("\n<think>") == ("", "")


def test_split_think_needs_nothing_but_whitespace_before_a_bare_close() -> None:
    assert split_think("step 1\n</think>\n\nAnswer") == (None, "step 1\n</think>\n\nAnswer")
    assert split_think("a <think> b </think> c") == (None, "a <think> b </think> c")
    assert split_think("\n\n</think>\n\nAnswer") == ("\n\n", "Answer")


def test_filter_releases_plain_text_at_once() -> None:
    think = ThinkFilter()
    assert think.feed("Hello") == ("", "Hello")
    assert think.feed(" <think> stays") == ("", " <think> stays")
    assert think.finish() == ("", "")
    assert not think.found


def test_filter_holds_a_tag_split_across_feeds() -> None:
    think = ThinkFilter()
    assert think.feed("\n<th") == ("", "")
    assert think.feed("ink>abc</thi") == ("abc", "")
    assert think.found
    assert think.feed("nk>") == ("", "")
    assert think.feed("\n \n") == ("", "")
    assert think.feed("Hi") == ("", "Hi")
    assert think.feed("\n") == ("", "\n")


def test_filter_releases_what_turns_out_not_to_be_a_tag() -> None:
    think = ThinkFilter()
    assert think.feed("  <thi") == ("", "")
    assert think.feed("ng>") == ("", "  <thing>")
    think = ThinkFilter()
    assert think.feed("<think>a</th") == ("a", "")
    assert think.feed("ought>b") == ("</thought>b", "")


def test_filter_finish_flushes_what_it_holds() -> None:
    think = ThinkFilter()
    assert think.feed(" \n<") == ("", "")
    assert think.finish() == ("", " \n<")
    think = ThinkFilter()
    assert think.feed("<think>unclosed </think") == ("unclosed ", "")
    assert think.finish() == ("</think", "")


def test_transform_chat_strip() -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": QWEN3_EMPTY + "Hi"}}]}
    assert transform_message(body, "strip", chat=True) == 1
    assert body == {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}]}


def test_transform_chat_reasoning_for_every_choice() -> None:
    body = {
        "choices": [
            {"index": 0, "message": {"content": "<think>why</think>\n\nA"}},
            {"index": 1, "message": {"content": "B"}},
            {"index": 2, "message": {"content": None, "tool_calls": []}},
        ]
    }
    assert transform_message(body, "reasoning", chat=True) == 1
    assert [choice["message"] for choice in body["choices"]] == [
        {"content": "A", "reasoning_content": "why"},
        {"content": "B"},
        {"content": None, "tool_calls": []},
    ]


def test_transform_leaves_reasoning_the_upstream_already_filled() -> None:
    message = {"content": "<think>x</think>A", "reasoning_content": "parsed upstream"}
    assert transform_message({"choices": [{"message": message}]}, "reasoning", chat=True) == 1
    assert message == {"content": "A", "reasoning_content": "parsed upstream"}
    message = {"content": "<think>x</think>A", "reasoning_content": ""}
    transform_message({"choices": [{"message": message}]}, "reasoning", chat=True)
    assert message == {"content": "A", "reasoning_content": "x"}


def test_transform_completions_without_a_closing_tag_in_both_modes() -> None:
    stripped = {"choices": [{"index": 0, "text": "<think>no end", "finish_reason": "length"}]}
    assert transform_message(stripped, "strip", chat=False) == 1
    assert stripped["choices"] == [{"index": 0, "text": "", "finish_reason": "length"}]
    moved = {"choices": [{"index": 0, "text": "<think>no end", "finish_reason": "length"}]}
    assert transform_message(moved, "reasoning", chat=False) == 1
    assert moved["choices"] == [
        {"index": 0, "text": "", "finish_reason": "length", "reasoning_content": "no end"}
    ]


def test_transform_ignores_bodies_without_choices_and_rejects_unknown_modes() -> None:
    assert transform_message({"error": {"message": "x"}}, "strip", chat=True) == 0
    with pytest.raises(ValueError, match="think mode"):
        transform_message({"choices": []}, "hide", chat=True)
    with pytest.raises(ValueError, match="think mode"):
        ThinkStream("hide", chat=True)


def test_stream_qwen3_empty_block_is_stripped_and_the_rest_relayed_byte_for_byte() -> None:
    role = chat_chunk("", role="assistant")
    answer = [chat_chunk("Hello"), chat_chunk(" world")]
    finish = chat_chunk(finish="stop")
    comment = b": keep-alive\n\n"
    block = [chat_chunk(piece) for piece in ("<think>", "\n\n", "</think>", "\n\n")]
    stream = ThinkStream("strip", chat=True)
    output = run(stream, role, *block, comment, *answer, finish, usage_chunk(), DONE)
    assert output == role + comment + b"".join(answer) + finish + usage_chunk() + DONE
    assert stream.stripped == 1


def test_stream_reasoning_mode_moves_the_block_to_reasoning_content() -> None:
    chunks = [chat_chunk(piece) for piece in ("<think>", "Let me", " think", "</think>", "\n\n", "Yes")]
    output = run(ThinkStream("reasoning", chat=True), *chunks, chat_chunk(finish="stop"), DONE)
    assert texts(output, "reasoning_content") == "Let me think"
    assert texts(output, "content") == "Yes"
    assert output.endswith(chat_chunk("Yes") + chat_chunk(finish="stop") + DONE)


def test_stream_tags_split_across_events() -> None:
    chunks = [chat_chunk(piece) for piece in ("<th", "ink>", "abc</thi", "nk>", " \n", " Hi")]
    output = run(ThinkStream("reasoning", chat=True), *chunks, DONE)
    assert texts(output, "reasoning_content") == "abc"
    assert texts(output, "content") == "Hi"


def test_stream_several_tags_in_one_event() -> None:
    output = run(
        ThinkStream("reasoning", chat=True), chat_chunk("<think>a</think>\n\nb <think>c</think>"), DONE
    )
    assert payloads(output)[0]["choices"][0]["delta"] == {
        "content": "b <think>c</think>",
        "reasoning_content": "a",
    }


def test_stream_without_a_closing_tag_in_both_modes() -> None:
    chunks = [chat_chunk("<think>"), chat_chunk("never"), chat_chunk(" ends", finish="length")]
    stripped = run(ThinkStream("strip", chat=True), *chunks, DONE)
    assert texts(stripped, "content") == ""
    assert [p["choices"][0]["finish_reason"] for p in payloads(stripped)[:-1]] == ["length"]
    moved = run(ThinkStream("reasoning", chat=True), *chunks, DONE)
    assert texts(moved, "reasoning_content") == "never ends"
    assert texts(moved, "content") == ""


def test_stream_held_text_goes_out_with_the_finish_reason() -> None:
    output = run(ThinkStream("strip", chat=True), chat_chunk("Hi"), chat_chunk(" <th", finish="stop"), DONE)
    assert output == chat_chunk("Hi") + chat_chunk(" <th", finish="stop") + DONE
    output = run(
        ThinkStream("strip", chat=True), chat_chunk("\n"), chat_chunk("<"), chat_chunk(finish="stop")
    )
    assert payloads(output) == payloads(chat_chunk("\n<", finish="stop"))


def test_stream_held_text_goes_out_before_done_or_at_the_end() -> None:
    expected = chat_chunk(" <thi") + DONE
    assert run(ThinkStream("strip", chat=True), chat_chunk(" <thi"), DONE) == expected
    assert run(ThinkStream("strip", chat=True), chat_chunk(" <thi")) == chat_chunk(" <thi")
    moved = run(ThinkStream("reasoning", chat=True), chat_chunk("<think>a</thi"), DONE)
    assert texts(moved, "reasoning_content") == "a</thi"


def test_stream_two_interleaved_choices_have_their_own_filters() -> None:
    chunks = [
        chat_chunk("<th", index=0),
        chat_chunk("Plain", index=1),
        chat_chunk("ink>x</think>", index=0),
        chat_chunk(" <think>", index=1),
        chat_chunk("\nA", index=0, finish="stop"),
        chat_chunk(" text", index=1, finish="stop"),
    ]
    stream = ThinkStream("reasoning", chat=True)
    output = run(stream, *chunks, DONE)
    assert (texts(output, "content", 0), texts(output, "reasoning_content", 0)) == ("A", "x")
    assert (texts(output, "content", 1), texts(output, "reasoning_content", 1)) == ("Plain <think> text", "")
    assert stream.stripped == 1


def test_stream_completions_use_text_and_a_reasoning_content_beside_it() -> None:
    chunks = [text_chunk("<think>r"), text_chunk("</think>"), text_chunk("\nT", finish="stop")]
    output = run(ThinkStream("reasoning", chat=False), *chunks, DONE)
    assert texts(output, "text", chat=False) == "T"
    assert texts(output, "reasoning_content", chat=False) == "r"
    assert payloads(output)[-2]["choices"][0] == {
        "index": 0,
        "text": "T",
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_stream_relays_crlf_events_and_what_is_not_a_chunk_untouched() -> None:
    untouched = [
        chat_chunk("Hi").replace(b"\n", b"\r\n"),
        b"data: not json\r\n\r\n",
        b'data: {"error": {"message": "overloaded"}}\n\n',
        b"event: ping\ndata: [1, 2]\n\n",
        usage_chunk(),
    ]
    block = chat_chunk("<think>x</think>").replace(b"\n", b"\r\n")
    output = run(ThinkStream("strip", chat=True), block, *untouched, DONE.replace(b"\n", b"\r\n"))
    assert output == b"".join(untouched) + DONE.replace(b"\n", b"\r\n")


def test_stream_keeps_an_event_whose_text_went_but_whose_logprobs_remain() -> None:
    logprobs = {"content": [{"token": "<think>", "logprob": -0.1, "bytes": None, "top_logprobs": []}]}
    choice = {"index": 0, "delta": {"content": "<think>"}, "logprobs": logprobs, "finish_reason": None}
    output = run(
        ThinkStream("strip", chat=True), encode_data(orjson.dumps({**ENVELOPE, "choices": [choice]}))
    )
    assert payloads(output) == [{**ENVELOPE, "choices": [{**choice, "delta": {"content": ""}}]}]


@pytest.mark.parametrize("chat", [True, False])
def test_the_openai_sdk_reads_the_rewritten_stream(chat: bool) -> None:
    pieces = ("<think>", "\n", "why", "</think>", "\n\n", "Because")
    chunks = [chat_chunk(p) if chat else text_chunk(p) for p in pieces]
    finish = chat_chunk(finish="stop") if chat else text_chunk("", finish="stop")
    body = run(ThinkStream("reasoning", chat=chat), *chunks, finish, usage_chunk(), DONE)

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    with (
        httpx.Client(transport=httpx.MockTransport(upstream)) as http,
        openai.OpenAI(api_key="test", base_url="http://upstream/v1", http_client=http) as client,
    ):
        if chat:
            messages: Any = [{"role": "user", "content": "why?"}]
            received = list(client.chat.completions.create(model="m", messages=messages, stream=True))
            holders: list[Any] = [c.choices[0].delta for c in received if c.choices]
            content = "".join(d.content or "" for d in holders)
        else:
            received = list(client.completions.create(model="m", prompt="why?", stream=True))
            holders = [c.choices[0] for c in received if c.choices]
            content = "".join(c.text for c in holders)
    assert content == "Because"
    assert "".join(getattr(h, "reasoning_content", None) or "" for h in holders) == "\nwhy"
    assert received[-1].usage is not None


fragments = st.sampled_from(
    ["<think>", "</think>", "<th", "ink>", "</thi", "nk>", "<", "/", ">", " ", "\n", "\t", "a", "Hi", "é"]
)
answers = st.lists(fragments, max_size=16).map("".join)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=answers)
def test_filter_agrees_with_split_think_for_any_split(data: st.DataObject, text: str) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    reasoning, content = split_think(text)
    assert filtered(split_at(text, cuts)) == (reasoning or "", content)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    answers_per_choice=st.lists(answers, min_size=1, max_size=2),
    mode=st.sampled_from(["strip", "reasoning"]),
    line_end=st.sampled_from([b"\n", b"\r\n"]),
)
def test_stream_output_is_sse_with_the_split_of_any_chunked_answer(
    data: st.DataObject,
    answers_per_choice: list[str],
    mode: str,
    line_end: bytes,
) -> None:
    tokens = [
        split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
        for text in answers_per_choice
    ]
    events = [chat_chunk("", index=i, role="assistant") for i in range(len(tokens))]
    for step in range(max(len(pieces) for pieces in tokens)):
        events += [chat_chunk(pieces[step], index=i) for i, pieces in enumerate(tokens) if step < len(pieces)]
    events += [chat_chunk(index=i, finish="stop") for i in range(len(tokens))]
    events += [usage_chunk(), DONE]
    upstream = b"".join(events).replace(b"\n", line_end)
    cuts = data.draw(st.lists(st.integers(0, len(upstream)), max_size=12))

    output = run(ThinkStream(mode, chat=True), *split_at(upstream, cuts))

    received = payloads(output)
    assert received[-1] == "[DONE]"
    assert received[-2] == orjson.loads(usage_chunk()[len(b"data: ") :])
    for index, text in enumerate(answers_per_choice):
        reasoning, content = split_think(text)
        assert texts(output, "content", index) == content
        assert texts(output, "reasoning_content", index) == (reasoning or "" if mode == "reasoning" else "")
        finishes = [c["finish_reason"] for p in received[:-1] for c in p["choices"] if c["index"] == index]
        assert [f for f in finishes if f is not None] == ["stop"]


def test_a_crlf_stream_cut_between_cr_and_lf_gives_the_same_bytes_at_every_cut() -> None:
    """The parser hands over the LF of a CRLF that ended the previous chunk on its own; after an
    event that went out re-encoded or dropped, relaying it would add a blank line."""
    events = [chat_chunk("<think>\n\n</think>\n\n"), chat_chunk("Hello"), chat_chunk(finish="stop"), DONE]
    stream = b"".join(event.replace(b"\n", b"\r\n") for event in events)
    whole = ThinkStream("strip", chat=True)
    expected = whole.feed(stream) + whole.close()
    assert b"\n\n\n" not in expected.replace(b"\r", b"")
    assert texts(expected, "content") == "Hello"
    for cut in range(1, len(stream)):
        split = ThinkStream("strip", chat=True)
        assert split.feed(stream[:cut]) + split.feed(stream[cut:]) + split.close() == expected, cut


# --- THINK_TAGS: other names for the block ----------------------------------------------------------

SEVERAL = ThinkTags.parse("think, thinking,reasoning")


def test_think_tags_parse_names_and_refuse_what_is_not_a_tag_name() -> None:
    assert SEVERAL.names == ("think", "thinking", "reasoning")
    assert SEVERAL.opens == ("<think>", "<thinking>", "<reasoning>")
    assert ThinkTags.parse("think,think") == DEFAULT_TAGS
    for bad in (
        "",
        " , ",
        "<think>",
        "think>",
        "9lives",
        "a b",
        "x" * 33,
        ",".join(f"t{i}" for i in range(17)),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the fault
            ThinkTags.parse(bad)


def test_split_think_with_several_tags_closes_only_with_the_opening_tag() -> None:
    assert split_think("<thinking>a</thinking>\n\nb", SEVERAL) == ("a", "b")
    assert split_think(" <reasoning>r</reasoning>b", SEVERAL) == ("r", "b")
    assert split_think("<thinking>a</think>b</thinking>c", SEVERAL) == ("a</think>b", "c")
    assert split_think("<think>a</thinking>b", SEVERAL) == ("a</thinking>b", "")
    assert split_think("\n</reasoning>\nb", SEVERAL) == ("\n", "b")
    assert split_think("<thinking>a</thinking>b") == (None, "<thinking>a</thinking>b")
    assert split_think("<thought>a</thought>b", SEVERAL) == (None, "<thought>a</thought>b")


def test_filter_with_several_tags_holds_a_split_tag_until_it_can_tell() -> None:
    think = ThinkFilter(SEVERAL)
    assert think.feed(" <think") == ("", "")  # <think> or <thinking>: not known yet
    assert think.feed("ing>a</think") == ("a", "")
    assert think.feed(">b</thinki") == ("</think>b", "")
    assert think.feed("ng>\n") == ("", "")
    assert think.feed("Hi") == ("", "Hi")
    other = ThinkFilter(SEVERAL)
    assert other.feed("<reas") == ("", "")
    assert other.feed("on>x") == ("", "<reason>x")


several_fragments = st.sampled_from(
    [
        "<think>", "</think>", "<thinking>", "</thinking>", "<reasoning>", "</reasoning>",
        "<th", "ink", "ing>", "</thi", "nk>", "<reas", "oning>", "<", "/", ">", " ", "\n", "a", "é",
    ]
)  # fmt: skip
several_answers = st.lists(several_fragments, max_size=16).map("".join)
tag_sets = st.sampled_from(["think", "thinking,think", "reasoning,think,thinking"]).map(ThinkTags.parse)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=several_answers, tags=tag_sets)
def test_filter_with_any_tags_agrees_with_split_think_for_any_split(
    data: st.DataObject, text: str, tags: ThinkTags
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    reasoning, content = split_think(text, tags)
    assert filtered(split_at(text, cuts), tags) == (reasoning or "", content)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    answers_per_choice=st.lists(several_answers, min_size=1, max_size=2),
    tags=tag_sets,
    mode=st.sampled_from(["strip", "reasoning"]),
    chat=st.booleans(),
)
def test_stream_with_any_tags_gives_the_split_of_any_chunked_answer(
    data: st.DataObject, answers_per_choice: list[str], tags: ThinkTags, mode: str, chat: bool
) -> None:
    events = []
    for index, text in enumerate(answers_per_choice):
        for piece in split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=6))):
            events.append(chat_chunk(piece, index=index) if chat else text_chunk(piece, index=index))
    events += [
        chat_chunk(index=i, finish="stop") if chat else text_chunk("", i, "stop")
        for i in range(len(answers_per_choice))
    ]
    upstream = b"".join([*events, DONE])
    cuts = data.draw(st.lists(st.integers(0, len(upstream)), max_size=12))

    output = run(ThinkStream(mode, chat, tags), *split_at(upstream, cuts))

    assert payloads(output)[-1] == "[DONE]"
    for index, text in enumerate(answers_per_choice):
        reasoning, content = split_think(text, tags)
        assert texts(output, "content" if chat else "text", index, chat) == content
        expected = reasoning or "" if mode == "reasoning" else ""
        assert texts(output, "reasoning_content", index, chat) == expected


def test_whole_answers_use_the_tags_given() -> None:
    body = {"choices": [{"index": 0, "message": {"content": "<thinking>why</thinking>\n\nA"}}]}
    assert transform_message(body, "reasoning", chat=True) == 0
    assert transform_message(body, "reasoning", chat=True, tags=SEVERAL) == 1
    assert body["choices"][0]["message"] == {"content": "A", "reasoning_content": "why"}


def test_think_tags_setting_defaults_to_think_and_a_bad_one_fails_naming_it() -> None:
    assert load_settings({"UPSTREAM_URL": "http://h:8000"}).think_tags == DEFAULT_TAGS
    assert load_settings({"UPSTREAM_URL": "http://h:8000", "THINK_TAGS": "think,thinking"}).think_tags == (
        ThinkTags(("think", "thinking"))
    )
    with pytest.raises(ConfigError, match=r"^THINK_TAGS: '<thinking>' is not a tag name"):
        load_settings({"UPSTREAM_URL": "http://h:8000", "THINK_TAGS": "think,<thinking>"})


def tool_chunk(index: int = 0) -> bytes:
    call = {"index": 3, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    choice = {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
    return encode_data(orjson.dumps({**ENVELOPE, "choices": [choice]}))


def parsing_every_event(mode: str, chat: bool) -> ThinkStream:
    stream = ThinkStream(mode, chat)
    stream._passes = lambda raw: False  # type: ignore[method-assign]
    return stream


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    first=answers,
    second=answers,
    late=st.integers(0, 8),
    mode=st.sampled_from(["strip", "reasoning"]),
    chat=st.booleans(),
)
def test_events_passed_without_parsing_are_the_ones_parsing_would_leave_alone(
    data: st.DataObject, first: str, second: str, late: int, mode: str, chat: bool
) -> None:
    """Once the choices seen are past their leading block, events are relayed without being
    parsed: the output is byte for byte what parsing every event gives, with a second choice
    that starts late (its think block, or whitespace before it), tool calls carrying an index
    of their own, and ``<`` in the text."""
    chunk = chat_chunk if chat else text_chunk
    pieces = split_at(first, data.draw(st.lists(st.integers(0, len(first)), max_size=8)))
    later = split_at(second, data.draw(st.lists(st.integers(0, len(second)), max_size=4)))
    events = [chunk(piece) for piece in pieces]
    events[late:late] = [chunk(piece, index=1) for piece in later]
    if chat:
        events.insert(data.draw(st.integers(0, len(events))), tool_chunk(data.draw(st.sampled_from([0, 1]))))
    events += [chunk("", finish="stop"), chunk("", index=1, finish="stop"), usage_chunk(), DONE]
    upstream = b"".join(events)
    # Anywhere, or only between events: reads of whole events take the chunk's fast path.
    bounds = list(itertools.accumulate(len(event) for event in events))
    anywhere = st.integers(0, len(upstream))
    cuts = data.draw(st.lists(anywhere if data.draw(st.booleans()) else st.sampled_from(bounds), max_size=10))

    fast = run(ThinkStream(mode, chat), *split_at(upstream, cuts))
    parsed = run(parsing_every_event(mode, chat), *split_at(upstream, cuts))

    assert fast == parsed


def handed_to_relay(stream: ThinkStream) -> list[tuple[bytes, bool]]:
    """The events ``stream`` hands to ``_relay`` from now on, each with whether it was parsed
    (it has data that ``_passes`` did not let through as it came)."""
    handed: list[tuple[bytes, bool]] = []
    relay, passes = stream._relay, stream._passes

    def recording(event: SSEEvent) -> bytes:
        handed.append((event.raw, event.data is not None and not passes(event.raw)))
        return relay(event)

    stream._relay = recording  # type: ignore[method-assign]
    return handed


def test_after_the_block_the_rest_of_a_long_answer_is_not_parsed() -> None:
    stream = ThinkStream("strip", chat=True)
    handed = handed_to_relay(stream)
    events = [chat_chunk("<think>plan</think>"), chat_chunk("Hello")] + [chat_chunk(" word")] * 50
    output = run(stream, *events, chat_chunk(finish="stop"), DONE)
    parsed = [raw for raw, was_parsed in handed if was_parsed]
    assert len(parsed) == 3  # the block, the first content (then settled), and [DONE]
    assert texts(output, "content") == "Hello" + " word" * 50


def test_a_chunk_of_whole_events_that_all_pass_goes_out_without_being_split() -> None:
    """Several events in one read, as a busy upstream connection delivers them: once settled,
    none reaches ``_relay``, and the chunk goes out as it came. One event that must be parsed
    (a new choice, here) sends the whole chunk through the parser, its neighbours unchanged."""
    stream = ThinkStream("strip", chat=True)
    stream.feed(chat_chunk("<think>plan</think>"))
    stream.feed(chat_chunk("Hello"))
    handed = handed_to_relay(stream)
    words = b"".join([chat_chunk(" word")] * 10)
    assert stream.feed(words) is words
    assert handed == []
    mixed = chat_chunk(" more") + chat_chunk("<think>x</think>late", index=1) + chat_chunk(" end")
    output = stream.feed(mixed)
    assert len(handed) == 3
    assert texts(output, "content") == " more end"
    assert texts(output, "content", index=1) == "late"
