"""RESPONSE_MODEL=requested: whole answers and SSE streams name the client's model, all else stays."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.reasoning import ThinkStream
from service.relay import StreamFilter
from service.renaming import RenameStream, rename_json
from service.sse import SSEParser, encode_data

BOM = b"\xef\xbb\xbf"
DONE = b"data: [DONE]\n\n"


def chunk(model: str = "qwen3-4b", content: str = "hi") -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model, "choices": [choice]}


def event(body: Any, *fields: bytes, end: bytes = b"\n") -> bytes:
    """An event with ``fields`` lines before its data, every line ended by ``end``."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return b"".join(line + end for line in (*fields, b"data: " + data, b""))


def run(stream: RenameStream, *chunks: bytes) -> bytes:
    return b"".join(stream.feed(piece) for piece in chunks) + stream.close()


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds)]


def datas(stream: bytes) -> list[str]:
    parser = SSEParser()
    return [e.data for e in [*parser.feed(stream), *parser.close()] if e.data is not None]


# Whole answers


def test_a_chat_completion_names_the_requested_model() -> None:
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen3-4b", "choices": []}
    renamed = rename_json(orjson.dumps(answer), "gpt-4o")
    assert orjson.loads(renamed) == {**answer, "model": "gpt-4o"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"object": "chat.completion", "model": "gpt-4o"}',
        b'{"object": "list", "data": []}',
        b'{"model": null}',
        b'{"model": 4}',
        b'{"choices": [{"message": {"content": "\\"model\\": \\"x\\""}}]}',
        b'["model", {"model": "qwen3-4b"}]',
        b'"model"',
        b'{"model": "qwen3-4b",',
        b'{"model": "qwen3-4b", "logprob": NaN}',
        b'{"model": "qwen3-4b", "big": 1e400}',
        b"",
        b"\x89PNG model",
    ],
    ids=[
        "equal",
        "absent",
        "null",
        "number",
        "only-in-a-string",
        "array",
        "string",
        "truncated",
        "nan",
        "out-of-range-float",
        "empty",
        "binary",
    ],
)
def test_answers_with_nothing_to_rename_are_the_same_bytes_object(body: bytes) -> None:
    assert rename_json(body, "gpt-4o") is body


def test_integers_beyond_64_bits_keep_every_digit() -> None:
    body = b'{"model": "qwen3-4b", "seed": 123456789012345678901234567890, "logprob": -0.1234}'
    renamed = rename_json(body, "gpt-4o")
    assert b"123456789012345678901234567890" in renamed
    seed = 123456789012345678901234567890
    assert json.loads(renamed) == {"model": "gpt-4o", "seed": seed, "logprob": -0.1234}


def test_a_responses_api_object_is_renamed_at_the_top_level() -> None:
    answer = {"id": "resp_1", "object": "response", "model": "qwen3-4b", "output": []}
    assert orjson.loads(rename_json(orjson.dumps(answer), "gpt-4o"))["model"] == "gpt-4o"


def test_a_responses_api_event_is_renamed_in_its_nested_response() -> None:
    created = {"type": "response.created", "response": {"object": "response", "model": "qwen3-4b"}}
    renamed = orjson.loads(rename_json(orjson.dumps(created), "gpt-4o"))
    assert renamed == {"type": "response.created", "response": {"object": "response", "model": "gpt-4o"}}


@pytest.mark.parametrize(
    ("upstream", "requested"),
    [
        ("qwen3-4b", "qwen3:4b"),
        ("qwen3:4b", "Qwen/Qwen3-4B"),
        ("qwen3-4b", "modèle-ß-日本語-🦙"),
        ("modèle-ß-日本語-🦙", "gpt-4o"),
        ("qwen3-4b", 'my "quoted" \\ model\n'),
    ],
)
def test_any_model_id_is_encoded_as_json_text(upstream: str, requested: str) -> None:
    body = json.dumps({"model": upstream, "text": "日本"}, ensure_ascii=False).encode()
    renamed = rename_json(body, requested)
    assert json.loads(renamed) == {"model": requested, "text": "日本"}
    assert json.dumps(requested, ensure_ascii=False).encode() in renamed


