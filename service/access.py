"""Who may come in, and where a request may go: client keys and path safety.

The proxy must not become an open proxy: only ``/v1/...`` paths reach the upstream, always the
configured one, and a path whose segments could climb out of ``/v1`` once the upstream decodes
them is refused here rather than trusted to the upstream's normalisation.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from service.errors import ProxyError

# Replaced, not forwarded, when the proxy sends its own key upstream.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")


def parse_keys(value: str) -> tuple[str, ...]:
    """Comma- or newline-separated keys; blanks ignored."""
    return tuple(key.strip() for key in value.replace("\n", ",").split(",") if key.strip())


def read_keys_file(path: str) -> tuple[str, ...]:
    try:
        keys = parse_keys(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    if not keys:
        raise ValueError(f"{path!r} holds no key")
    return keys


def presented_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key a client sent as ``Authorization: Bearer <key>``, ``api-key: <key>`` (Azure
    OpenAI's clients) or ``x-api-key: <key>`` (Anthropic's)."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif lowered in ("api-key", "x-api-key") and value.strip():
            return value.strip()
    return None


def check_key(keys: tuple[str, ...], headers: Iterable[tuple[str, str]]) -> None:
    """Raise 401 unless a configured key was presented; every key is compared, in constant time.
    Header text holds the bytes that are not UTF-8 as surrogates: compared as the bytes sent."""
    given = presented_key(headers)
    candidate = (given or "").encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(candidate, key.encode()) for key in keys]
    if given is None or not any(matches):
        raise ProxyError(
            401,
            "missing or invalid API key: send Authorization: Bearer <key>",
            "invalid_api_key",
            {"WWW-Authenticate": 'Bearer realm="openai-model-rerouter"'},
        )


def check_path(raw_path: str) -> None:
    """Refuse segments that decode (once or twice) to or through ``.``/``..`` (``..%2f..``), also
    behind a ``;`` path parameter (``..;x``, which servlet containers read as ``..``), and
    encoded backslashes or NULs. A path without ``%``, ``/.``, ``\\`` or NUL has none: the common
    case costs four substring tests."""
    if "%" not in raw_path and "/." not in raw_path and "\\" not in raw_path and "\x00" not in raw_path:
        return
    for segment in raw_path.split("/"):
        decoded = unquote(unquote(segment))
        parts = {part.split(";", 1)[0] for part in decoded.split("/")}
        if "\\" in decoded or "\x00" in decoded or {".", ".."} & parts:
            raise ProxyError(400, "the request path is not allowed", "invalid_path")
