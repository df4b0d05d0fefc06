"""SSEParser: events cut from any chunking of a stream, exact raw bytes, data joined per the spec."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.reasoning import ThinkStream
from service.renaming import RenameStream
from service.sse import SSEEvent, SSEParser, at_boundary, encode_data, ends_stream


def parse(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close()


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds)]


def test_one_event_per_blank_line_with_its_exact_bytes() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'
    assert parse(stream) == [
        SSEEvent(b'data: {"a": 1}\n\n', '{"a": 1}'),
        SSEEvent(b'data: {"b": 2}\n\n', '{"b": 2}'),
    ]


def test_an_event_is_returned_as_soon_as_its_blank_line_arrives() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: par") == []
    assert parser.feed(b"tial\n") == []
    assert parser.feed(b"\n") == [SSEEvent(b"data: partial\n\n", "partial")]
    assert parser.close() == []


def test_several_data_lines_are_joined_with_newlines() -> None:
    assert parse(b"data: first\ndata:second\ndata:  third\ndata\n\n") == [
        SSEEvent(b"data: first\ndata:second\ndata:  third\ndata\n\n", "first\nsecond\n third\n")
    ]


def test_comments_have_no_data_and_keep_their_bytes() -> None:
    stream = b": keep-alive\n\ndata: x\n: inline comment\n\n"
    assert parse(stream) == [
        SSEEvent(b": keep-alive\n\n", None),
        SSEEvent(b"data: x\n: inline comment\n\n", "x"),
    ]


def test_other_fields_stay_in_raw_but_not_in_data() -> None:
    stream = b"event: message\nid: 7\nretry: 1000\ndata: x\nnonsense\n\nevent: ping\n\n"
    assert parse(stream) == [
        SSEEvent(b"event: message\nid: 7\nretry: 1000\ndata: x\nnonsense\n\n", "x"),
        SSEEvent(b"event: ping\n\n", None),
    ]


def test_an_empty_data_field_is_data_not_none() -> None:
    assert parse(b"data:\n\n") == [SSEEvent(b"data:\n\n", "")]


def test_crlf_line_ends() -> None:
    stream = b"data: a\r\ndata: b\r\n\r\n: c\r\n\r\n"
    assert parse(stream) == [SSEEvent(b"data: a\r\ndata: b\r\n\r\n", "a\nb"), SSEEvent(b": c\r\n\r\n", None)]


def test_cr_line_ends() -> None:
    stream = b"data: a\rdata: b\r\rdata: c\r\r"
    assert parse(stream) == [SSEEvent(b"data: a\rdata: b\r\r", "a\nb"), SSEEvent(b"data: c\r\r", "c")]


def test_a_cr_ending_a_chunk_ends_its_line_without_waiting() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\n\r") == [SSEEvent(b"data: a\r\n\r", "a")]
    # The LF completing that CRLF comes out on its own, so no byte is lost or delayed.
    assert parser.feed(b"\ndata: b\r") == [SSEEvent(b"\n", None)]
    assert parser.feed(b"\n\r\n") == [SSEEvent(b"data: b\r\n\r\n", "b")]
    assert parser.close() == []


def test_a_cr_then_a_line_that_is_not_lf_is_a_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\r") == [SSEEvent(b"data: a\rdata: b\r\r", "a\nb")]


def test_a_multibyte_character_split_across_chunks() -> None:
    stream = "data: héllo ✓ 🚀\n\n".encode()
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert parse(*chunks) == [SSEEvent(stream, "héllo ✓ 🚀")]


def test_invalid_utf8_is_replaced_in_data_but_raw_stays_exact() -> None:
    stream = b"data: a\xffb\xe2\x9c\n\n"
    assert parse(stream) == [SSEEvent(stream, "a\ufffdb\ufffd")]


def test_close_returns_the_last_event_without_its_blank_line() -> None:
    assert parse(b"data: a\n\ndata: b\n") == [SSEEvent(b"data: a\n\n", "a"), SSEEvent(b"data: b\n", "b")]
    assert parse(b"data: a\n\ndata: b") == [SSEEvent(b"data: a\n\n", "a"), SSEEvent(b"data: b", "b")]
    assert parse(b": only a comment") == [SSEEvent(b": only a comment", None)]
    assert parse(b"") == []


def test_extra_blank_lines_are_data_less_events() -> None:
    assert parse(b"\n\ndata: a\n\n\n") == [
        SSEEvent(b"\n", None),
        SSEEvent(b"\n", None),
        SSEEvent(b"data: a\n\n", "a"),
        SSEEvent(b"\n", None),
    ]


def test_a_leading_byte_order_mark_is_ignored_for_parsing_only() -> None:
    stream = b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n"
    assert parse(stream) == [
        SSEEvent(b"\xef\xbb\xbfdata: a\n\n", "a"),
        SSEEvent(b"\xef\xbb\xbfdata: b\n\n", None),
    ]


def test_the_parser_starts_over_after_close() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a") == []
    assert parser.close() == [SSEEvent(b"data: a", "a")]
    assert parser.feed(b"data: b\n\n") == [SSEEvent(b"data: b\n\n", "b")]


def test_encode_data_writes_one_line_for_json() -> None:
    assert encode_data(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_data('{"é":"✓"}') == 'data: {"é":"✓"}\n\n'.encode()
    assert encode_data("[DONE]") == b"data: [DONE]\n\n"


def test_encode_data_writes_one_data_line_per_line() -> None:
    assert encode_data("a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert parse(encode_data("a\n\n b")) == [SSEEvent(b"data: a\ndata: \ndata:  b\n\n", "a\n\n b")]


# Pieces of streams: fields, comments, every kind of line end, multi-byte and invalid bytes.
pieces = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"data",
        b"event: x",
        b": keep-alive",
        b"id: 1",
        b"\n",
        b"\r\n",
        b"\r",
        b'{"a": 1}',
        "é✓🚀".encode(),
        b"\xff\xe2",
        b"x",
        b" ",
        b":",
    ]
)
streams = st.lists(pieces, max_size=40).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), stream=streams)
def test_raw_bytes_of_all_events_are_the_stream_for_any_chunking(data: st.DataObject, stream: bytes) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    events = parse(*split_at(stream, cuts))
    assert b"".join(event.raw for event in events) == stream
    whole = parse(stream)
    assert [e.data for e in events if e.data is not None] == [e.data for e in whole if e.data is not None]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40).filter(lambda t: "\r" not in t))
def test_encode_data_round_trips_through_the_parser(text: str) -> None:
    encoded = encode_data(text)
    assert parse(encoded) == [SSEEvent(encoded, text)]


# --- bounded buffers: MAX_SSE_EVENT_BYTES -----------------------------------------------------

LIMIT = 1024


def renamed_event(model: str, pad: int = 0) -> bytes:
    return b'data: {"model": "' + model.encode() + b'", "pad": "' + b"x" * pad + b'"}\n\n'


def run_filter(chunks: list[bytes], limit: int = LIMIT) -> tuple[bytes, int]:
    """The filter's output, and the most bytes its parser held after any feed."""
    stream = RenameStream("asked", limit)
    out, held = [], 0
    for chunk in chunks:
        out.append(stream.feed(chunk))
        held = max(held, stream._parser.buffered)
    out.append(stream.close())
    return b"".join(out), held


