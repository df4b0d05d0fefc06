"""Think blocks in answers: strip them, or move their text to ``reasoning_content``.

Qwen3 answers ``/no_think`` with an empty ``<think>\\n\\n</think>\\n\\n`` before the text, and
other reasoning models lead with a full block; users who turned thinking off want clean answers.
Only a leading block counts (after optional whitespace); a ``<think>`` later in the text is
content. The whitespace right after ``</think>`` is dropped. Models that name the block otherwise
(``<thinking>``, ``<reasoning>``) are covered by THINK_TAGS (``ThinkTags``): any of its tags opens
a block, and only the same tag's closing tag ends it.

A ``</think>`` without an opening tag counts only when nothing but whitespace comes before it.
Templates that open the block in the prompt (DeepSeek-R1's) lead with bare reasoning: telling
that apart from an answer would mean holding back every tag-less answer until its end, which a
stream must not do, and whole answers follow the same rule so both paths agree.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.sse import DEFAULT_MAX_EVENT, EventFilter, SSEEvent, encode_data, whole_data_lines

MODES = ("strip", "reasoning")
_ENVELOPE = ("id", "object", "created", "model")
_CHOICE_INDEX = re.compile(rb'"index"\s*:\s*(\d+)')
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,31}")
_MAX_TAGS = 16


@dataclass(frozen=True, slots=True)
class ThinkTags:
    """The tags that open a leading reasoning block; each block ends with its own closing tag.

    No tag is a prefix of another (names cannot hold ``>``), so at most one opens a given text.
    """

    names: tuple[str, ...]
    opens: tuple[str, ...] = field(init=False, repr=False, compare=False)
    closes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # Every proper prefix of every tag: one set lookup tells whether held text may still
    # become a tag, however many tags there are.
    prefixes: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        opens = tuple(f"<{name}>" for name in self.names)
        closes = tuple(f"</{name}>" for name in self.names)
        object.__setattr__(self, "opens", opens)
        object.__setattr__(self, "closes", closes)
        prefixes = {tag[:size] for tag in opens + closes for size in range(1, len(tag))}
        object.__setattr__(self, "prefixes", frozenset(prefixes))

    @classmethod
    def parse(cls, value: str) -> ThinkTags:
        """THINK_TAGS: comma-separated names (``think,thinking``); ValueError names a bad one."""
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names:
            raise ValueError("holds no tag name")
        for name in names:
            if not _TAG_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a tag name (a letter, then up to 31 letters, digits or _.:-; "
                    "write think, not <think>)"
                )
        unique = tuple(dict.fromkeys(names))
        if len(unique) > _MAX_TAGS:
            raise ValueError(f"at most {_MAX_TAGS} tags, got {len(unique)}")
        return cls(unique)

    def opening(self, text: str) -> tuple[str, str] | None:
        """(opening, closing) tag when ``text`` starts with an opening tag."""
        if not text.startswith(self.opens):
            return None
        return next((o, c) for o, c in zip(self.opens, self.closes, strict=True) if text.startswith(o))

    def closing(self, text: str) -> str | None:
        """The closing tag ``text`` starts with, if any."""
        if not text.startswith(self.closes):
            return None
        return next(c for c in self.closes if text.startswith(c))


DEFAULT_TAGS = ThinkTags(("think",))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"think mode must be one of {', '.join(MODES)}, not {mode!r}")


def split_think(text: str, tags: ThinkTags = DEFAULT_TAGS) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer; reasoning is None when it has no block."""
    rest = text.lstrip()
    pair = tags.opening(rest)
    if pair is not None:
        inner = rest[len(pair[0]) :]
        end = inner.find(pair[1])
        if end < 0:
            return inner, ""
        return inner[:end], inner[end + len(pair[1]) :].lstrip()
    close = tags.closing(rest)
    if close is not None:
        return text[: len(text) - len(rest)], rest[len(close) :].lstrip()
    return None, text


def _partial_close(text: str, close: str) -> int:
    """Length of the longest end of ``text`` that the next feed could complete into ``close``.

    A tag holds one ``<``, its first character, so only the text from the last ``<`` can be one.
    """
    start = text.rfind("<", max(0, len(text) - len(close) + 1))
    return len(text) - start if start >= 0 and close.startswith(text[start:]) else 0


class _State(enum.Enum):
    START = enum.auto()
    THINK = enum.auto()
    AFTER = enum.auto()
    CONTENT = enum.auto()


