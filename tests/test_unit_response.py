"""service.response: the same header bytes as Sanic's own sanitising, for any text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sanic.response import HTTPResponse

from service.relay import Relayed
from service.response import Response

_TRICKY = st.sampled_from("ab \t\r\n\x00\x7fé\u2028\ud800\udc80;=,")


@given(st.text(alphabet=_TRICKY, max_size=40) | st.text(max_size=40))
def test_header_lines_are_the_bytes_sanic_writes(value: str) -> None:
    headers = {"x-value": value, "x-" + value.encode("ascii", "ignore").decode(): "v"}
    ours = Response(b"{}", headers=headers, content_type="application/json", status=200)
    sanic = HTTPResponse(b"{}", headers=headers, content_type="application/json", status=200)
    assert written(ours) == written(sanic)


def written(response: HTTPResponse) -> list[tuple[bytes, bytes]] | type[Exception]:
    try:
        return list(response.processed_headers)
    except UnicodeError as exc:  # a lone surrogate fails both alike
        return type(exc)


def test_breaks_in_a_header_value_are_taken_out_of_the_written_head() -> None:
    forged = {"x-forged": "a\r\nset-cookie: b\x00c\nd"}
    response = Response(b"{}", headers=forged, content_type="application/json")
    lines = dict(response.processed_headers)
    assert lines[b"x-forged"] == b"aset-cookie: bcd"


def test_a_written_head_lets_go_of_its_headers() -> None:
    """Sanic keeps a stream's response object while the stream lasts: once the head is written,
    the headers are not held any longer. What was written is all there, Content-Type included."""
    response = Response(status=200, headers={"x-request-id": "abc"}, content_type="text/event-stream")
    lines = response.processed_headers
    assert lines == [(b"x-request-id", b"abc"), (b"content-type", b"text/event-stream")]
    assert len(response.headers) == 0


def test_a_relayed_answer_without_a_content_type_lets_go_of_its_headers_too() -> None:
    relayed = Relayed(status=200, headers=[("x-upstream", "a"), ("x-upstream", "b")])
    assert relayed.processed_headers == [(b"x-upstream", b"a"), (b"x-upstream", b"b")]
    assert len(relayed.headers) == 0
