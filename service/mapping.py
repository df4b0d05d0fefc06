"""Model id rewriting: exact aliases first, then whole-id regexes in the order written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_GROUP_REF = re.compile(r"\\(?:g<([^>]*)>|(\d+))")


class MappingError(ValueError):
    """A MODEL_MAP entry that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a requested id goes, and which rule sent it there (None: passed through)."""

    source: str
    target: str
    rule: str | None


@dataclass(frozen=True, slots=True)
class _RegexRule:
    key: str
    pattern: re.Pattern[str]
    target: str


@dataclass(frozen=True)
class ModelMap:
    exact: Mapping[str, str]
    regexes: tuple[_RegexRule, ...]

    @classmethod
    def parse(cls, raw: object) -> ModelMap:
        """Validate a decoded MODEL_MAP object; every problem names its key."""
        if not isinstance(raw, dict):
            raise MappingError("must be a JSON object of source id -> target id")
        exact: dict[str, str] = {}
        regexes: list[_RegexRule] = []
        for key, target in raw.items():
            if not isinstance(target, str) or not target:
                raise MappingError(f"key {key!r}: target must be a non-empty string")
            if is_regex_key(key):
                regexes.append(_compile_rule(key, target))
            else:
                exact[key] = target
        return cls(exact=exact, regexes=tuple(regexes))

    def resolve(self, model: str) -> Resolution:
        target = self.exact.get(model)
        if target is not None:
            return Resolution(model, target, model)
        for rule in self.regexes:
            match = rule.pattern.fullmatch(model)
            if match is not None:
                return Resolution(model, match.expand(rule.target), rule.key)
        return Resolution(model, model, None)

    def aliases(self) -> list[str]:
        """Exact source ids: the ones /v1/models can advertise."""
        return list(self.exact)

    def known_ids(self) -> set[str]:
        """Ids the operator wrote down; metrics always give these their own label."""
        targets = {rule.target for rule in self.regexes if not _GROUP_REF.search(rule.target)}
        return set(self.exact) | set(self.exact.values()) | targets


def is_regex_key(key: str) -> bool:
    return len(key) >= 2 and key.startswith("/") and key.endswith("/")


def _compile_rule(key: str, target: str) -> _RegexRule:
    try:
        pattern = re.compile(key[1:-1])
    except re.error as exc:
        raise MappingError(f"key {key!r}: invalid regular expression: {exc}") from None
    if _octal_escape(target):
        raise MappingError(
            f"key {key!r}: target {target!r} has an octal escape; write \\g<0> for the whole match"
        )
    try:
        # The same groups plus an empty alternative: a match to try the target's expansion on.
        probe = re.compile(f"(?:{pattern.pattern})|").match("")
        if probe is not None:
            probe.expand(target)
    except (re.error, IndexError) as exc:
        raise MappingError(f"key {key!r}: invalid target {target!r}: {exc}") from None
    return _RegexRule(key, pattern, target)


def _octal_escape(target: str) -> bool:
    """``\\0`` in a template is a NUL byte to Python, though sed users mean the whole match."""
    index = target.find("\\")
    while index >= 0:
        if target[index + 1 : index + 2] == "0":
            return True
        index = target.find("\\", index + 2)
    return False