class ThinkFilter:
    """split_think for a stream: holds back only a possible tag or whitespace that may precede one."""

    def __init__(self, tags: ThinkTags = DEFAULT_TAGS) -> None:
        self._tags = tags
        self._close = ""  # the closing tag of the block opened
        self._state = _State.START
        self._held = ""
        self.found = False

    @property
    def settled(self) -> bool:
        """Past any leading block, holding nothing: all text from here on is content as it is."""
        return self._state is _State.CONTENT

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) released by this piece of text."""
        if self._state is _State.CONTENT:
            return "", text
        self._held += text
        return self._advance()

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held at the end of the answer."""
        held, state = self._held, self._state
        self._held, self._state = "", _State.CONTENT
        return (held, "") if state is _State.THINK else ("", held)

    def _advance(self) -> tuple[str, str]:
        reasoning = ""
        while True:
            held = self._held
            if self._state is _State.START:
                rest = held.lstrip()
                tags = self._tags
                if rest.startswith(tags.opens):
                    opening, self._close = tags.opening(rest) or ("", "")
                    self._enter(_State.THINK, rest[len(opening) :])
                elif rest.startswith(tags.closes):
                    reasoning += held[: len(held) - len(rest)]
                    self._enter(_State.AFTER, rest[len(tags.closing(rest) or "") :])
                elif not rest or rest in tags.prefixes:
                    return reasoning, ""
                else:
                    self._held, self._state = "", _State.CONTENT
                    return reasoning, held
            elif self._state is _State.THINK:
                end = held.find(self._close)
                if end < 0:
                    keep = len(held) - _partial_close(held, self._close)
                    self._held = held[keep:]
                    return reasoning + held[:keep], ""
                reasoning += held[:end]
                self._enter(_State.AFTER, held[end + len(self._close) :])
            else:
                rest = held.lstrip()
                self._held = ""
                if rest:
                    self._state = _State.CONTENT
                return reasoning, rest

    def _enter(self, state: _State, held: str) -> None:
        self.found = True
        self._state, self._held = state, held


def transform_message(body: dict[str, Any], mode: str, chat: bool, tags: ThinkTags = DEFAULT_TAGS) -> int:
    """Rewrite a non-streamed response in place; the number of think blocks removed.

    An upstream that already filled ``reasoning_content`` (its own reasoning parser) keeps it;
    only the tags are taken out of the content then.
    """
    _check_mode(mode)
    choices = body.get("choices")
    if not isinstance(choices, list):
        return 0
    removed = 0
    for choice in choices:
        holder = choice.get("message") if chat and isinstance(choice, dict) else choice
        key = "content" if chat else "text"
        if not isinstance(holder, dict) or not isinstance(holder.get(key), str):
            continue
        reasoning, content = split_think(holder[key], tags)
        if reasoning is None:
            continue
        holder[key] = content
        removed += 1
        if mode == "reasoning":
            _set_reasoning(holder, reasoning)
    return removed


def _set_reasoning(holder: dict[str, Any], reasoning: str) -> bool:
    existing = holder.get("reasoning_content")
    if isinstance(existing, str) and existing:
        return False
    holder["reasoning_content"] = reasoning
    return True


def _blank(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_blank(item) for item in value.values())
    return value is None or value == "" or value == []


def _says_nothing(choice: Any) -> bool:
    """No text, reasoning, role, tool call, logprobs or finish_reason: safe to leave out."""
    return isinstance(choice, dict) and all(_blank(value) for key, value in choice.items() if key != "index")


