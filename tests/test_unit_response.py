"""service.response: the same header bytes as Sanic's own sanitising, for any text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sanic.response import HTTPResponse

from service.response import Response


@given(st.text(alphabet=st.sampled_from("ab \t\r\n\x00é\u2028\ud800;=,"), max_size=40) | st.text(max_size=40))
def test_header_values_are_sanitised_exactly_as_sanic_does(value: str) -> None:
    assert Response._sanitize_header_value(value) == HTTPResponse._sanitize_header_value(value)


def test_breaks_in_a_header_value_are_taken_out_of_the_written_head() -> None:
    forged = {"x-forged": "a\r\nset-cookie: b\x00c\nd"}
    response = Response(b"{}", headers=forged, content_type="application/json")
    lines = dict(response.processed_headers)
    assert lines[b"x-forged"] == b"aset-cookie: bcd"
