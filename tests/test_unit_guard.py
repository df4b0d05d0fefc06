"""service.guard's head check in-process: which request heads are refused, and which pass.

The wire side (real proxy, raw sockets, deadlines, the connection cap) is tests/test_wire.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.guard import head_problem

LINE = b"GET /v1/models HTTP/1.1"
TCHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize(
    "fields",
    [
        b"",
        b"\r\nHost: proxy",
        b"\r\nHost:proxy",
        b"\r\nX-Empty:",
        b"\r\nX-Tab:\tv\t",
        b"\r\nUser-Agent: caf\xc3\xa9 \xff obs-text",
        b"\r\n" + TCHARS + b": every token character",
    ],
)
def test_well_formed_field_lines_pass(fields: bytes) -> None:
    assert head_problem(LINE + fields, "/v1/models") is None


@pytest.mark.parametrize(
    "fields",
    [
        b"\r\nContent-Length : 5",
        b"\r\nContent-Length\t: 5",
        b"\r\n: empty name",
        b"\r\n Host: leading space",
        b"\r\nHost: proxy\r\n folded",
        b"\r\nX\x00Y: 1",
        b"\r\nX\nY: 1",
        b"\r\nX-A: 1\nX-B: 2",
        b"\r\nX-A: 1\rX-B: 2",
        b"\r\nX-A: a\x00b",
        b"\r\nno colon at all",
        b"\r\nX(Y): 1",
        b"\r\nX\xff: 1",
        b"\r\n\r\nHost: proxy",
    ],
)
def test_field_lines_outside_rfc_9112_are_refused(fields: bytes) -> None:
    assert head_problem(LINE + fields, "/v1/models") is not None


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("/v1/models", False),
        ("http://evil.example/v1/models", False),
        ("https://evil.example:8443/v1/models?x=1", False),
        ("http://evil.example", True),
        ("http://evil.example?x=/v1/", True),
        ("*", True),
        ("evil.example:443", True),
        ("@evil.example/v1/models", True),
        ("v1/models", True),
    ],
)
def test_a_target_is_a_path_or_an_absolute_url_with_one(target: str, refused: bool) -> None:
    assert (head_problem(LINE, target) is not None) == refused


@settings(max_examples=300, deadline=None)
@given(name=st.binary(min_size=0, max_size=12), value=st.binary(max_size=12))
def test_property_a_name_passes_exactly_when_it_is_a_token(name: bytes, value: bytes) -> None:
    name = name.replace(b":", b"")  # the first colon ends the name
    value = value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    is_token = bool(name) and all(byte in TCHARS for byte in name)
    assert (head_problem(LINE + b"\r\n" + name + b":" + value, "/") is None) == is_token
