"""Model id rewriting: exact aliases first, then whole-id regexes in the order written.

A target is a model id on a named upstream backend ("default" unless written), with the route's
own settings (``service.routes``); a list of targets is a fallback order, tried first to last by
whoever forwards the request. Aliases resolve once: a target is never looked up again, so a
target that is itself a key elsewhere in the map is still sent upstream as written.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace

from service import routes
from service.patterns import compile_key, is_regex_key
from service.routes import NO_ROUTE, Route

_RESOLVED_MAX = 4096
_GROUP_REF = re.compile(r"\\(?:g<([^>]*)>|(\d+))")
_TARGET_FIELDS = ("model", "upstream", *routes.FIELDS)
_ITEM_SHAPE = 'a non-empty string or an object {"model", "upstream", ...}'


class MappingError(ValueError):
    """A MODEL_MAP entry that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class Target:
    """One place a request can go: a model id on a named upstream backend, by a route whose own
    settings may differ from another route's to the same model."""

    model: str
    upstream: str = "default"
    route: Route = NO_ROUTE


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a requested id goes, in fallback order, and which rule sent it there (None: passed through)."""

    source: str
    targets: tuple[Target, ...]
    rule: str | None

    @property
    def target(self) -> str:
        """The first choice's model id: what the request is rewritten to before any fallback."""
        return self.targets[0].model

    @property
    def upstream(self) -> str:
        return self.targets[0].upstream


@dataclass(frozen=True, slots=True)
class _RegexRule:
    key: str
    pattern: re.Pattern[str]
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class ModelMap:
    exact: Mapping[str, tuple[Target, ...]]
    regexes: tuple[_RegexRule, ...]
    # Regex results by requested id: a regex scan and a template expansion cost more than the
    # rest of the rewrite. Cleared when full, so clients cannot grow it without bound.
    _resolved: dict[str, Resolution] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def parse(cls, raw: object) -> ModelMap:
        """Validate a decoded MODEL_MAP object; every problem names its key."""
        if not isinstance(raw, dict):
            raise MappingError("must be a JSON object of source id -> target id")
        exact: dict[str, tuple[Target, ...]] = {}
        regexes: list[_RegexRule] = []
        for key, value in raw.items():
            targets = _parse_targets(key, value)
            if is_regex_key(key):
                regexes.append(_compile_rule(key, targets))
            else:
                exact[key] = targets
        return cls(exact=exact, regexes=tuple(regexes))

    def resolve(self, model: str) -> Resolution:
        targets = self.exact.get(model)
        if targets is not None:
            return Resolution(model, targets, model)
        resolution = self._resolved.get(model)
        if resolution is None:
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()
            resolution = self._resolved[model] = self._by_regex(model)
        return resolution

    def _by_regex(self, model: str) -> Resolution:
        for rule in self.regexes:
            match = rule.pattern.fullmatch(model)
            if match is not None:
                expanded = tuple(replace(t, model=match.expand(t.model)) for t in rule.targets)
                return Resolution(model, expanded, rule.key)
        return Resolution(model, (Target(model),), None)

    def aliases(self) -> list[str]:
        """Exact source ids: the ones /v1/models can advertise."""
        return list(self.exact)

    def most_targets(self) -> int:
        """The longest fallback list: how many targets one request may try."""
        lengths = [len(targets) for targets in self.exact.values()]
        lengths += [len(rule.targets) for rule in self.regexes]
        return max(lengths, default=1)

    def known_ids(self) -> set[str]:
        """Ids the operator wrote down; metrics always give these their own label."""
        targets = {
            target.model
            for key, target in self._targets()
            if not (is_regex_key(key) and _GROUP_REF.search(target.model))
        }
        return set(self.exact) | targets

    def check_upstreams(self, names: Collection[str]) -> None:
        """Refuse at start-up a rule that sends requests to a backend nobody configured."""
        for key, target in self._targets():
            if target.upstream not in names:
                listed = ", ".join(sorted(names)) or "none"
                raise MappingError(
                    f"key {key!r}: unknown upstream {target.upstream!r} (UPSTREAMS names: {listed})"
                )

    def _targets(self) -> Iterator[tuple[str, Target]]:
        """Every (key, target) pair written, exact keys first, then regexes in order."""
        for key, targets in self.exact.items():
            for target in targets:
                yield key, target
        for rule in self.regexes:
            for target in rule.targets:
                yield rule.key, target