class ThinkStream(EventFilter):
    """A streamed chat or completions response, SSE bytes in and out, one filter per choice index.

    Events it leaves alone go out as the exact bytes that came in; changed ones are re-encoded,
    and ones left with nothing to say are dropped. Text a filter still holds goes out with the
    choice's finish_reason, or in a chunk of its own before ``[DONE]`` or at the end.
    """

    def __init__(
        self, mode: str, chat: bool, tags: ThinkTags = DEFAULT_TAGS, max_event: int = DEFAULT_MAX_EVENT
    ) -> None:
        _check_mode(mode)
        super().__init__(max_event)
        self._keep_reasoning = mode == "reasoning"
        self._chat = chat
        self._tags = tags
        self._filters: dict[int, ThinkFilter] = {}
        self._envelope: dict[str, Any] = {}
        self._settled: frozenset[bytes] = frozenset()  # choice indexes whose text passes as it is
        self.stripped = 0

    def close(self) -> bytes:
        return super().close() + self._flush()

    def feed(self, chunk: bytes) -> bytes:
        """A chunk of whole one-line events that all pass (``_passes``) goes out as it came,
        without being split into events first: most of a long answer, once past its block."""
        if self._settled and self._all_pass(chunk):
            return chunk
        return super().feed(chunk)

    def _all_pass(self, chunk: bytes) -> bool:
        """Whether ``chunk`` is whole one-line ``data:`` events, each naming a choice, and passes
        as a whole: the choices it names are settled, no ``<`` (``_passes``)."""
        if len(chunk) > self._max_event or not self._between_events() or not self._passes(chunk):
            return False
        lines = whole_data_lines(chunk)
        # One event: _passes found its index. Several: each must name one.
        return lines is not None and (len(lines) == 1 or all(_CHOICE_INDEX.search(line) for line in lines))

    def _give_up(self) -> bytes:
        return self._flush()

    def _relay(self, event: SSEEvent) -> bytes:
        if event.data is None:
            return event.raw
        if self._passes(event.raw):
            return event.raw
        if event.data.strip() == "[DONE]":
            return self._flush() + event.raw
        try:
            chunk = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return event.raw
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return event.raw
        self._envelope = {key: chunk[key] for key in _ENVELOPE if key in chunk}
        changed = False
        for position, choice in enumerate(chunk["choices"]):
            if isinstance(choice, dict):
                index = choice.get("index")
                changed = self._rewrite(choice, index if isinstance(index, int) else position) or changed
        self._settled = (
            frozenset(str(index).encode() for index in self._filters)
            if self._filters and all(think.settled for think in self._filters.values())
            else frozenset()
        )
        if not changed:
            return event.raw
        if _blank(chunk.get("usage")) and all(_says_nothing(choice) for choice in chunk["choices"]):
            return b""
        return encode_data(orjson.dumps(chunk))

    def _passes(self, raw: bytes) -> bool:
        """An event that cannot change, known without parsing it: once the choices seen are
        past their leading block, most of a long answer. Every choice index it names must be
        one of those, and it holds no ``<`` (nor a ``\\u003c`` escape) that could open a block
        for a choice not seen yet. A tool call's own ``index`` only makes it parsed."""
        if not self._settled or raw.find(b"<") >= 0 or raw.find(b"\\u003") >= 0:
            return False
        indexes = _CHOICE_INDEX.findall(raw)
        return bool(indexes) and self._settled.issuperset(indexes)

    def _rewrite(self, choice: dict[str, Any], index: int) -> bool:
        """Run one choice's text through its filter; whether the choice changed."""
        holder = choice.get("delta") if self._chat else choice
        key = "content" if self._chat else "text"
        original = holder.get(key) if isinstance(holder, dict) else None
        think = self._filters.get(index)
        reasoning = content = ""
        if isinstance(original, str):
            if think is None:
                think = self._filters[index] = ThinkFilter(self._tags)
            found = think.found
            reasoning, content = think.feed(original)
            if think.found and not found:
                self.stripped += 1
        if think is not None and choice.get("finish_reason") is not None:
            more_reasoning, more_content = think.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
            del self._filters[index]
        changed = False
        if content != (original if isinstance(original, str) else ""):
            self._holder(choice)[key] = content
            changed = True
        if reasoning and self._keep_reasoning:
            changed = _set_reasoning(self._holder(choice), reasoning) or changed
        return changed

    def _holder(self, choice: dict[str, Any]) -> dict[str, Any]:
        """Where a choice's text goes: its delta (made when missing) for chat, itself otherwise."""
        if not self._chat:
            return choice
        if not isinstance(choice.get("delta"), dict):
            choice["delta"] = {}
        return choice["delta"]

    def _flush(self) -> bytes:
        """A chunk carrying what the filters of unfinished choices still hold."""
        choices = []
        for index, think in self._filters.items():
            reasoning, content = think.finish()
            if not content and not (reasoning and self._keep_reasoning):
                continue
            holder: dict[str, Any] = {"content": content} if self._chat else {"text": content}
            if reasoning and self._keep_reasoning:
                holder["reasoning_content"] = reasoning
            fields = {"delta": holder} if self._chat else holder
            choices.append({"index": index, **fields, "logprobs": None, "finish_reason": None})
        self._filters.clear()
        if not choices:
            return b""
        return encode_data(orjson.dumps({**self._envelope, "choices": choices}))
