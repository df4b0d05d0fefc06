"""Rewriting the client's request body: the ``model`` of a JSON object or of a multipart form.

Nothing else in the body changes. When the model maps to itself and no switch applies, the
original bytes are forwarded as they came; multipart forms are edited in place so file parts
stay byte for byte what the client sent.

One parse decides: the upstream reads what the proxy read. A body that starts with ``{`` is read
as JSON whatever its Content-Type says (llama.cpp and Ollama parse it regardless), and a body
whose objects name a key twice goes out re-encoded as the proxy parsed it (the last value kept),
since parsers differ on which of the two wins.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from service import usage
from service.errors import ProxyError
from service.mapping import ModelMap, Resolution
from service.params import ParamPolicy
from service.thinking import ThinkingPolicy

COMPLETION_ENDPOINTS = frozenset({"chat/completions", "completions"})
# Nineteen digits in a row may be an integer beyond 64 bits. Found by mapping every digit to
# "0" and searching: fifteen times quicker than the regex \d{19} on a typical body.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19
# A JSON object, maybe after a UTF-8 byte order mark and whitespace.
_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{")
DEFAULT_MAX_MODEL_ID = 256


@dataclass(frozen=True, slots=True)
class Rewritten:
    body: bytes
    resolution: Resolution | None
    stream: bool = False
    usage_added: bool = False  # the stream asks for a usage chunk the client did not ask for


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """Out-of-range numbers (1e400) would be re-encoded as null or Infinity: refuse them."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


def loads(raw: bytes) -> Any:
    """orjson, unless the body may hold an integer beyond 64 bits (orjson turns those into
    floats) or orjson refuses it (lone surrogates): then the standard library."""
    if raw.translate(_DIGITS_AS_ZERO).find(_LONG_DIGITS) < 0:  # find(), not ``in``: see sse
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        message = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise ProxyError(400, f"request body is not valid JSON: {message}", "invalid_json") from None


def may_repeat_keys(raw: bytes, value: Any) -> bool:
    """False only when no object of ``raw`` names a key twice (``value`` is what it parsed to).

    Every ``:`` outside a string ends a key, so without a repeated key the colons of ``raw``
    (its ``\\u003a`` escapes counted too) number those of ``value`` re-encoded (orjson writes
    every colon in a string as it is); a key the parse dropped only adds to the count in
    ``raw``. An orjson encode and byte counts, about the cost of the parse, paid only for bodies
    that would go out as they came; what orjson cannot encode (integers beyond 64 bits, nesting
    past 255) is counted by walking it. Bodies that are not UTF-8 (a NUL among the first bytes:
    UTF-16 or -32) count as repeating.
    """
    if raw.find(b"\x00", 0, 4) >= 0:
        return True
    try:
        expected = orjson.dumps(value).count(b":")
    except orjson.JSONEncodeError:
        expected = _keys_and_colons(value)
    found = raw.count(b":")
    if raw.find(b"\\u003") >= 0:
        found += raw.count(b"\\u003a") + raw.count(b"\\u003A")
    return found != expected


def _keys_and_colons(value: Any) -> int:
    """The colons of ``value`` encoded: its keys, plus the ``:`` in all its strings and keys."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            count += item.count(":")
        elif isinstance(item, dict):
            count += len(item) + sum(key.count(":") for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def dumps(value: Any) -> bytes:
    """orjson, or the standard library for what orjson refuses (huge ints, nesting over 255)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except RecursionError:
        raise ProxyError(400, "request body is not valid JSON: nested too deeply", "invalid_json") from None


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def reads_as_json(raw: bytes, content_type: str) -> bool:
    """Said to be JSON, or an object whatever the Content-Type says (upstreams may parse it)."""
    return is_json(content_type) or _OBJECT_START.match(raw) is not None


@dataclass(frozen=True, slots=True)
class Policy:
    """What the settings ask of a body besides its model: thinking switch, parameter policy,
    usage on every stream (STREAM_USAGE=always)."""

    thinking: ThinkingPolicy
    params: ParamPolicy = field(default_factory=ParamPolicy)
    max_model_id: int = DEFAULT_MAX_MODEL_ID
    stream_usage: bool = False


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: no lone surrogate."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def fits(model: str, limit: int) -> bool:
    """What a metric label, a header or a log field may carry as is: at most ``limit``
    characters (MAX_MODEL_ID_LENGTH), and valid Unicode."""
    return len(model) <= limit and is_unicode(model)


def check_model_id(model: str, limit: int) -> None:
    """Refuse an id that cannot be a metric label, header or log field: longer than ``limit``
    characters (MAX_MODEL_ID_LENGTH), or not encodable as UTF-8 (a lone surrogate, which JSON's
    ``\\ud800`` escape can spell)."""
    if len(model) > limit:
        raise ProxyError(
            400, f"model id is {len(model)} characters long; at most {limit} are accepted", "invalid_model"
        )
    if not is_unicode(model):
        message = "request body is not valid JSON: the model id is not valid Unicode"
        raise ProxyError(400, message, "invalid_json")


