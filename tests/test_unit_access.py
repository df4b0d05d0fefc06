"""service.access in-process: which keys pass, what is stripped, which paths are refused.

The end-to-end side (real proxy, real sockets, the SDK) is tests/test_security.py; here each
rule is pinned down exhaustively and fast.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.access import (
    check_key,
    check_path,
    parse_keys,
    presented_key,
    read_keys_file,
)
from service.errors import ProxyError
from tests.conftest import lands_under_v1

KEYS = ("sk-alpha-0001", "sk-beta-0002", "third-key")


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def refused(keys: tuple[str, ...], headers: list[tuple[str, str]]) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        check_key(keys, headers)
    return caught.value


# --- parse_keys / read_keys_file -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a", ("a",)),
        ("a,b", ("a", "b")),
        (" a , b ,, ", ("a", "b")),
        ("a\nb\n", ("a", "b")),
        ("a\r\nb\r\n", ("a", "b")),
        ("a,b\nc", ("a", "b", "c")),
        ("", ()),
        (" ,\n, ", ()),
    ],
)
def test_parse_keys_splits_on_commas_and_newlines_and_drops_blanks(text: str, expected: tuple) -> None:
    assert parse_keys(text) == expected


def test_read_keys_file_reads_a_mounted_secret_with_a_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-one\nsk-two\n")
    assert read_keys_file(str(path)) == ("sk-one", "sk-two")


def test_read_keys_file_errors_name_the_file_and_never_its_content(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ValueError, match="absent") as caught:
        read_keys_file(str(missing))
    assert "No such file" in str(caught.value)
    blank = tmp_path / "blank"
    blank.write_text("\n , \n")
    with pytest.raises(ValueError, match="holds no key"):
        read_keys_file(str(blank))
    with pytest.raises(ValueError, match="cannot read"):
        read_keys_file(str(tmp_path))  # a directory


# --- presented_key / check_key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Authorization", "Bearer k")], "k"),
        ([("authorization", "bearer k")], "k"),
        ([("AUTHORIZATION", "BEARER k")], "k"),
        ([("Authorization", "  Bearer   k  ")], "k"),
        ([("api-key", "k")], "k"),
        ([("Api-Key", " k ")], "k"),
        ([("Authorization", "Basic azpr")], None),
        ([("Authorization", "Token k")], None),
        ([("Authorization", "Bearer")], None),
        ([("Authorization", "Bearer   ")], None),
        ([("Authorization", "k")], None),
        ([("api-key", "  ")], None),
        ([("x-api-key", "k")], "k"),
        ([("X-Api-Key", " k ")], "k"),
        ([("x-api-key", "")], None),
        ([("Proxy-Authorization", "Bearer k")], None),
        ([("Cookie", "k")], None),
        ([], None),
        ([("Authorization", "Basic azpr"), ("api-key", "k")], "k"),
    ],
)
def test_presented_key_reads_bearer_api_key_or_x_api_key_only(
    headers: list[tuple[str, str]], expected: str | None
) -> None:
    assert presented_key(headers) == expected


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_passes_in_any_key_header(key: str) -> None:
    check_key(KEYS, bearer(key))
    check_key(KEYS, [("api-key", key)])
    check_key(KEYS, [("x-api-key", key)])
    check_key(KEYS, [("Content-Type", "application/json"), ("authorization", f"bearer {key}")])


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="no-credential"),
        pytest.param(bearer(""), id="empty-bearer"),
        pytest.param([("api-key", "")], id="empty-api-key"),
        pytest.param(bearer("sk-alpha-000"), id="prefix"),
        pytest.param(bearer("sk-alpha-00011"), id="suffix"),
        pytest.param(bearer("xsk-alpha-0001"), id="prepended"),
        pytest.param(bearer("SK-ALPHA-0001"), id="other-case"),
        pytest.param(bearer("sk-alpha-0001,sk-beta-0002"), id="two-keys-joined"),
        pytest.param(bearer("sk-alpha-0001 sk-beta-0002"), id="two-keys-spaced"),
        pytest.param(bearer("s"), id="one-char"),
        pytest.param([("Authorization", "Basic sk-alpha-0001")], id="basic-scheme"),
        pytest.param([("Authorization", "Token sk-alpha-0001")], id="token-scheme"),
        pytest.param([("Authorization", "sk-alpha-0001")], id="no-scheme"),
        pytest.param([("x-api-key", "sk-alpha-0001x")], id="x-api-key-wrong"),
        pytest.param(bearer("sk-alpha-0001\udcff"), id="not-utf8"),
        pytest.param([("x-api-key", "sk-alpha-000")], id="x-api-key-prefix"),
        pytest.param([("Proxy-Authorization", "Bearer sk-alpha-0001")], id="proxy-authorization"),
        pytest.param(bearer("sk-alpha-0001\x00"), id="nul-suffix"),
        pytest.param(bearer("sk-alphä-0001"), id="non-ascii"),
    ],
)
def test_anything_but_an_exact_configured_key_is_refused_with_401(headers: list[tuple[str, str]]) -> None:
    error = refused(KEYS, headers)
    assert error.status == 401
    assert error.code == "invalid_api_key"
    assert error.headers["WWW-Authenticate"].startswith("Bearer ")
    body = orjson.loads(error.body())
    assert body == {"error": {"message": error.message, "type": "authentication_error", "code": error.code}}


def test_the_401_never_echoes_the_presented_or_a_configured_key() -> None:
    error = refused(KEYS, bearer("sk-presented-wrong"))
    text = error.body().decode() + str(error.headers)
    for secret in (*KEYS, "sk-presented-wrong"):
        assert secret not in text


def test_no_configured_key_lets_nothing_through() -> None:
    assert refused((), bearer("anything")).status == 401


_KEY_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","), min_size=1
)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(_KEY_TEXT, min_size=1, max_size=5, unique=True), data=st.data())
def test_property_each_of_many_keys_passes_and_any_other_string_is_refused(
    keys: list[str], data: st.DataObject
) -> None:
    configured = tuple(keys)
    for key in configured:
        check_key(configured, bearer(key))
        check_key(configured, [("api-key", key)])
    other = data.draw(_KEY_TEXT.filter(lambda text: text not in configured))
    assert refused(configured, bearer(other)).status == 401
    key = data.draw(st.sampled_from(configured))
    for near in (key[:-1], key[1:], key + "x", "x" + key):
        if near and near not in configured:
            assert refused(configured, bearer(near)).status == 401


# --- check_path ------------------------------------------------------------------------------------


ALLOWED = [
    "/v1/chat/completions",
    "/v1/models/Qwen/Qwen3-4B",
    "/v1/models/org%2Fmodel",
    "/v1/files/file-abc.jsonl",
    "/v1/x/...",
    "/v1/x/..a",
    "/v1/x/a..",
    "/v1/x/.hidden",
    "/v1/x/%2e%2e%2e",
    "/v1/",
    "/v1//double",
    "/v1/%25252e%25252e/x",  # three decodes away from '..': never decoded that often
    "/v1/x;y",
    "/v1/models/a;b",
    "/v1/x/...;y",
]
REFUSED = [
    "/v1/../admin",
    "/v1/./models",
    "/v1/.",
    "/v1/..",
    "/v1/%2e%2e/admin",
    "/v1/%2E%2E/admin",
    "/v1/.%2e/admin",
    "/v1/%2e./admin",
    "/v1/%2e/models",
    "/v1/%252e%252e/x",
    "/v1/%25%32%65%25%32%65/x",
    "/v1/models/..",
    "/v1/models/%2e%2e",
    "/v1/x%5c..%5cadmin",
    "/v1/x%255c..",
    "/v1/x%00",
    "/v1/x%2500",
    "/v1/x/..%00",
    # A ';' path parameter: servlet containers (Tomcat, Jetty) read '..;x' as '..'.
    "/v1/..;/admin",
    "/v1/..;jsessionid=1/admin",
    "/v1/%2e%2e;/admin",
    "/v1/%2e%2e%3b/admin",
    "/v1/.;x/models",
    "/v1/%252e%252e%253bx/admin",
]
# A segment holding an encoded slash decodes to several segments: one of them '..' climbs out
# of /v1 at any upstream (or proxy in front of it) that decodes %2F before normalising.
REFUSED_ENCODED_SLASH = [
    "/v1/models/..%2f..%2fadmin",
    "/v1/models/..%2F..%2Fadmin",
    "/v1/files/%2e%2e%2f%2e%2e%2fadmin",
    "/v1/files/%2e%2e%2f",
    "/v1/files/x%2f..%2f..%2f..%2fadmin",
    "/v1/files/..%252f..%252fadmin",
]


@pytest.mark.parametrize("path", ALLOWED)
def test_ordinary_paths_pass(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize("path", REFUSED + REFUSED_ENCODED_SLASH)
def test_dot_segments_backslashes_and_nuls_are_refused_once_or_twice_encoded(path: str) -> None:
    with pytest.raises(ProxyError) as caught:
        check_path(path)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_path"


_SEGMENT = st.lists(
    st.sampled_from(
        ["..", ".", "a", "%2e", "%2E", "%252e", "%2f", "%2F", "%252f", "/", "%5c", "x", ";", "%3b"]
    ),
    min_size=1,
    max_size=6,
).map("".join)


@settings(max_examples=250, deadline=None)
@given(segments=st.lists(_SEGMENT, min_size=1, max_size=4))
def test_property_a_path_that_passes_stays_under_v1_after_one_or_two_decodes(segments: list[str]) -> None:
    path = "/v1/" + "/".join(segments)
    try:
        check_path(path)
    except ProxyError:
        return
    assert lands_under_v1(path), f"{path!r} passed the check but climbs out of /v1 once decoded"


@settings(max_examples=200, deadline=None)
@given(name=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\\\x00%"), max_size=20))
def test_property_an_encoded_ordinary_name_is_never_refused(name: str) -> None:
    """Model ids and file names (slashes included, as in ``org/model``) pass percent-encoded,
    unless they hold a '.' or '..' part (also before a ';'), a backslash, NUL or '%'."""
    if not name or {".", ".."} & {part.split(";", 1)[0] for part in name.split("/")}:
        return
    check_path("/v1/models/" + quote(name, safe=""))
