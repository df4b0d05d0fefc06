"""payload.rewrite: only ``model`` changes, untouched bodies are forwarded as the same bytes."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import payload
from service.errors import ProxyError
from service.mapping import ModelMap
from service.params import ParamPolicy
from service.thinking import NO_THINK, ThinkingPolicy

MAP = ModelMap.parse(
    {
        "gpt-3.5-turbo-16k": "qwen3-4b",
        "whisper-1": "whisper-large-v3",
        "text-embedding-3-small": "bge-m3",
        "/gpt-4.*/": "echo-model",
    }
)
JSON = "application/json"


def rewrite(raw: bytes, endpoint: str = "chat/completions", content_type: str = JSON, **kw: Any) -> Any:
    policy = payload.Policy(
        ThinkingPolicy(disable=kw.get("disable_thinking", False)), kw.get("params", ParamPolicy())
    )
    return payload.rewrite(
        raw, content_type, endpoint, MAP, policy, kw.get("method", "POST"), kw.get("choice", 0)
    )


# -- completion endpoints: a JSON object is required ------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'[{"model": "gpt-4"}]',
        b'"gpt-4"',
        b"42",
        b"null",
        b"{not json",
        b'{"model": "gpt-4"',
        b"\xff\xfe\xfa",
        b'{"model": "\xff"}',
        b'{"model": "gpt-4", "x": NaN}',
        b'{"model": "gpt-4", "x": Infinity}',
    ],
)
def test_completion_bodies_that_are_not_a_json_object_are_400(endpoint: str, raw: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        rewrite(raw, endpoint)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_json"
    assert json.loads(caught.value.body())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_bodyless_completion_read_is_forwarded_as_is(endpoint: str, method: str) -> None:
    """``GET /v1/chat/completions`` lists stored completions: no body, nothing to rewrite."""
    result = rewrite(b"", endpoint, method=method)
    assert result.body == b""
    assert result.resolution is None
    assert result.stream is False


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_an_empty_completion_post_is_400(endpoint: str) -> None:
    with pytest.raises(ProxyError) as caught:
        rewrite(b"", endpoint)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"model": "gpt-4", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["arrays", "objects", "inside-object"],
)
def test_deeply_nested_json_is_400_not_recursion_error(raw: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        rewrite(raw)
    assert caught.value.status == 400


def test_unchanged_model_returns_the_very_same_bytes_object() -> None:
    raw = b'{ "model" : "local-model",\n "messages": [], "temperature": 0.50 }'
    result = rewrite(raw)
    assert result.body is raw
    assert result.resolution is not None
    assert result.resolution.rule is None
    assert result.resolution.target == "local-model"


def test_missing_or_non_string_model_is_forwarded_as_is() -> None:
    for raw in (b'{"messages": []}', b'{"model": 5}', b'{"model": null}', b'{"model": ["gpt-4"]}'):
        result = rewrite(raw)
        assert result.body is raw
        assert result.resolution is None


def test_rewritten_model_keeps_every_other_field() -> None:
    body = {
        "model": "gpt-3.5-turbo-16k",
        "messages": [{"role": "user", "content": "héllo \u2603 \U0001f600"}],
        "temperature": 0.7,
        "max_tokens": 16,
        "logit_bias": {"50256": -100},
        "stop": None,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    result = rewrite(json.dumps(body).encode())
    sent = json.loads(result.body)
    assert sent == {**body, "model": "qwen3-4b"}
    assert list(sent) == list(body)
    assert result.resolution.source == "gpt-3.5-turbo-16k"
    assert result.resolution.rule == "gpt-3.5-turbo-16k"


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 123456789012345678901234567890, -(10**40)], ids=str)
def test_integers_beyond_64_bits_survive_a_rewrite(number: int) -> None:
    raw = b'{"model": "gpt-3.5-turbo-16k", "seed": ' + str(number).encode() + b"}"
    result = rewrite(raw)
    sent = json.loads(result.body)
    assert sent["model"] == "qwen3-4b"
    assert sent["seed"] == number
    assert isinstance(sent["seed"], int)


def test_integers_beyond_64_bits_survive_when_the_model_is_unchanged() -> None:
    raw = b'{"model": "unmapped", "seed": 123456789012345678901234567890}'
    assert rewrite(raw).body is raw


def test_lone_surrogate_escape_survives_a_rewrite() -> None:
    """``\\ud800`` is a valid JSON escape (Python's json accepts it); a rewrite must not crash."""
    raw = b'{"model": "gpt-3.5-turbo-16k", "messages": [{"role": "user", "content": "x\\ud800y"}]}'
    result = rewrite(raw)
    sent = json.loads(result.body)
    assert sent["model"] == "qwen3-4b"
    assert sent["messages"][0]["content"] == "x\ud800y"


@pytest.mark.parametrize(
    ("raw", "stream"),
    [
        (b'{"model": "gpt-4o", "stream": true}', True),
        (b'{"model": "gpt-4o", "stream": false}', False),
        (b'{"model": "gpt-4o"}', False),
        (b'{"model": "gpt-4o", "stream": "true"}', False),
        (b'{"model": "gpt-4o", "stream": 1}', False),
        (b'{"model": "unmapped", "stream": true}', True),
    ],
)
def test_stream_flag_is_detected_only_when_true(raw: bytes, stream: bool) -> None:
    assert rewrite(raw).stream is stream
    assert rewrite(raw, "completions").stream is stream


def test_regex_rule_is_reported() -> None:
    result = rewrite(b'{"model": "gpt-4o"}')
    assert json.loads(result.body) == {"model": "echo-model"}
    assert result.resolution.rule == "/gpt-4.*/"


def test_thinking_switch_changes_the_body_even_when_the_model_does_not() -> None:
    raw = b'{"model": "unmapped", "messages": [{"role": "user", "content": "hi"}]}'
    assert rewrite(raw).body is raw
    result = rewrite(raw, disable_thinking=True)
    assert json.loads(result.body)["messages"][0]["content"] == f"hi {NO_THINK}"
    completion = rewrite(b'{"model": "gpt-4o", "prompt": "p"}', "completions", disable_thinking=True)
    assert json.loads(completion.body) == {"model": "echo-model", "prompt": f"p {NO_THINK}"}


def test_thinking_switch_that_changes_nothing_keeps_the_bytes() -> None:
    raw = b'{"model": "unmapped", "messages": [{"role": "user", "content": "hi /no_think"}]}'
    assert rewrite(raw, disable_thinking=True).body is raw


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
other_fields = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "model"), json_values, max_size=6)