def test_a_lone_surrogate_escape_survives() -> None:
    body = b'{"model": "qwen3-4b", "text": "\\ud800"}'
    assert json.loads(rename_json(body, "gpt-4o")) == {"model": "gpt-4o", "text": "\ud800"}


# Streams


def test_every_chat_chunk_is_renamed_and_done_and_comments_are_untouched() -> None:
    stream = b": keep-alive\n\n" + event(chunk()) + event(chunk(content="!")) + DONE
    assert run(RenameStream("gpt-4o"), stream) == (
        b": keep-alive\n\n"
        + encode_data(orjson.dumps(chunk("gpt-4o")))
        + encode_data(orjson.dumps(chunk("gpt-4o", "!")))
        + DONE
    )


@pytest.mark.parametrize(
    "raw",
    [
        event(chunk("gpt-4o")),
        event(chunk("gpt-4o"), end=b"\r\n"),
        event({"choices": []}),
        b'data: not json but "model"\n\n',
        b'data: ["model"]\n\n',
        b"event: ping\nid: 4\n\n",
        b': a comment naming "model"\n\n',
        b"\n",
    ],
)
def test_events_with_nothing_to_rename_keep_their_exact_bytes(raw: bytes) -> None:
    assert run(RenameStream("gpt-4o"), raw) == raw


def test_crlf_events_are_renamed_with_lf_ends_and_others_keep_crlf() -> None:
    stream = event(chunk(), end=b"\r\n") + b": ping\r\n\r\n" + event(b"[DONE]", end=b"\r\n")
    assert run(RenameStream("gpt-4o"), stream) == (
        encode_data(orjson.dumps(chunk("gpt-4o"))) + b": ping\r\n\r\ndata: [DONE]\r\n\r\n"
    )


def test_event_id_retry_and_comment_lines_stay_in_order_around_one_data_line() -> None:
    raw = b'event: message\r\nid: 7\ndata: {"model":\n: split\rdata: "qwen3-4b"}\nretry: 500\n\n'
    assert run(RenameStream("gpt-4o"), raw) == (
        b'event: message\nid: 7\ndata: {"model":"gpt-4o"}\n: split\nretry: 500\n\n'
    )


def test_a_responses_api_stream_renames_each_nested_response_only() -> None:
    created = {"type": "response.created", "sequence_number": 0, "response": {"model": "qwen3-4b"}}
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hi"}
    done = {"type": "response.completed", "sequence_number": 2, "response": {"model": "qwen3-4b"}}
    stream = (
        event(created, b"event: response.created")
        + event(delta, b"event: response.output_text.delta")
        + event(done, b"event: response.completed")
    )
    renamed = {**created, "response": {"model": "gpt-4o"}}
    completed = {**done, "response": {"model": "gpt-4o"}}
    assert run(RenameStream("gpt-4o"), stream) == (
        event(renamed, b"event: response.created")
        + event(delta, b"event: response.output_text.delta")
        + event(completed, b"event: response.completed")
    )


def test_a_stream_keeps_integers_beyond_64_bits() -> None:
    raw = b'data: {"model":"qwen3-4b","seed":123456789012345678901234567890}\n\n'
    renamed = b'data: {"model":"gpt-4o","seed":123456789012345678901234567890}\n\n'
    assert run(RenameStream("gpt-4o"), raw) == renamed


def test_a_leading_byte_order_mark_stays_in_front_of_the_renamed_first_event() -> None:
    stream = BOM + event(chunk()) + event(chunk())
    renamed = encode_data(orjson.dumps(chunk("gpt-4o")))
    assert run(RenameStream("gpt-4o"), stream) == BOM + renamed + renamed


def test_a_last_event_without_its_blank_line_is_renamed_but_stays_unterminated() -> None:
    assert run(RenameStream("gpt-4o"), b'data: {"model":"qwen3-4b"}') == b'data: {"model":"gpt-4o"}\n'


