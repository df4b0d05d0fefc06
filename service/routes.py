"""Settings written on a MODEL_MAP route, so two names for one served model can behave differently.

A target object may carry, beside ``model`` and ``upstream``: ``thinking`` (``off`` switches it off
whatever DISABLE_THINKING says, ``on`` never does), ``think_output`` (over THINK_OUTPUT) and
``params`` (a MODEL_PARAMS-shaped rule layered over the target model's own entry). They belong to
the route, not to the model: ``qwen3-32b-fast`` and ``qwen3-32b-thinking`` may both be served by
``qwen3-32b``, one with thinking off and sampling of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.params import ParamRule, parse_rule

FIELDS = ("thinking", "think_output", "params")
OUTPUTS = ("strip", "keep", "reasoning")
# YAML reads a bare on/off as a boolean: accept that spelling too.
_THINKING: dict[object, str] = {"on": "on", "off": "off", True: "on", False: "off"}


@dataclass(frozen=True, slots=True)
class Route:
    """A route's own settings; None (or no params) leaves the decision to the global settings."""

    thinking: str | None = None
    think_output: str | None = None
    params: ParamRule | None = None


NO_ROUTE = Route()


def parse_route(fields: Mapping[str, object]) -> Route:
    """The route settings among a target object's fields; ValueError names the field at fault."""
    if not any(name in fields for name in FIELDS):
        return NO_ROUTE
    thinking = fields.get("thinking")
    if thinking is not None and (not isinstance(thinking, str | bool) or thinking not in _THINKING):
        raise ValueError(f'"thinking" must be "on" or "off", got {thinking!r}')
    output = fields.get("think_output")
    if output is not None and (not isinstance(output, str) or output not in OUTPUTS):
        raise ValueError(f'"think_output" must be one of {", ".join(OUTPUTS)}, got {output!r}')
    params = None
    if fields.get("params") is not None:
        try:
            params = parse_rule(fields["params"])
        except ValueError as exc:
            raise ValueError(f'"params": {exc}') from None
    return Route(None if thinking is None else _THINKING[thinking], output, params)