@settings(max_examples=80, deadline=None)
@given(fields=other_fields, position=st.integers(min_value=0, max_value=6))
def test_every_other_field_survives_a_rewrite(fields: dict[str, Any], position: int) -> None:
    items = list(fields.items())
    items.insert(min(position, len(items)), ("model", "gpt-3.5-turbo-16k"))
    body = dict(items)
    result = rewrite(json.dumps(body).encode())
    sent = json.loads(result.body)
    assert sent == {**body, "model": "qwen3-4b"}
    assert list(sent) == list(body)


@settings(max_examples=60, deadline=None)
@given(fields=other_fields, model=st.text(max_size=20))
def test_an_unmapped_model_always_forwards_the_original_bytes(fields: dict[str, Any], model: str) -> None:
    if MAP.resolve(model).rule is not None:
        return
    raw = json.dumps({**fields, "model": model}, indent=1).encode()
    assert rewrite(raw).body is raw


# -- other endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [JSON, "application/json; charset=utf-8", "Application/JSON", "x/y+json"]
)
def test_other_json_endpoints_get_a_string_model_rewritten(content_type: str) -> None:
    raw = b'{"model": "text-embedding-3-small", "input": ["a", "b"]}'
    result = rewrite(raw, "embeddings", content_type)
    assert json.loads(result.body) == {"model": "bge-m3", "input": ["a", "b"]}
    assert result.resolution.target == "bge-m3"


def test_other_endpoints_pass_json_without_a_model_and_non_objects_as_is() -> None:
    for raw in (b'{"input": "x"}', b'{"model": 3}', b"[1, 2]", b'"text"'):
        result = rewrite(raw, "embeddings")
        assert result.body is raw
        assert result.resolution is None


NON_JSON_TYPES = ["", "text/plain", "application/octet-stream", "application/x-www-form-urlencoded"]