def test_close_starts_over_for_the_next_stream() -> None:
    stream = RenameStream("gpt-4o")
    first = run(stream, BOM + b'data: {"model":"a"}\r\r')
    assert first == BOM + b'data: {"model":"gpt-4o"}\n\n'
    # A new stream: its leading LF is a blank line of its own, not the rest of the CRLF above.
    assert run(stream, b'\ndata: {"model":"b"}\n\n') == b'\ndata: {"model":"gpt-4o"}\n\n'


MIXED = (
    BOM
    + b": proxy keep-alive\r\n\r\n"
    + event(chunk(), end=b"\r\n")
    + event(chunk(content="日本語"), b"id: 1", end=b"\r")
    + event(chunk("gpt-4o"), end=b"\r\n")
    + event({"type": "response.created", "response": {"model": "qwen3-4b"}}, b"event: response.created")
    + b'data: {"model":"qwen3-4b","seed":123456789012345678901234567890}\r\n\r\n'
    + b"data: not json\r\r"
    + event(chunk("Qwen/Qwen3-4B"), end=b"\r")
    + event(b"[DONE]", end=b"\r\n")
)


def test_a_stream_cut_at_any_byte_gives_the_bytes_of_the_whole() -> None:
    whole = run(RenameStream("gpt-4o"), MIXED)
    for offset in range(len(MIXED) + 1):
        assert run(RenameStream("gpt-4o"), MIXED[:offset], MIXED[offset:]) == whole, offset
    assert run(RenameStream("gpt-4o"), *(MIXED[i : i + 1] for i in range(len(MIXED)))) == whole


def renamed_data(data: str, requested: str) -> str | dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return data
    if not isinstance(body, dict):
        return data
    for holder in (body, body.get("response")):
        if isinstance(holder, dict) and isinstance(holder.get("model"), str):
            holder["model"] = requested
    return body


models = st.text(max_size=12)
bodies = st.one_of(
    models.map(lambda model: orjson.dumps(chunk(model))),
    models.map(lambda model: orjson.dumps({"type": "response.created", "response": {"model": model}})),
    st.just(b"[DONE]"),
    st.just(b'not json, "model"'),
)
events = st.builds(
    lambda body, fields, end: event(body, *fields, end=end),
    bodies,
    st.lists(st.sampled_from([b"event: response.created", b"id: 9", b": comment", b"retry: 10"]), max_size=2),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), parts=st.lists(events, max_size=5), requested=models)
def test_any_chunking_gives_the_same_bytes_and_every_model_requested(
    data: st.DataObject, parts: list[bytes], requested: str
) -> None:
    stream = b"".join(parts)
    whole = run(RenameStream(requested), stream)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    assert run(RenameStream(requested), *split_at(stream, cuts)) == whole
    expected = [renamed_data(text, requested) for text in datas(stream)]
    assert [json.loads(text) if text.startswith("{") else text for text in datas(whole)] == expected


def test_think_stripping_then_renaming_in_one_stream_at_every_split() -> None:
    def chunk(content: str) -> bytes:
        body = {"id": "c", "model": "qwen3-4b", "choices": [{"index": 0, "delta": {"content": content}}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    stream = chunk("<think>\n\n</think>\n\n") + chunk("Hello") + b"data: [DONE]\n\n"
    whole = StreamFilter(ThinkStream("strip", True), RenameStream("gpt-4o"))
    expected = whole.feed(stream) + whole.close()
    events = [e for e in expected.split(b"\n\n") if e.startswith(b"data: {")]
    assert [json.loads(e[6:])["model"] for e in events] == ["gpt-4o"]
    assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "Hello"
    assert whole.stripped == 1
    for cut in range(1, len(stream)):
        split = StreamFilter(ThinkStream("strip", True), RenameStream("gpt-4o"))
        assert split.feed(stream[:cut]) + split.feed(stream[cut:]) + split.close() == expected
