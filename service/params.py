"""Per-model request parameters (MODEL_PARAMS): defaults to fill in, overrides to force, keys to drop.

Keys are target model ids (the id after MODEL_MAP) or ``/regex/`` matching the whole id, as in
MODEL_MAP. Exactly one entry applies to a request (a MODEL_MAP route's own ``params`` are layered
over it, see ``ParamRule.over``): the exact id's entry if there is one, else the
first regex that matches, in the order written. So a model's policy is read off one place, and an
exact entry, even ``{}``, exempts that model from every regex.

Within an entry, ``drop`` removes keys, ``defaults`` sets keys the client left out (an explicit
``null`` counts as sent), ``overrides`` always sets keys. A key may appear in only one of the three,
which makes their order irrelevant and every request's outcome obvious from the config. Only
top-level keys are touched: an override replaces a whole nested object, it does not merge into it.
``model`` and ``stream`` are off limits: MODEL_MAP owns the first, and the proxy chooses how to
relay the answer from the client's own ``stream``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.patterns import compile_key, is_regex_key

_SECTIONS = ("defaults", "overrides", "drop")
_RESERVED = {
    "model": "MODEL_MAP decides the model",
    "stream": "streaming follows the client's own request",
}


class ParamsError(ValueError):
    """A MODEL_PARAMS entry that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class ParamRule:
    """One MODEL_PARAMS entry; its three key sets are disjoint."""

    defaults: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def __hash__(self) -> int:
        # By key names only: equal rules (1 == 1.0) must hash alike, and values may be unhashable.
        return hash((tuple(sorted(self.defaults)), tuple(sorted(self.overrides)), self.drop))

    def over(self, base: ParamRule | None) -> ParamRule:
        """This rule (a route's) layered over ``base`` (the target model's MODEL_PARAMS entry).

        For a key this rule names, its own section decides and the base's word on that key is
        dropped; the base keeps every other key, so drops add up. The sections stay disjoint.
        """
        if base is None:
            return self
        named = {*self.defaults, *self.overrides, *self.drop}
        return ParamRule(
            defaults={**_without(base.defaults, named), **self.defaults},
            overrides={**_without(base.overrides, named), **self.overrides},
            drop=tuple(name for name in base.drop if name not in named) + self.drop,
        )

    def apply(self, body: dict[str, Any]) -> bool:
        """Change ``body`` in place; True only when it now differs from what the client sent."""
        changed = False
        for name in self.drop:
            if name in body:
                del body[name]
                changed = True
        for name, value in self.defaults.items():
            if name not in body:
                body[name] = copy.deepcopy(value)
                changed = True
        for name, value in self.overrides.items():
            if name not in body or not _same_json(body[name], value):
                body[name] = copy.deepcopy(value)
                changed = True
        return changed

    def describe(self) -> str:
        """One line for `resolve`: each key with its value, long values cut short."""
        parts = [
            f"{section} {', '.join(names)}"
            for section, names in (
                ("defaults", [f"{name}={_short(value)}" for name, value in self.defaults.items()]),
                ("overrides", [f"{name}={_short(value)}" for name, value in self.overrides.items()]),
                ("drop", list(self.drop)),
            )
            if names
        ]
        return "; ".join(parts) or "none"


@dataclass(frozen=True)
class ParamPolicy:
    """Every MODEL_PARAMS entry; falsy when none is configured, so callers can skip the lookup."""

    exact: Mapping[str, ParamRule] = field(default_factory=dict)
    regexes: tuple[tuple[str, re.Pattern[str], ParamRule], ...] = ()

    @classmethod
    def parse(cls, raw: object) -> ParamPolicy:
        """Validate a decoded MODEL_PARAMS object; every problem names its key."""
        if not isinstance(raw, dict):
            raise ParamsError("must be a JSON object of target model id -> {defaults, overrides, drop}")
        exact: dict[str, ParamRule] = {}
        regexes: list[tuple[str, re.Pattern[str], ParamRule]] = []
        for key, value in raw.items():
            try:
                rule = parse_rule(value)
                if is_regex_key(key):
                    regexes.append((key, compile_key(key), rule))
                else:
                    exact[key] = rule
            except ValueError as exc:
                raise ParamsError(f"key {key!r}: {exc}") from None
        return cls(exact=exact, regexes=tuple(regexes))

    def __bool__(self) -> bool:
        return bool(self.exact or self.regexes)

    def rule_for(self, target_model: str, route: ParamRule | None = None) -> ParamRule | None:
        """The one entry for this target id (exact first, then the first matching regex), with
        the route's own rule, if any, layered over it."""
        rule = self.exact.get(target_model)
        if rule is None:
            rule = next((r for _, pattern, r in self.regexes if pattern.fullmatch(target_model)), None)
        return route.over(rule) if route is not None else rule

    def apply(self, body: dict[str, Any], target_model: str, route: ParamRule | None = None) -> bool:
        """Apply the target's entry to a decoded request body; True when the body must be re-encoded."""
        rule = self.rule_for(target_model, route)
        return rule.apply(body) if rule is not None else False


def parse_rule(value: object) -> ParamRule:
    """One ``{defaults, overrides, drop}`` object (a MODEL_PARAMS entry or a route's ``params``)."""
    if not isinstance(value, dict):
        raise ParamsError(f"must be an object with optional {', '.join(_SECTIONS)}")
    unknown = [name for name in value if name not in _SECTIONS]
    if unknown:
        raise ParamsError(f"unknown field {unknown[0]!r} (allowed: {', '.join(_SECTIONS)})")
    defaults = _parse_values("defaults", value.get("defaults", {}))
    overrides = _parse_values("overrides", value.get("overrides", {}))
    raw_drop = value.get("drop", [])
    if not isinstance(raw_drop, list) or not all(isinstance(name, str) for name in raw_drop):
        raise ParamsError("drop must be a list of parameter names")
    drop = list(dict.fromkeys(raw_drop))
    _check_names("drop", drop)
    seen: dict[str, str] = {}
    for section, names in (("drop", drop), ("defaults", defaults), ("overrides", overrides)):
        for name in names:
            if name in seen:
                raise ParamsError(f"{name!r} is in both {seen[name]} and {section}; write it in one")
            seen[name] = section
    return ParamRule(defaults=defaults, overrides=overrides, drop=tuple(drop))


def _parse_values(section: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ParamsError(f"{section} must be an object of parameter -> value")
    _check_names(section, value)
    # A private copy: later changes to the decoded config cannot reach requests.
    return copy.deepcopy(value)


def _check_names(section: str, names: Mapping[str, Any] | list[str]) -> None:
    for name, why in _RESERVED.items():
        if name in names:
            raise ParamsError(f"{section} cannot touch {name!r}; {why}")


def _without(values: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if name not in names}


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON, unlike ``==``: ``true``, ``1``, ``1.0`` (and ``0.0``, ``-0.0``) differ on the wire."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a.hex() == b.hex()  # tells -0.0 from 0.0
    return bool(a == b)