@pytest.mark.parametrize("content_type", NON_JSON_TYPES)
def test_other_endpoints_leave_non_json_bodies_alone(content_type: str) -> None:
    for raw in (b"model=gpt-3.5-turbo-16k", b'["gpt-3.5-turbo-16k"]', b"\x89PNG{", b'"{"'):
        result = rewrite(raw, "files", content_type)
        assert result.body is raw
        assert result.resolution is None
        assert result.stream is False


@pytest.mark.parametrize("content_type", [*NON_JSON_TYPES, "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("lead", [b"", b" \r\n\t", b"\xef\xbb\xbf"])
def test_a_json_object_is_read_as_json_whatever_its_content_type(content_type: str, lead: bytes) -> None:
    """llama.cpp and Ollama parse a body as JSON whatever its Content-Type: the proxy maps the
    model the upstream will read."""
    raw = lead + b'{"model": "gpt-3.5-turbo-16k", "input": "x"}'
    for endpoint in ("embeddings", "files", "chat/completions"):
        result = rewrite(raw, endpoint, content_type)
        assert payload.loads(result.body)["model"] == "qwen3-4b", (endpoint, content_type)
        assert result.resolution is not None


def test_a_json_object_that_does_not_parse_is_refused_whatever_its_content_type() -> None:
    with pytest.raises(ProxyError) as caught:
        rewrite(b'{"model": "gpt-3.5-turbo-16k",', "embeddings", "text/plain")
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_an_empty_body_on_another_endpoint_is_forwarded_as_is() -> None:
    result = rewrite(b"", "models", JSON)
    assert result.body == b""
    assert result.resolution is None


# -- multipart forms ---------------------------------------------------------------------------

BOUNDARY = "----formboundary7MA4YWxkTrZu0gW"


def form_part(name: str, value: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = disposition + (f"\r\nContent-Type: {content_type}" if content_type else "")
    return head.encode() + b"\r\n\r\n" + value


def multipart(parts: list[bytes], boundary: str = BOUNDARY) -> bytes:
    delimiter = b"--" + boundary.encode()
    return b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts) + delimiter + b"--\r\n"


AUDIO = bytes(range(256)) * 4 + b"\r\n\r\n--not-the-boundary\r\n" + b"\x00" * 10


def test_multipart_model_field_is_rewritten_and_file_parts_are_byte_identical() -> None:
    parts = [
        form_part("file", AUDIO, "audio.wav", "audio/wav"),
        form_part("model", b"whisper-1"),
        form_part("language", b"en"),
    ]
    raw = multipart(parts)
    result = rewrite(raw, "audio/transcriptions", f"multipart/form-data; boundary={BOUNDARY}")
    expected = multipart([parts[0], form_part("model", b"whisper-large-v3"), parts[2]])
    assert result.body == expected
    assert result.resolution.source == "whisper-1"
    assert result.resolution.target == "whisper-large-v3"


def test_multipart_with_an_unmapped_model_returns_the_same_bytes() -> None:
    raw = multipart([form_part("model", b"local-whisper"), form_part("file", AUDIO, "a.wav")])
    result = rewrite(raw, "audio/transcriptions", f"multipart/form-data; boundary={BOUNDARY}")
    assert result.body is raw
    assert result.resolution.rule is None


def test_a_file_part_named_model_is_not_touched() -> None:
    raw = multipart([form_part("model", b"whisper-1", "model.bin", "application/octet-stream")])
    result = rewrite(raw, "files", f"multipart/form-data; boundary={BOUNDARY}")
    assert result.body is raw
    assert result.resolution is None


def test_multipart_quoted_boundary() -> None:
    boundary = "quoted boundary'()+_,-./:=?"
    raw = multipart([form_part("model", b"whisper-1"), form_part("file", AUDIO, "x.wav")], boundary)
    content_type = f'multipart/form-data; charset=utf-8; boundary="{boundary}"'
    result = rewrite(raw, "audio/translations", content_type)
    expected = multipart(
        [form_part("model", b"whisper-large-v3"), form_part("file", AUDIO, "x.wav")], boundary
    )
    assert result.body == expected


def test_multipart_unquoted_name_parameter() -> None:
    raw = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--{BOUNDARY}--\r\n"
    ).encode()
    result = rewrite(raw, "audio/transcriptions", f"multipart/form-data; boundary={BOUNDARY}")
    assert result.body == raw.replace(b"whisper-1", b"whisper-large-v3")


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; charset=x"],
)
def test_multipart_without_a_boundary_is_400(content_type: str) -> None:
    raw = multipart([form_part("model", b"whisper-1")])
    with pytest.raises(ProxyError) as caught:
        rewrite(raw, "audio/transcriptions", content_type)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_multipart"