def test_an_event_over_the_limit_and_the_rest_of_the_stream_are_relayed_as_they_come() -> None:
    before = renamed_event("served")
    big = renamed_event("served", pad=5 * LIMIT)
    after = renamed_event("served") + b": comment\n\n" + renamed_event("served")
    out, held = run_filter([before, big[:300], big[300:], after])
    assert out == b'data: {"model":"asked","pad":""}\n\n' + big + after
    assert held <= LIMIT


def test_one_line_that_never_ends_is_not_held_past_the_limit() -> None:
    endless = [b"data: " + b"y" * 500 for _ in range(100)]
    out, held = run_filter(endless)
    assert out == b"".join(endless)
    assert held <= LIMIT


def test_think_text_held_before_the_cut_over_is_released_first() -> None:
    think = ThinkStream("strip", chat=True, max_event=LIMIT)
    start = b'data: {"choices": [{"index": 0, "delta": {"content": "<thi"}}]}\n\n'
    assert think.feed(start) == b""  # held: it may become <think>
    big = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"z" * 2 * LIMIT + b'"}}]}\n\n'
    out = think.feed(big) + think.close()
    assert out.endswith(big)
    released = list(SSEParser().feed(out[: -len(big)]))
    assert [orjson.loads(event.data or "")["choices"][0]["delta"]["content"] for event in released] == [
        "<thi"
    ]


