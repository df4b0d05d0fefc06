"""Token usage from the upstream's answers, found without parsing the answer.

Operators count tokens per model from the ``usage`` object the upstream puts in its answers: at
the end of a JSON answer (chat completions, completions, embeddings, the Responses API) and in
the last chunk of a stream that asked for it (``stream_options.include_usage``). The proxy relays
those answers untouched, so parsing them whole to read a few numbers would cost more than the
relay itself: the bytes are searched for ``"usage"`` from the end and only that object is parsed.

A JSON string cannot hold the bytes ``"usage"`` (its quotes would be escaped), so every match
is a key; one whose value is not a usage object (a tool's parameter schema echoed by the
Responses API) is skipped for the one before it.

With ``STREAM_USAGE=always`` the proxy asks for the usage chunk on the client's behalf;
``UsageDrop`` then takes that chunk out again before it reaches the client.
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple

import orjson

from service.sse import EventFilter, SSEEvent

_KEY = b'"usage"'
_OBJECT_VALUE = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*\{")
_WINDOW = 4096  # a usage object, its token details included, is a few hundred bytes
_TRIES = 4  # "usage" keys looked at, from the end, before giving up
_MAX_TOKENS = 1 << 40  # a count beyond this is not a count
_TAIL_CHUNKS = 4  # the usage chunk and [DONE] arrive in the last few reads of a stream


ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings", "responses"})


def counted(method: str, path: str, endpoint: str) -> bool:
    """Answers whose usage is work done now: a POST to the endpoint itself, not a stored
    completion or response read back (counted when it was made) nor a call below it."""
    return method == "POST" and endpoint in ENDPOINTS and path.removeprefix("/v1/").strip("/") == endpoint


class Usage(NamedTuple):
    prompt: int
    completion: int | None  # None: embeddings, which have no completion


def _usage_of(value: object) -> Usage | None:
    """Chat and completions name them prompt/completion_tokens, the Responses API input/output_tokens."""
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens")
    if prompt is None:
        prompt, completion = value.get("input_tokens"), value.get("output_tokens")
    else:
        completion = value.get("completion_tokens")
    if type(prompt) is not int or not 0 <= prompt < _MAX_TOKENS:  # bool is not a count
        return None
    if type(completion) is not int or not 0 <= completion < _MAX_TOKENS:
        completion = None
    return Usage(prompt, completion)


def _object_after(data: bytes, key_end: int) -> Usage | None:
    """The usage object that is the value of the key ending at ``key_end``, if it is one.

    Its end is found by counting braces (a usage object holds numbers and objects of numbers,
    no strings that could hold a brace), then orjson parses just that slice.
    """
    if data[key_end : key_end + 2] == b":{":  # compact JSON, as most servers send it
        start = key_end + 1
    else:
        value = _OBJECT_VALUE.match(data, key_end)
        if value is None:  # null, or not an object
            return None
        start = value.end() - 1
    pos = start
    limit = min(len(data), start + _WINDOW)
    depth = 0
    while True:
        close = data.find(b"}", pos, limit)
        if close < 0:
            return None
        opened = data.count(b"{", pos, close)
        depth += opened - 1
        pos = close + 1
        if depth == 0:
            break
    try:
        return _usage_of(orjson.loads(data[start:pos]))
    except orjson.JSONDecodeError:
        return None


def find(data: bytes) -> Usage | None:
    """The last usage object in ``data`` (JSON, or SSE bytes), or None."""
    end = len(data)
    for _ in range(_TRIES):
        at = data.rfind(_KEY, 0, end)
        if at < 0:
            return None
        found = _object_after(data, at + len(_KEY))
        if found is not None:
            return found
        end = at
    return None


class StreamMeter:
    """What a relayed stream tells about tokens and their pace, one cheap call per chunk.

    Keeps the stream's last few chunks (references, no copies) to find the usage chunk in at the
    end, and when chunks that carry text arrived, for the time per output token. The chunks are
    a ring of four slots: a deque takes 600 bytes more, for every open stream.
    """

    __slots__ = ("_fed", "_tail", "first", "last")

    def __init__(self) -> None:
        self._tail: list[bytes] = [b""] * _TAIL_CHUNKS
        self._fed = 0
        self.first: float | None = None
        self.last: float | None = None

    def feed(self, chunk: bytes) -> None:
        self._tail[self._fed % _TAIL_CHUNKS] = chunk
        self._fed += 1
        # Text travels in "delta" (chat, Responses) or "text" (completions); the usage chunk has
        # neither. find(), not ``in``: see sse.
        if chunk.find(b'"delta"') >= 0 or chunk.find(b'"text"') >= 0:
            self.last = time.perf_counter()
            if self.first is None:
                self.first = self.last

    def usage(self) -> Usage | None:
        at = self._fed % _TAIL_CHUNKS
        return find(b"".join(self._tail[at:] + self._tail[:at]))

    def per_token(self, usage: Usage) -> float | None:
        """(last content event - first content event) / (completion tokens - 1), as vLLM's TPOT."""
        tokens = usage.completion
        if tokens is None or tokens < 2 or self.first is None or self.last is None or self.last <= self.first:
            return None
        return (self.last - self.first) / (tokens - 1)


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Ask a streamed completion for its usage chunk, the client's other stream_options kept;
    whether the client did not ask for it already (then that chunk is not the client's).

    A client asking for ``continuous_usage_stats`` (vLLM: usage in every chunk) without
    ``include_usage`` is left alone: asking would change every chunk it gets.
    """
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") or options.get("continuous_usage_stats"):
        return False
    body["stream_options"] = {**options, "include_usage": True}
    return True


def _is_usage_chunk(data: str) -> bool:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


class UsageDrop(EventFilter):
    """A stream without the usage-only chunk (empty ``choices``) the proxy asked for; every other
    event goes out as the exact bytes that came in, ``"usage": null`` fields and all."""

    def _relay(self, event: SSEEvent) -> bytes:
        # find(), not ``in``: see sse. Every event of such a stream comes through here.
        if event.data is None or event.raw.find(_KEY) < 0 or not _is_usage_chunk(event.data):
            return event.raw
        return b""