def test_multipart_model_value_that_is_not_utf8_is_left_alone() -> None:
    raw = multipart([form_part("model", b"\xff\xfe")])
    result = rewrite(raw, "audio/transcriptions", f"multipart/form-data; boundary={BOUNDARY}")
    assert result.body is raw
    assert result.resolution is None


boundaries = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_", min_size=8, max_size=40)
field_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
    lambda n: n != "model"
)


@settings(max_examples=60, deadline=None)
@given(
    boundary=boundaries,
    files=st.lists(st.tuples(field_names, st.binary(max_size=300)), max_size=3),
    fields=st.lists(st.tuples(field_names, st.text(max_size=30)), max_size=3),
    position=st.integers(min_value=0, max_value=6),
)
def test_multipart_rewrite_changes_only_the_model_value(
    boundary: str, files: list[tuple[str, bytes]], fields: list[tuple[str, str]], position: int
) -> None:
    others = [form_part(n, data, f"{n}.bin", "application/octet-stream") for n, data in files]
    others += [form_part(n, value.encode()) for n, value in fields]
    if any(b"--" + boundary.encode() in part for part in others):
        return  # a valid form never carries its boundary inside a part
    at = min(position, len(others))
    raw = multipart([*others[:at], form_part("model", b"gpt-4-vision"), *others[at:]], boundary)
    result = rewrite(raw, "images/edits", f"multipart/form-data; boundary={boundary}")
    assert result.body == multipart([*others[:at], form_part("model", b"echo-model"), *others[at:]], boundary)


# -- the JSON helpers --------------------------------------------------------------------------


def test_dumps_and_loads_round_trip_big_ints() -> None:
    value = {"n": 10**30 + 1, "m": -(2**70) - 1, "s": "ü"}
    loaded = payload.loads(payload.dumps(value))
    assert loaded == value
    assert isinstance(loaded["n"], int)


def test_is_json() -> None:
    assert payload.is_json("application/json")
    assert payload.is_json(" application/json ; charset=utf-8")
    assert payload.is_json("application/merge-patch+json")
    assert not payload.is_json("text/json-ish")
    assert not payload.is_json("")
    assert orjson.loads(payload.dumps({"a": 1})) == {"a": 1}


FALLBACK_MAP = ModelMap.parse({"gpt-4o": ["first-model", {"model": "second-model", "upstream": "default"}]})


def test_choice_writes_the_body_for_a_later_target_of_a_fallback_list() -> None:
    raw = b'{"model": "gpt-4o", "messages": []}'
    policy = payload.Policy(ThinkingPolicy(), ParamPolicy.parse({"second-model": {"drop": ["seed"]}}))
    for choice, model in enumerate(["first-model", "second-model"]):
        result = payload.rewrite(
            raw[:-1] + b', "seed": 1}', JSON, "chat/completions", FALLBACK_MAP, policy, "POST", choice
        )
        assert json.loads(result.body)["model"] == model
        assert ("seed" in json.loads(result.body)) is (choice == 0)
        assert result.resolution is not None
        assert [t.model for t in result.resolution.targets] == ["first-model", "second-model"]


def test_params_apply_to_any_json_body_after_mapping_and_unchanged_keeps_the_bytes() -> None:
    params = ParamPolicy.parse({"bge-m3": {"defaults": {"encoding_format": "float"}}})
    result = rewrite(b'{"model": "text-embedding-3-small", "input": "x"}', "embeddings", params=params)
    assert json.loads(result.body) == {"model": "bge-m3", "input": "x", "encoding_format": "float"}
    raw = b'{"model": "bge-m3", "input": "x", "encoding_format": "float"}'
    assert rewrite(raw, "embeddings", params=params).body is raw


