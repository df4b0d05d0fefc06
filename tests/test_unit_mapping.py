"""ModelMap: exact aliases first, then whole-id regexes in order; validation names the key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.mapping import MappingError, ModelMap, Resolution

# Model ids as clients send them: letters, digits and the usual separators (a key written as
# /.../ would be a regex, so exact keys never both start and end with a slash).
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._:/", min_size=1, max_size=30).filter(
    lambda s: not (len(s) >= 2 and s.startswith("/") and s.endswith("/"))
)


def test_exact_alias_resolves_to_its_target_with_itself_as_rule() -> None:
    model_map = ModelMap.parse({"gpt-3.5-turbo-16k": "qwen3-4b"})
    assert model_map.resolve("gpt-3.5-turbo-16k") == Resolution(
        "gpt-3.5-turbo-16k", "qwen3-4b", "gpt-3.5-turbo-16k"
    )


def test_exact_key_wins_over_a_regex_written_before_it() -> None:
    model_map = ModelMap.parse({"/gpt-4.*/": "from-regex", "gpt-4o": "from-exact"})
    assert model_map.resolve("gpt-4o") == Resolution("gpt-4o", "from-exact", "gpt-4o")
    assert model_map.resolve("gpt-4-turbo") == Resolution("gpt-4-turbo", "from-regex", "/gpt-4.*/")


@settings(max_examples=60, deadline=None)
@given(model=ids, exact_target=ids, regex_target=ids)
def test_any_exact_key_wins_over_a_catch_all_regex(model: str, exact_target: str, regex_target: str) -> None:
    model_map = ModelMap.parse({"/.*/": regex_target, model: exact_target})
    resolution = model_map.resolve(model)
    assert resolution.target == exact_target
    assert resolution.rule == model


def test_regexes_are_tried_in_order_and_the_first_match_wins() -> None:
    model_map = ModelMap.parse({"/gpt-4.*/": "first", "/gpt-.*/": "second", "/.*/": "third"})
    assert model_map.resolve("gpt-4o") == Resolution("gpt-4o", "first", "/gpt-4.*/")
    assert model_map.resolve("gpt-3.5") == Resolution("gpt-3.5", "second", "/gpt-.*/")
    assert model_map.resolve("claude") == Resolution("claude", "third", "/.*/")

    reversed_order = ModelMap.parse({"/.*/": "third", "/gpt-4.*/": "first"})
    assert reversed_order.resolve("gpt-4o").target == "third"


def test_a_regex_must_match_the_whole_id() -> None:
    model_map = ModelMap.parse({"/gpt-4/": "exactly-gpt-4"})
    assert model_map.resolve("gpt-4").target == "exactly-gpt-4"
    assert model_map.resolve("gpt-4o") == Resolution("gpt-4o", "gpt-4o", None)
    assert model_map.resolve("my-gpt-4") == Resolution("my-gpt-4", "my-gpt-4", None)


def test_numbered_group_reference_in_target() -> None:
    model_map = ModelMap.parse({"/llama-(\\d+)b/": "meta-llama-\\1B"})
    assert model_map.resolve("llama-70b") == Resolution("llama-70b", "meta-llama-70B", "/llama-(\\d+)b/")


def test_named_group_and_whole_match_references_in_target() -> None:
    model_map = ModelMap.parse(
        {
            "/(?P<family>llama)-(\\d+)b/": "\\g<family>-\\2-served",
            "/qwen.*/": "Qwen/\\g<0>",
        }
    )
    assert model_map.resolve("llama-8b").target == "llama-8-served"
    assert model_map.resolve("qwen3-4b").target == "Qwen/qwen3-4b"


@settings(max_examples=60, deadline=None)
@given(model=ids)
def test_unmatched_ids_pass_through_with_no_rule(model: str) -> None:
    model_map = ModelMap.parse({"zz-exact-alias": "t1", "/zz-prefix-.*/": "t2", "/(zz)-(\\d+)/": "\\2-\\1"})
    resolution = model_map.resolve(model)
    mapped = model == "zz-exact-alias" or model.startswith("zz-prefix-") or re.fullmatch(r"zz-\d+", model)
    if mapped:
        assert resolution.rule is not None
    else:
        assert resolution == Resolution(model, model, None)


def test_empty_map_passes_everything_through() -> None:
    model_map = ModelMap.parse({})
    assert model_map.resolve("anything") == Resolution("anything", "anything", None)
    assert model_map.aliases() == []
    assert model_map.known_ids() == set()


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"/gpt-(4/": "x"}, "/gpt-(4/", "invalid regular expression"),
        ({"/gpt-4/": "\\1"}, "/gpt-4/", "group"),
        ({"/gpt-(4)/": "\\2"}, "/gpt-(4)/", "group"),
        ({"/(?P<a>gpt)/": "\\g<b>"}, "/(?P<a>gpt)/", "group"),
        ({"/(?P<a>gpt)/": "\\g<>"}, "/(?P<a>gpt)/", "group"),
        ({"gpt-4": 5}, "gpt-4", "non-empty string"),
        ({"gpt-4": None}, "gpt-4", "non-empty string"),
        ({"gpt-4": ["a"]}, "gpt-4", "non-empty string"),
        ({"gpt-4": ""}, "gpt-4", "non-empty string"),
        ({"ok": "fine", "/re/": ""}, "/re/", "non-empty string"),
    ],
)
def test_bad_entries_raise_mapping_error_naming_the_key(
    raw: dict[str, object], key: str, fragment: str
) -> None:
    with pytest.raises(MappingError) as caught:
        ModelMap.parse(raw)
    message = str(caught.value)
    assert repr(key) in message
    assert fragment in message


@pytest.mark.parametrize("raw", [[], ["gpt-4"], "gpt-4", 3, None])
def test_a_map_that_is_not_an_object_is_refused(raw: object) -> None:
    with pytest.raises(MappingError, match="JSON object"):
        ModelMap.parse(raw)


def test_mapping_error_is_a_value_error() -> None:
    assert issubclass(MappingError, ValueError)


@pytest.mark.parametrize("target", ["x\\q", "x\\", "\\0"])
def test_every_target_that_parses_also_resolves_sensibly(target: str) -> None:
    """A target the map accepts must not blow up (or smuggle a control character) at request time.

    ``re.Match.expand`` rejects unknown escapes such as ``\\q`` and a trailing backslash, and
    reads ``\\0`` as an octal NUL rather than the whole match; validation must catch these at
    start-up (MappingError naming the key) instead of failing every request that matches.
    """
    key = "/gpt-(.*)/"
    try:
        model_map = ModelMap.parse({key: target})
    except MappingError as exc:
        refused: MappingError | None = exc
    else:
        refused = None
        resolved = model_map.resolve("gpt-4").target
        assert resolved.isprintable(), f"target {target!r} resolved to {resolved!r}"
    if refused is not None:
        assert repr(key) in str(refused)


def test_an_escaped_backslash_in_a_target_is_literal() -> None:
    model_map = ModelMap.parse({"/(a)/": "x\\\\1", "/b/": "\\\\"})
    assert model_map.resolve("a").target == "x\\1"
    assert model_map.resolve("b").target == "\\"


def test_aliases_lists_exact_keys_in_order_and_no_regexes() -> None:
    model_map = ModelMap.parse({"b-alias": "t", "/re.*/": "t", "a-alias": "u"})
    assert model_map.aliases() == ["b-alias", "a-alias"]


def test_known_ids_are_exact_keys_their_targets_and_literal_regex_targets() -> None:
    model_map = ModelMap.parse(
        {
            "gpt-3.5": "qwen3-4b",
            "/gpt-4.*/": "echo-model",
            "/llama-(\\d+)b/": "llama-\\1",
            "/(?P<x>mistral)/": "\\g<x>-served",
        }
    )
    assert model_map.known_ids() == {"gpt-3.5", "qwen3-4b", "echo-model"}


def test_regex_key_needs_slashes_at_both_ends() -> None:
    model_map = ModelMap.parse({"/": "slash", "/gpt": "prefix-only", "gpt/": "suffix-only"})
    assert model_map.regexes == ()
    assert model_map.resolve("/").target == "slash"
    assert model_map.resolve("/gpt").target == "prefix-only"
    assert model_map.resolve("gpt/").target == "suffix-only"
