"""Usage found in answers' bytes, the usage chunk dropped from streams, stream_options merged."""

from __future__ import annotations

import json
import sys

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import usage
from service.mapping import ModelMap
from service.payload import Policy, rewrite
from service.reasoning import ThinkStream
from service.relay import StreamFilter
from service.renaming import RenameStream
from service.thinking import ThinkingPolicy
from service.usage import StreamMeter, Usage, UsageDrop, ask_for_usage, counted, find

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "qwen3-4b",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(CHAT, Usage(12, 5), id="chat"),
        pytest.param(
            {
                "object": "text_completion",
                "choices": [{"text": "x"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
            Usage(3, 1),
            id="completions",
        ),
        pytest.param(
            {
                "object": "list",
                "data": [{"embedding": [0.1]}],
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            },
            Usage(8, None),
            id="embeddings",
        ),
        pytest.param(
            {"object": "response", "output": [], "usage": {"input_tokens": 30, "output_tokens": 4}},
            Usage(30, 4),
            id="responses",
        ),
        pytest.param({"choices": [], "usage": None}, None, id="null"),
        pytest.param({"choices": []}, None, id="absent"),
        pytest.param({"usage": {"prompt_tokens": -1, "completion_tokens": 2}}, None, id="negative"),
        pytest.param({"usage": {"prompt_tokens": True, "completion_tokens": 2}}, None, id="bool"),
        pytest.param({"usage": {"prompt_tokens": "7", "completion_tokens": 2}}, None, id="string"),
        pytest.param({"usage": {"prompt_tokens": 2**60, "completion_tokens": 2}}, None, id="absurd"),
        pytest.param(
            {"usage": {"prompt_tokens": 2, "completion_tokens": 1.5}}, Usage(2, None), id="float-completion"
        ),
    ],
)
def test_find_reads_the_usage_object(answer: dict[str, object], expected: Usage | None) -> None:
    assert find(orjson.dumps(answer)) == expected
    assert find(json.dumps(answer, indent=2).encode()) == expected  # spaced, as some servers send


def test_find_skips_a_usage_key_that_is_not_usage() -> None:
    """The Responses API echoes tools, whose parameter schema may name a property ``usage``."""
    schema = {"type": "object", "properties": {"usage": {"type": "string"}}}
    answer = {"usage": {"input_tokens": 9, "output_tokens": 1}, "tools": [{"parameters": schema}]}
    assert find(orjson.dumps(answer)) == Usage(9, 1)


def test_text_a_client_makes_the_model_say_cannot_fake_usage() -> None:
    """Hostile: a prompt that makes the model print a usage object. Inside a JSON string its
    quotes are escaped, so it never matches the key."""
    fake = '"usage": {"prompt_tokens": 999999999, "completion_tokens": 999999999}'
    answer = {**CHAT, "choices": [{"index": 0, "message": {"content": fake}}]}
    assert find(orjson.dumps(answer)) == Usage(12, 5)
    alone = {"choices": [{"index": 0, "message": {"content": fake}}]}
    assert find(orjson.dumps(alone)) is None


def test_find_gives_up_on_broken_or_foreign_bytes() -> None:
    assert find(b"") is None
    assert find(b'{"usage": {"prompt_tokens": 3, "completion_tok') is None
    assert find(b'"usage"') is None
    assert find(b'"usage" x') is None
    assert find(b"\x1f\x8b\x08\x00 gzip bytes") is None
    # Deeper nesting than the standard library's scanner allows is not usage either.
    assert find(b'{"usage": ' + b"{" * 5000) is None


def stream(*chunks: dict[str, object], done: bool = True) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def delta(text: str, **extra: object) -> dict[str, object]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
        **extra,
    }


USAGE_CHUNK = {
    "id": "c",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 4, "completion_tokens": 2},
}


def test_meter_finds_the_usage_chunk_of_a_stream_and_the_pace() -> None:
    meter = StreamMeter()
    body = stream(delta("a"), delta("b"), USAGE_CHUNK)
    for piece in (body[:40], body[40:41], body[41:]):
        meter.feed(piece)
    assert meter.usage() == Usage(4, 2)
    assert meter.first is not None
    assert meter.last is not None
    assert meter.last >= meter.first


def test_meter_finds_nothing_in_a_stream_without_usage() -> None:
    meter = StreamMeter()
    meter.feed(stream(delta("a", usage=None), delta("b", usage=None)))
    assert meter.usage() is None


def test_meter_keeps_only_the_last_chunks() -> None:
    """Memory per stream stays bounded however long it runs: an early chunk is let go of."""
    meter = StreamMeter()
    first = stream(delta("first"), done=False)
    unheld = sys.getrefcount(first)
    meter.feed(first)
    assert sys.getrefcount(first) > unheld
    for _ in range(10_000):
        meter.feed(stream(delta("x"), done=False))
    meter.feed(stream(USAGE_CHUNK))
    assert meter.usage() == Usage(4, 2)
    assert sys.getrefcount(first) == unheld
    assert len(meter._tail) <= 4


@pytest.mark.parametrize("before", range(6))
def test_meter_joins_its_last_chunks_in_order(before: int) -> None:
    """A usage chunk split over the last reads is found wherever the ring of chunks wraps."""
    meter = StreamMeter()
    for _ in range(before):
        meter.feed(stream(delta("x"), done=False))
    last = stream(USAGE_CHUNK)
    for piece in (last[:30], last[30:60], last[60:]):
        meter.feed(piece)
    assert meter.usage() == Usage(4, 2)


