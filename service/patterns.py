"""``/regex/`` keys, as MODEL_MAP, MODEL_PARAMS and DISABLE_THINKING write them: a key that starts
and ends with a slash is a regular expression the whole model id must match."""

from __future__ import annotations

import re


def is_regex_key(key: str) -> bool:
    return len(key) >= 2 and key.startswith("/") and key.endswith("/")


def compile_key(key: str) -> re.Pattern[str]:
    """The pattern between the slashes; ValueError names what is wrong with it."""
    try:
        return re.compile(key[1:-1])
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
