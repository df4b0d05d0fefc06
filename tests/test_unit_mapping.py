"""ModelMap: exact aliases first, then whole-id regexes in order; validation names the key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.mapping import MappingError, ModelMap, Resolution, Target

# Model ids as clients send them: letters, digits and the usual separators (a key written as
# /.../ would be a regex, so exact keys never both start and end with a slash).
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._:/", min_size=1, max_size=30).filter(
    lambda s: not (len(s) >= 2 and s.startswith("/") and s.endswith("/"))
)


def test_exact_alias_resolves_to_its_target_with_itself_as_rule() -> None:
    model_map = ModelMap.parse({"gpt-3.5-turbo-16k": "qwen3-4b"})
    assert model_map.resolve("gpt-3.5-turbo-16k") == Resolution(
        "gpt-3.5-turbo-16k", (Target("qwen3-4b"),), "gpt-3.5-turbo-16k"
    )


def test_exact_key_wins_over_a_regex_written_before_it() -> None:
    model_map = ModelMap.parse({"/gpt-4.*/": "from-regex", "gpt-4o": "from-exact"})
    assert model_map.resolve("gpt-4o") == Resolution("gpt-4o", (Target("from-exact"),), "gpt-4o")
    assert model_map.resolve("gpt-4-turbo") == Resolution("gpt-4-turbo", (Target("from-regex"),), "/gpt-4.*/")


@settings(max_examples=60, deadline=None)
@given(model=ids, exact_target=ids, regex_target=ids)
def test_any_exact_key_wins_over_a_catch_all_regex(model: str, exact_target: str, regex_target: str) -> None:
    model_map = ModelMap.parse({"/.*/": regex_target, model: exact_target})
    resolution = model_map.resolve(model)
    assert resolution.target == exact_target
    assert resolution.rule == model


def test_regexes_are_tried_in_order_and_the_first_match_wins() -> None:
    model_map = ModelMap.parse({"/gpt-4.*/": "first", "/gpt-.*/": "second", "/.*/": "third"})
    assert model_map.resolve("gpt-4o") == Resolution("gpt-4o", (Target("first"),), "/gpt-4.*/")
    assert model_map.resolve("gpt-3.5") == Resolution("gpt-3.5", (Target("second"),), "/gpt-.*/")
    assert model_map.resolve("claude") == Resolution("claude", (Target("third"),), "/.*/")

    reversed_order = ModelMap.parse({"/.*/": "third", "/gpt-4.*/": "first"})
    assert reversed_order.resolve("gpt-4o").target == "third"


def test_a_regex_must_match_the_whole_id() -> None:
    model_map = ModelMap.parse({"/gpt-4/": "exactly-gpt-4"})
    assert model_map.resolve("gpt-4").target == "exactly-gpt-4"
    assert model_map.resolve("gpt-4o") == Resolution("gpt-4o", (Target("gpt-4o"),), None)
    assert model_map.resolve("my-gpt-4") == Resolution("my-gpt-4", (Target("my-gpt-4"),), None)


def test_numbered_group_reference_in_target() -> None:
    model_map = ModelMap.parse({"/llama-(\\d+)b/": "meta-llama-\\1B"})
    assert model_map.resolve("llama-70b") == Resolution(
        "llama-70b", (Target("meta-llama-70B"),), "/llama-(\\d+)b/"
    )


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
        assert resolution == Resolution(model, (Target(model),), None)


def test_empty_map_passes_everything_through() -> None:
    model_map = ModelMap.parse({})
    assert model_map.resolve("anything") == Resolution("anything", (Target("anything"),), None)
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
        ({"gpt-4": ""}, "gpt-4", "non-empty string"),
        ({"ok": "fine", "/re/": ""}, "/re/", "non-empty string"),
        ({"gpt-4": []}, "gpt-4", "must not be empty"),
        ({"gpt-4": ["a", ["b"]]}, "gpt-4", "item 1 is a list; lists do not nest"),
        ({"gpt-4": ["a", 5]}, "gpt-4", "fallback list item 1 must be a non-empty string or an object"),
        ({"gpt-4": ["a", ""]}, "gpt-4", "fallback list item 1 must be a non-empty string"),
        ({"gpt-4": ["a", None]}, "gpt-4", "fallback list item 1 must be"),
        ({"gpt-4": {"model": "a", "backend": "big"}}, "gpt-4", "unknown field 'backend'"),
        ({"gpt-4": {"model": ""}}, "gpt-4", '"model" must be a non-empty string'),
        ({"gpt-4": {"model": 4}}, "gpt-4", '"model" must be a non-empty string'),
        ({"gpt-4": {"upstream": "big"}}, "gpt-4", '"model" must be a non-empty string'),
        ({"gpt-4": {"model": "a", "upstream": 1}}, "gpt-4", '"upstream" must be a non-empty string'),
        ({"gpt-4": {"model": "a", "upstream": ""}}, "gpt-4", '"upstream" must be a non-empty string'),
        ({"gpt-4": ["a", {"model": "b", "upstream": None}]}, "gpt-4", 'item 1 "upstream" must be'),
        ({"gpt-4": ["a", {"model": "a"}]}, "gpt-4", "names model 'a' on upstream 'default' twice"),
        ({"/gpt-(4)/": ["x-\\1", "y-\\2"]}, "/gpt-(4)/", "group"),
        ({"/gpt-(4)/": [{"model": "\\0", "upstream": "big"}]}, "/gpt-(4)/", "octal escape"),
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


def test_an_object_target_names_its_upstream() -> None:
    model_map = ModelMap.parse({"gpt-4o": {"model": "qwen3-32b", "upstream": "big"}})
    resolution = model_map.resolve("gpt-4o")
    assert resolution == Resolution("gpt-4o", (Target("qwen3-32b", "big"),), "gpt-4o")
    assert resolution.target == "qwen3-32b"
    assert resolution.upstream == "big"


def test_an_object_target_without_upstream_goes_to_default() -> None:
    model_map = ModelMap.parse({"gpt-4o": {"model": "qwen3-32b"}})
    assert model_map.resolve("gpt-4o").targets == (Target("qwen3-32b", "default"),)


def test_a_string_target_and_a_passed_through_id_go_to_default() -> None:
    model_map = ModelMap.parse({"gpt-4o": "qwen3-32b"})
    assert model_map.resolve("gpt-4o").upstream == "default"
    assert model_map.resolve("other").upstream == "default"


def test_a_list_target_is_the_fallback_order() -> None:
    model_map = ModelMap.parse({"gpt-4o": ["qwen3-32b", "qwen3-14b"]})
    resolution = model_map.resolve("gpt-4o")
    assert resolution.targets == (Target("qwen3-32b"), Target("qwen3-14b"))
    assert resolution.target == "qwen3-32b"


def test_a_list_may_mix_strings_and_objects() -> None:
    model_map = ModelMap.parse(
        {"gpt-4o": [{"model": "qwen3-32b", "upstream": "big"}, "qwen3-14b", {"model": "qwen3-4b"}]}
    )
    assert model_map.resolve("gpt-4o").targets == (
        Target("qwen3-32b", "big"),
        Target("qwen3-14b", "default"),
        Target("qwen3-4b", "default"),
    )
    assert model_map.resolve("gpt-4o").upstream == "big"


def test_the_same_model_on_two_upstreams_is_a_fallback_not_a_duplicate() -> None:
    model_map = ModelMap.parse({"gpt-4o": [{"model": "q", "upstream": "big"}, "q"]})
    assert model_map.resolve("gpt-4o").targets == (Target("q", "big"), Target("q"))


def test_regex_group_references_expand_in_every_list_item() -> None:
    model_map = ModelMap.parse(
        {
            "/(?P<family>llama)-(\\d+)b/": [
                {"model": "\\g<family>-\\2-big", "upstream": "big"},
                "\\g<0>",
                {"model": "fixed-small", "upstream": "small"},
            ]
        }
    )
    assert model_map.resolve("llama-70b") == Resolution(
        "llama-70b",
        (Target("llama-70-big", "big"), Target("llama-70b"), Target("fixed-small", "small")),
        "/(?P<family>llama)-(\\d+)b/",
    )


def test_check_upstreams_accepts_rules_that_name_configured_backends() -> None:
    model_map = ModelMap.parse(
        {"a": ["x", {"model": "y", "upstream": "small"}], "/b.*/": {"model": "z", "upstream": "big"}}
    )
    model_map.check_upstreams({"default", "small", "big"})


@pytest.mark.parametrize(
    ("raw", "key", "upstream"),
    [
        ({"ok": "x", "gpt-4o": {"model": "q", "upstream": "big"}}, "gpt-4o", "big"),
        ({"gpt-4o": ["q", {"model": "r", "upstream": "huge"}]}, "gpt-4o", "huge"),
        ({"/gpt-(.*)/": [{"model": "\\1", "upstream": "big"}]}, "/gpt-(.*)/", "big"),
    ],
)
def test_check_upstreams_names_the_key_and_the_unknown_backend(
    raw: dict[str, object], key: str, upstream: str
) -> None:
    model_map = ModelMap.parse(raw)
    with pytest.raises(MappingError) as caught:
        model_map.check_upstreams(["small", "default"])
    assert str(caught.value) == (
        f"key {key!r}: unknown upstream {upstream!r} (UPSTREAMS names: default, small)"
    )


def test_check_upstreams_finds_a_string_target_needs_default() -> None:
    with pytest.raises(MappingError, match="key 'gpt-4o': unknown upstream 'default'"):
        ModelMap.parse({"gpt-4o": "q"}).check_upstreams({"big"})


def test_known_ids_include_every_literal_item_of_fallback_lists() -> None:
    model_map = ModelMap.parse(
        {
            "gpt-4o": ["qwen3-32b", {"model": "qwen3-14b", "upstream": "small"}],
            "/gpt-4.*/": [{"model": "echo-model", "upstream": "big"}, "\\g<0>-served", "last-resort"],
        }
    )
    assert model_map.known_ids() == {"gpt-4o", "qwen3-32b", "qwen3-14b", "echo-model", "last-resort"}


@settings(max_examples=60, deadline=None)
@given(
    model=ids,
    targets=st.lists(st.tuples(ids, st.sampled_from(["default", "a", "b"])), min_size=1, unique=True),
)
def test_an_exact_list_resolves_to_its_items_in_order(model: str, targets: list[tuple[str, str]]) -> None:
    raw = [{"model": name, "upstream": upstream} for name, upstream in targets]
    resolution = ModelMap.parse({model: raw}).resolve(model)
    assert resolution.targets == tuple(Target(name, upstream) for name, upstream in targets)
    assert (resolution.target, resolution.upstream) == targets[0]
