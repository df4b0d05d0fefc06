"""Think blocks in answers: strip them, or move their text to ``reasoning_content``.

Qwen3 answers ``/no_think`` with an empty ``<think>\\n\\n</think>\\n\\n`` before the text, and
other reasoning models lead with a full block; users who turned thinking off want clean answers.
Only a leading block counts (after optional whitespace); a ``<think>`` later in the text is
content. The whitespace right after ``</think>`` is dropped.

A ``</think>`` without an opening tag counts only when nothing but whitespace comes before it.
Templates that open the block in the prompt (DeepSeek-R1's) lead with bare reasoning: telling
that apart from an answer would mean holding back every tag-less answer until its end, which a
stream must not do, and whole answers follow the same rule so both paths agree.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson

from service.sse import DEFAULT_MAX_EVENT, EventFilter, SSEEvent, encode_data

MODES = ("strip", "reasoning")
OPEN = "<think>"
CLOSE = "</think>"
_ENVELOPE = ("id", "object", "created", "model")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"think mode must be one of {', '.join(MODES)}, not {mode!r}")


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer; reasoning is None when it has no block."""
    rest = text.lstrip()
    if rest.startswith(OPEN):
        inner = rest[len(OPEN) :]
        end = inner.find(CLOSE)
        if end < 0:
            return inner, ""
        return inner[:end], inner[end + len(CLOSE) :].lstrip()
    if rest.startswith(CLOSE):
        return text[: len(text) - len(rest)], rest[len(CLOSE) :].lstrip()
    return None, text


def _partial_close(text: str) -> int:
    """Length of the longest end of ``text`` that the next feed could complete into ``</think>``."""
    for size in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if text.endswith(CLOSE[:size]):
            return size
    return 0


class _State(enum.Enum):
    START = enum.auto()
    THINK = enum.auto()
    AFTER = enum.auto()
    CONTENT = enum.auto()


class ThinkFilter:
    """split_think for a stream: holds back only a possible tag or whitespace that may precede one."""

    def __init__(self) -> None:
        self._state = _State.START
        self._held = ""
        self.found = False

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
                if rest.startswith(OPEN):
                    self._enter(_State.THINK, rest[len(OPEN) :])
                elif rest.startswith(CLOSE):
                    reasoning += held[: len(held) - len(rest)]
                    self._enter(_State.AFTER, rest[len(CLOSE) :])
                elif not rest or OPEN.startswith(rest) or CLOSE.startswith(rest):
                    return reasoning, ""
                else:
                    self._held, self._state = "", _State.CONTENT
                    return reasoning, held
            elif self._state is _State.THINK:
                end = held.find(CLOSE)
                if end < 0:
                    keep = len(held) - _partial_close(held)
                    self._held = held[keep:]
                    return reasoning + held[:keep], ""
                reasoning += held[:end]
                self._enter(_State.AFTER, held[end + len(CLOSE) :])
            else:
                rest = held.lstrip()
                self._held = ""
                if rest:
                    self._state = _State.CONTENT
                return reasoning, rest

    def _enter(self, state: _State, held: str) -> None:
        self.found = True
        self._state, self._held = state, held


def transform_message(body: dict[str, Any], mode: str, chat: bool) -> int:
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
        reasoning, content = split_think(holder[key])
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

    def __init__(self, mode: str, chat: bool, max_event: int = DEFAULT_MAX_EVENT) -> None:
        _check_mode(mode)
        super().__init__(max_event)
        self._keep_reasoning = mode == "reasoning"
        self._chat = chat
        self._filters: dict[int, ThinkFilter] = {}
        self._envelope: dict[str, Any] = {}
        self.stripped = 0

    def close(self) -> bytes:
        return super().close() + self._flush()

    def _give_up(self) -> bytes:
        return self._flush()

    def _relay(self, event: SSEEvent) -> bytes:
        if event.data is None:
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
        if not changed:
            return event.raw
        if _blank(chunk.get("usage")) and all(_says_nothing(choice) for choice in chunk["choices"]):
            return b""
        return encode_data(orjson.dumps(chunk))

    def _rewrite(self, choice: dict[str, Any], index: int) -> bool:
        """Run one choice's text through its filter; whether the choice changed."""
        holder = choice.get("delta") if self._chat else choice
        key = "content" if self._chat else "text"
        original = holder.get(key) if isinstance(holder, dict) else None
        think = self._filters.get(index)
        reasoning = content = ""
        if isinstance(original, str):
            if think is None:
                think = self._filters[index] = ThinkFilter()
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