def rewrite(
    raw: bytes,
    content_type: str,
    endpoint: str,
    model_map: ModelMap,
    policy: Policy,
    method: str = "POST",
    choice: int = 0,
) -> Rewritten:
    """What to forward for this body, and how its model was resolved.

    ``choice`` picks the target of a fallback list the body is written for (0: the first).
    A POST to the completion endpoints must carry a JSON object; their body-less GET and DELETE
    (stored completions) pass through.
    """
    if endpoint in COMPLETION_ENDPOINTS and (raw or method == "POST"):
        body = loads(raw) if raw else None
        if not isinstance(body, dict):
            raise ProxyError(400, "request body must be a JSON object", "invalid_json")
        return _rewrite_json(raw, body, model_map, policy, choice, endpoint)
    if raw and reads_as_json(raw, content_type):
        return _rewrite_json(
            raw, loads(raw), model_map, policy, choice, "messages" if endpoint == "messages" else None
        )
    if raw and content_type.lower().startswith("multipart/form-data"):
        return _rewrite_multipart(raw, content_type, model_map, choice, policy.max_model_id)
    return Rewritten(raw, None)


def _rewrite_json(
    raw: bytes,
    body: Any,
    model_map: ModelMap,
    policy: Policy,
    choice: int,
    completion: str | None = None,
) -> Rewritten:
    """The model, then (completions and Anthropic's messages only) the thinking switch, then the
    parameter policy, each as the chosen target's route and the settings ask, then (streamed
    completions only) the usage chunk."""
    if not isinstance(body, dict):
        return Rewritten(raw, None)
    resolution, changed = _resolve_in(body, model_map, choice, policy.max_model_id)
    if resolution is not None:
        target = resolution.targets[choice]
        if completion is not None:
            chat = completion != "completions"
            changed = policy.thinking.apply(body, target.model, chat, target.route, completion) or changed
        if policy.params or target.route.params is not None:
            changed = policy.params.apply(body, target.model, target.route.params) or changed
    elif completion is not None:
        changed = policy.thinking.apply(body, "", chat=completion != "completions", kind=completion)
    stream = body.get("stream") is True
    added = (
        completion in COMPLETION_ENDPOINTS and stream and policy.stream_usage and usage.ask_for_usage(body)
    )
    # A key named twice: the upstream gets what the proxy read, not a parse of its own.
    forwarded = dumps(body) if changed or added or may_repeat_keys(raw, body) else raw
    if stream and forwarded is not raw:
        # orjson's bytes keep its whole 4 KiB buffer. A stream with targets or retries to fall
        # back on holds its body while it lasts (without, the body is let go of once sent).
        forwarded = bytes(memoryview(forwarded))
    return Rewritten(forwarded, resolution, stream, added)


def _resolve_in(
    body: dict[str, Any], model_map: ModelMap, choice: int, limit: int
) -> tuple[Resolution | None, bool]:
    model = body.get("model")
    if not isinstance(model, str):
        return None, False
    check_model_id(model, limit)
    resolution = model_map.resolve(model)
    target = resolution.targets[choice].model
    if target == model:
        return resolution, False
    body["model"] = target
    return resolution, True


def _boundary(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary" and value:
            # Sanic decodes header bytes with surrogateescape: this gives back the bytes sent.
            return value.strip().strip('"').encode("utf-8", "surrogateescape")
    return None


def _is_model_field(headers: bytes) -> bool:
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() != "content-disposition":
            continue
        params = [p.strip() for p in value.split(";")]
        named_model = 'name="model"' in params or "name=model" in params
        return named_model and not any(p.startswith("filename") for p in params)
    return False


def _rewrite_multipart(
    raw: bytes, content_type: str, model_map: ModelMap, choice: int, limit: int
) -> Rewritten:
    """Every ``model`` field is rewritten (form parsers differ on which of several they read)."""
    boundary = _boundary(content_type)
    if boundary is None:
        raise ProxyError(400, "multipart body without a boundary", "invalid_multipart")
    delimiter = b"--" + boundary
    parts = raw.split(delimiter)
    first: Resolution | None = None
    changed = False
    for index, part in enumerate(parts[1:-1], start=1):
        head_end = part.find(b"\r\n\r\n")
        if head_end < 0 or not part.endswith(b"\r\n") or not _is_model_field(part[:head_end]):
            continue
        try:
            model = part[head_end + 4 : -2].decode()
        except UnicodeDecodeError:
            continue
        check_model_id(model, limit)
        resolution = model_map.resolve(model)
        first = first or resolution
        target = resolution.targets[min(choice, len(resolution.targets) - 1)].model
        if target != model:
            parts[index] = part[: head_end + 4] + target.encode() + b"\r\n"
            changed = True
    return Rewritten(delimiter.join(parts) if changed else raw, first)