# --- one parse decides: duplicate keys, and ids that cannot be labels -------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "expensive-model", "model": "qwen3-4b", "messages": []}',
        b'{"model": "qwen3-4b", "messages": [], "temperature": 0, "temperature": 2}',
        b'{"model": "a", "chat_template_kwargs": {"enable_thinking": false, "enable_thinking": true}}',
        b'{"model": "a", "messages": [{"role": "user", "role": "system", "content": "x"}]}',
        # an escaped colon elsewhere must not hide the dropped key from the count
        b'{"model": "a", "model": "b", "messages": [], "x": "\\u003a"}',
        b'{"model": "a", "m\\u006fdel": "b"}',
        b'{"model": "a", "model": "b", "n": 123456789012345678901234567890}',
        '{"model": "a", "model": "b"}'.encode("utf-16"),
    ],
)
def test_a_key_named_twice_goes_out_as_the_proxy_read_it(raw: bytes) -> None:
    """Parsers differ on which of two equal keys wins: the upstream must not get to choose."""
    cases = [("chat/completions", JSON), ("embeddings", JSON), ("embeddings", "text/plain")]
    for endpoint, content_type in cases if raw.startswith(b"{") else cases[:2]:  # UTF-16: said JSON
        result = rewrite(raw, endpoint, content_type)
        assert result.body != raw
        assert not payload.may_repeat_keys(result.body, payload.loads(result.body))
        assert payload.loads(result.body) == json.loads(raw)


def test_colons_in_strings_and_escapes_are_not_repeated_keys() -> None:
    raw = b'{"model": "qwen3-4b", "messages": [{"role": "user", "content": "a: b :: \\u003a"}], "k:": 1}'
    assert rewrite(raw).body is raw
    # A backslash written before u003a looks like an escaped colon: re-encoded, to be safe.
    odd = b'{"model": "qwen3-4b", "messages": [], "k": "\\\\u003a"}'
    assert payload.loads(rewrite(odd).body) == payload.loads(odd)


keyed_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('ab:"\\u')),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(st.sampled_from(["a", "b", ":", "a:b", "u003a"]), inner), max_size=4)
    ),
    max_leaves=15,
)


def _encode(value: Any, escaped: bool) -> str:
    """JSON text; a list of pairs is an object whose keys may repeat. ``escaped`` writes the
    colons inside strings as ``\\u003a``."""

    def string(text: str) -> str:
        return json.dumps(text).replace(":", "\\u003a") if escaped else json.dumps(text)

    if isinstance(value, list) and all(isinstance(item, tuple) for item in value) and value:
        return "{" + ",".join(f"{string(key)}:{_encode(item, escaped)}" for key, item in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(item, escaped) for item in value) + "]"
    return string(value) if isinstance(value, str) else json.dumps(value)


def _repeats_a_key(raw: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({key for key, _ in items}) != len(items)
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return found


@settings(max_examples=300, deadline=None)
@given(keyed_values, st.booleans())
def test_repeated_keys_are_found_exactly_as_a_pair_by_pair_parse_finds_them(
    value: Any, escaped: bool
) -> None:
    raw = _encode(value, escaped).encode()
    assert payload.may_repeat_keys(raw, payload.loads(raw)) == _repeats_a_key(raw)


@pytest.mark.parametrize("model", ["\ud800", "gpt-\udfff-4o", "a\ud83d"])
def test_a_model_that_is_not_valid_unicode_is_refused(model: str) -> None:
    raw = json.dumps({"model": model, "input": "x"}).encode()  # \ud800 escapes, as a client may send
    for endpoint in ("chat/completions", "embeddings"):
        with pytest.raises(ProxyError) as caught:
            rewrite(raw, endpoint)
        assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_a_model_id_over_the_limit_is_refused_in_json_and_forms() -> None:
    long_id = "m" * 257
    at_limit = "m" * 256
    assert rewrite(json.dumps({"model": at_limit}).encode()).resolution.source == at_limit
    with pytest.raises(ProxyError) as caught:
        rewrite(json.dumps({"model": long_id}).encode())
    assert (caught.value.status, caught.value.code) == (400, "invalid_model")
    form = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + long_id.encode() + b"\r\n--b--\r\n"
    )
    with pytest.raises(ProxyError):
        rewrite(form, "audio/transcriptions", "multipart/form-data; boundary=b")
    tighter = payload.Policy(ThinkingPolicy(), max_model_id=16)
    with pytest.raises(ProxyError):
        payload.rewrite(json.dumps({"model": "m" * 17}).encode(), JSON, "embeddings", MAP, tighter)