def _parse_targets(key: str, value: object) -> tuple[Target, ...]:
    """One target, or a fallback list of them; lists do not nest."""
    if not isinstance(value, list):
        return (_parse_target(key, value, "target", f"{_ITEM_SHAPE}, or a non-empty list of those"),)
    if not value:
        raise MappingError(f"key {key!r}: fallback list must not be empty")
    targets: list[Target] = []
    for index, item in enumerate(value):
        if isinstance(item, list):
            raise MappingError(f"key {key!r}: fallback list item {index} is a list; lists do not nest")
        target = _parse_target(key, item, f"fallback list item {index}", _ITEM_SHAPE)
        # Route settings aside: one backend's model twice is a retry, which RETRIES says.
        if any((t.model, t.upstream) == (target.model, target.upstream) for t in targets):
            raise MappingError(
                f"key {key!r}: fallback list names model {target.model!r} "
                f"on upstream {target.upstream!r} twice"
            )
        targets.append(target)
    return tuple(targets)


def _parse_target(key: str, value: object, where: str, shape: str) -> Target:
    """``where`` and ``shape`` say, in an error, which value was wrong and what it should be."""
    if isinstance(value, str) and value:
        return Target(value)
    if not isinstance(value, dict):
        raise MappingError(f"key {key!r}: {where} must be {shape}")
    unknown = [field for field in value if field not in _TARGET_FIELDS]
    if unknown:
        raise MappingError(
            f"key {key!r}: {where} has unknown field {unknown[0]!r} (allowed: {', '.join(_TARGET_FIELDS)})"
        )
    model = value.get("model")
    upstream = value.get("upstream", "default")
    if not isinstance(model, str) or not model:
        raise MappingError(f'key {key!r}: {where} "model" must be a non-empty string')
    if not isinstance(upstream, str) or not upstream:
        raise MappingError(f'key {key!r}: {where} "upstream" must be a non-empty string')
    try:
        route = routes.parse_route(value)
    except ValueError as exc:
        raise MappingError(f"key {key!r}: {where} {exc}") from None
    return Target(model, upstream, route)


def _compile_rule(key: str, targets: tuple[Target, ...]) -> _RegexRule:
    try:
        pattern = compile_key(key)
    except ValueError as exc:
        raise MappingError(f"key {key!r}: {exc}") from None
    # The same groups plus an empty alternative: a match to try each target's expansion on.
    probe = re.compile(f"(?:{pattern.pattern})|").match("")
    for target in targets:
        _check_template(key, target.model, probe)
    return _RegexRule(key, pattern, targets)


def _check_template(key: str, template: str, probe: re.Match[str] | None) -> None:
    """A template that would fail (or smuggle a NUL) at request time fails at start-up instead."""
    if _octal_escape(template):
        raise MappingError(
            f"key {key!r}: target {template!r} has an octal escape; write \\g<0> for the whole match"
        )
    try:
        if probe is not None:
            probe.expand(template)
    except (re.error, IndexError) as exc:
        raise MappingError(f"key {key!r}: invalid target {template!r}: {exc}") from None


def _octal_escape(target: str) -> bool:
    """``\\0`` in a template is a NUL byte to Python, though sed users mean the whole match."""
    index = target.find("\\")
    while index >= 0:
        if target[index + 1 : index + 2] == "0":
            return True
        index = target.find("\\", index + 2)
    return False
