"""Switching a model's thinking off: Qwen3's ``/no_think`` prompt suffix, or the chat template's
``enable_thinking`` flag that vLLM and SGLang pass to the template.

The switch functions change the request's own freshly parsed body in place and return whether they
changed anything, so the caller knows when the original bytes can be forwarded untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service.routes import NO_ROUTE, Route

NO_THINK = "/no_think"


def _with_suffix(text: str) -> str | None:
    """The text with the switch appended, or None when it already carries it."""
    if NO_THINK in text:
        return None
    return f"{text} {NO_THINK}" if text else NO_THINK


def disable_in_chat(body: dict[str, Any]) -> bool:
    """Append the switch to the last user message (its last text part, for list content)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    message = next(
        (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
        None,
    )
    if message is None:
        return False
    content = message.get("content")
    if isinstance(content, str):
        changed = _with_suffix(content)
        if changed is not None:
            message["content"] = changed
        return changed is not None
    if isinstance(content, list):
        return _disable_in_parts(content)
    return False


def _disable_in_parts(parts: list[Any]) -> bool:
    texts = [p for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    if any(isinstance(p.get("text"), str) and NO_THINK in p["text"] for p in texts):
        return False
    last = next((p for p in reversed(texts) if isinstance(p.get("text"), str)), None)
    if last is None:
        parts.append({"type": "text", "text": NO_THINK})
    else:
        last["text"] = _with_suffix(last["text"])
    return True


def disable_in_completion(body: dict[str, Any]) -> bool:
    """Append the switch to a string prompt, or to each string of a list of prompts."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        changed = _with_suffix(prompt)
        if changed is not None:
            body["prompt"] = changed
        return changed is not None
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        updated = [_with_suffix(p) for p in prompt]
        body["prompt"] = [new if new is not None else old for new, old in zip(updated, prompt, strict=True)]
        return any(new is not None for new in updated)
    return False


def disable_in_template(body: dict[str, Any]) -> bool:
    """vLLM and SGLang read ``chat_template_kwargs.enable_thinking``; merge into what the client sent."""
    kwargs = body.get("chat_template_kwargs")
    if not isinstance(kwargs, dict):
        kwargs = {}
    elif kwargs.get("enable_thinking") is False:
        return False
    body["chat_template_kwargs"] = {**kwargs, "enable_thinking": False}
    return True


@dataclass(frozen=True)
class ThinkingPolicy:
    """Which requests get thinking switched off, how, and what happens to think blocks.

    ``disable`` is True/False for every model, or a pattern the whole target id must match; a
    route's own ``thinking`` (on/off) overrides it. ``output`` None means: strip think blocks
    where thinking was switched off, keep them elsewhere; a route's ``think_output`` wins over it.
    """

    disable: bool | re.Pattern[str] = False
    switch: str = "suffix"
    output: str | None = None

    def disabled_for(self, model: str, route: Route = NO_ROUTE) -> bool:
        if route.thinking is not None:
            return route.thinking == "off"
        if isinstance(self.disable, bool):
            return self.disable
        return self.disable.fullmatch(model) is not None

    def output_for(self, model: str, route: Route = NO_ROUTE) -> str:
        if route.think_output is not None:
            return route.think_output
        if self.output is not None:
            return self.output
        return "strip" if self.disabled_for(model, route) else "keep"

    def explain(self, model: str, route: Route = NO_ROUTE) -> str:
        """One line for `resolve`: thinking and think blocks for this route, and who decided."""
        off = self.disabled_for(model, route)
        thinking = f"thinking {'off' if off else 'on'} ({'route' if route.thinking else 'DISABLE_THINKING'})"
        if route.think_output is not None:
            why = "route"
        elif self.output is not None:
            why = "THINK_OUTPUT"
        else:
            why = f"thinking {'off' if off else 'on'}"
        return f"{thinking}; think blocks: {self.output_for(model, route)} ({why})"

    def apply(
        self, body: dict[str, Any], model: str, chat: bool, route: Route = NO_ROUTE, kind: str = ""
    ) -> bool:
        """Switch thinking off in a request for ``model``; True when the body changed. Anthropic's
        ``messages`` (same message shape as chat) take the suffix only: their servers have no
        template flag to pass on."""
        if not self.disabled_for(model, route):
            return False
        changed = False
        if self.switch in ("suffix", "both"):
            changed = (disable_in_chat(body) if chat else disable_in_completion(body)) or changed
        if self.switch in ("template", "both") and chat and kind != "messages":
            changed = disable_in_template(body) or changed
        return changed