def test_time_per_output_token() -> None:
    meter = StreamMeter()
    meter.first, meter.last = 10.0, 10.9
    assert meter.per_token(Usage(5, 10)) == pytest.approx(0.1)
    assert meter.per_token(Usage(5, 1)) is None  # one token: no interval
    assert meter.per_token(Usage(5, None)) is None
    meter.last = 10.0
    assert meter.per_token(Usage(5, 10)) is None  # all text in one read: no pace to tell


def test_drop_removes_only_the_usage_chunk_byte_for_byte() -> None:
    """OpenAI puts ``"usage": null`` in every chunk once usage is asked for: those stay."""
    kept = stream(delta("a", usage=None), delta("b", usage=None), done=False)
    assert UsageDrop().feed(kept + stream(USAGE_CHUNK)) == kept + b"data: [DONE]\n\n"


def test_drop_keeps_events_it_cannot_read_or_that_carry_text() -> None:
    odd = (
        b": keep-alive\n\n"
        b'data: {"usage": {"prompt_tokens": 1}, "choices": [{"index": 0, "delta": {"content": "x"}}]}\r\n\r\n'
        b'data: {"usage": {"prompt_tokens": 1}}\n\n'
        b'data: ["usage"]\n\n'
        b'data: not json "usage"\n\n'
    )
    drop = UsageDrop()
    assert drop.feed(odd) + drop.close() == odd


@given(
    st.lists(st.integers(min_value=1, max_value=60), max_size=20), st.sampled_from([b"\n", b"\r\n", b"\r"])
)
def test_drop_gives_the_same_bytes_for_any_chunking(cuts: list[int], end: bytes) -> None:
    events = [delta("a"), delta("b", usage=None), USAGE_CHUNK]
    body = b"".join(b"data: " + orjson.dumps(e) + end + end for e in events) + b"data: [DONE]" + end + end
    expected = (
        b"".join(b"data: " + orjson.dumps(e) + end + end for e in events[:2]) + b"data: [DONE]" + end + end
    )
    drop = UsageDrop()
    out, at = [], 0
    for size in cuts:
        out.append(drop.feed(body[at : at + size]))
        at += size
    out.append(drop.feed(body[at:]))
    out.append(drop.close())
    assert b"".join(out) == expected


def test_ask_for_usage_merges_with_the_clients_stream_options() -> None:
    body: dict[str, object] = {"stream": True}
    assert ask_for_usage(body) is True
    assert body["stream_options"] == {"include_usage": True}
    body = {"stream_options": {"include_usage": False, "other": 1}}
    assert ask_for_usage(body) is True
    assert body["stream_options"] == {"include_usage": True, "other": 1}
    asked = {"stream_options": {"include_usage": True}}
    assert ask_for_usage(asked) is False
    assert asked == {"stream_options": {"include_usage": True}}
    continuous = {"stream_options": {"continuous_usage_stats": True}}
    assert ask_for_usage(continuous) is False
    assert continuous == {"stream_options": {"continuous_usage_stats": True}}
    odd = {"stream_options": "yes"}
    assert ask_for_usage(odd) is False
    assert odd == {"stream_options": "yes"}


ALWAYS = Policy(ThinkingPolicy(), stream_usage=True)
MAP = ModelMap.parse({})


def test_rewrite_asks_streamed_completions_for_usage_only_with_always() -> None:
    raw = b'{"model": "m", "stream": true, "messages": []}'
    for endpoint in ("chat/completions", "completions"):
        done = rewrite(raw, "application/json", endpoint, MAP, ALWAYS)
        assert done.usage_added
        assert orjson.loads(done.body)["stream_options"] == {"include_usage": True}
        same = rewrite(raw, "application/json", endpoint, MAP, Policy(ThinkingPolicy()))
        assert (same.body, same.usage_added) == (raw, False)
    # Not streamed, another endpoint, or already asked: the client's bytes go as they came.
    for body, endpoint in (
        (b'{"model": "m", "stream": false}', "chat/completions"),
        (b'{"model": "m", "stream": true}', "embeddings"),
        (b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}', "chat/completions"),
    ):
        done = rewrite(body, "application/json", endpoint, MAP, ALWAYS)
        assert (done.body, done.usage_added) == (body, False)


def test_counted_endpoints() -> None:
    assert counted("POST", "/v1/chat/completions", "chat/completions")
    assert counted("POST", "/v1/responses", "responses")
    assert counted("POST", "/v1/embeddings/", "embeddings")
    assert not counted("GET", "/v1/chat/completions/abc", "chat/completions")  # stored: read back
    assert not counted("GET", "/v1/responses/resp_1", "responses")
    assert not counted("POST", "/v1/responses/resp_1/cancel", "responses")
    assert not counted("POST", "/v1/moderations", "moderations")
    assert {"chat/completions", "completions", "embeddings", "responses"} == usage.ENDPOINTS


def test_drop_runs_before_think_stripping_and_renaming() -> None:
    """The chain gives what think stripping and renaming give a stream that never had the chunk."""
    think = [delta("<think>\nhm\n</think>\n\n"), delta("answer"), USAGE_CHUNK]
    with_chunk, without_chunk = stream(*think), stream(*think[:2])

    def chain(drop: UsageDrop | None) -> StreamFilter:
        return StreamFilter(ThinkStream("strip", chat=True), RenameStream("gpt-4o"), drop)

    expected = chain(None).feed(without_chunk)
    for cut in range(1, len(with_chunk), 7):
        filters = chain(UsageDrop())
        out = filters.feed(with_chunk[:cut]) + filters.feed(with_chunk[cut:]) + filters.close()
        assert out == expected
    assert b"<think>" not in expected
    assert b'"usage"' not in expected