stream_events = st.lists(
    st.tuples(st.sampled_from(["served", "other"]), st.sampled_from([0, 10, 400, 1100, 3000])),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(events=stream_events, data=st.data())
def test_the_cut_over_falls_on_the_same_event_for_any_chunking(
    events: list[tuple[str, int]], data: st.DataObject
) -> None:
    raw = [renamed_event(model, pad) for model, pad in events]
    stream = b"".join(raw)
    whole, _ = run_filter([stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunked, held = run_filter(split_at(stream, cuts))
    assert chunked == whole
    assert held <= LIMIT
    first_big = next((i for i, event in enumerate(raw) if len(event) > LIMIT), len(raw))
    tail = b"".join(raw[first_big:])
    assert whole.endswith(tail)
    assert whole[: len(whole) - len(tail)].count(b'"model":"asked"') == first_big


# --- ends_stream / at_boundary: what the proxy looks at when a client leaves or a stream is quiet -----

FINAL = [
    b"data: [DONE]\n\n",
    b"data:[DONE]\r\n\r\n",
    b'data: {"choices":[]}\n\ndata: [DONE]\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    b'data: {"type": "message_stop"}\n\n',
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r"}}\n\n',
    b'"}]},"sequence_number":9,"type":"response.completed"}\n\n',  # vLLM: the type last, the start cut off
    b'event: response.incomplete\ndata: {"response":{}}\r\r',
]
NOT_FINAL = [
    b"",
    b"data: [DONE]\n",  # the blank line that ends it is not sent yet
    b'data: {"choices":[{"delta":{"content":"data: [DONE]\\n\\n"}}]}\n\n',
    b'event: content_block_delta\ndata: {"delta":{"text":"\\"type\\":\\"message_stop\\""}}\n\n',
    b'data: [DONE]\n\ndata: {"choices":[]}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta"}\n\n',
]


@pytest.mark.parametrize("sent", FINAL)
def test_ends_stream_finds_the_final_event(sent: bytes) -> None:
    assert ends_stream(sent)


@pytest.mark.parametrize("sent", NOT_FINAL)
def test_ends_stream_refuses_anything_else(sent: bytes) -> None:
    assert not ends_stream(sent)


@pytest.mark.parametrize(
    ("sent", "between"),
    [
        (b"", True),
        (b"data: x\n\n", True),
        (b"data: x\r\n\r\n", True),
        (b"data: x\n", False),
        (b"data: x", False),
    ],
)
def test_at_boundary(sent: bytes, between: bool) -> None:
    assert at_boundary(sent) is between


one_line_events = (
    st.lists(st.sampled_from([b"data: ", b"data:", b"x", b" ", "é".encode(), b"\xff", b":", b"\n", b"\r"]))
    .map(b"".join)
    .map(lambda line: line + b"\n\n")
)
writes_of_events = st.lists(
    st.lists(one_line_events, min_size=1, max_size=6).map(b"".join), min_size=1, max_size=5
)


def line_by_line(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    parser._whole_events = lambda chunk: None  # type: ignore[method-assign]
    return [event for chunk in chunks for event in parser.feed(chunk)] + parser.close()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), writes=writes_of_events)
def test_writes_of_whole_events_parse_as_the_line_parser_does(
    data: st.DataObject, writes: list[bytes]
) -> None:
    """A write of whole one-line data events is split at once, without the line parser, and
    gives the same events; other writes (CR, more lines, a blank event) go the long way."""
    if data.draw(st.booleans()):
        writes = [b"data: first\n\n", *writes]  # a stream's first line always goes the long way
    assert [(e.raw, e.data) for e in parse(*writes)] == [(e.raw, e.data) for e in line_by_line(*writes)]
