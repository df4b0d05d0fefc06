"""The bytes every part of the benchmark agrees on: request bodies, canned answers, the map.

The request is a realistic chat completion (~1 KB: a system prompt, a short conversation,
sampling parameters) asking for a dated model id that only a regex of the 20-entry ``MODEL_MAP``
matches, after several exact keys and regexes were tried. Answers name the served model.
"""

from __future__ import annotations

import json
from typing import Any

# The id clients ask for, and what MODEL_MAP turns it into (6th of 8 regexes).
REQUESTED_MODEL = "gpt-4o-mini-2024-07-18"
SERVED_MODEL = "qwen3-8b"

# 12 exact ids and 8 regexes, as a deployment replacing several hosted APIs might write them.
MODEL_MAP: dict[str, str] = {
    "gpt-3.5-turbo": "qwen3-4b",
    "gpt-3.5-turbo-16k": "qwen3-4b",
    "gpt-4": "qwen3-32b",
    "gpt-4-32k": "qwen3-32b",
    "gpt-4-turbo": "qwen3-32b",
    "gpt-4o": "qwen3-32b",
    "o1": "qwen3-32b",
    "o3-mini": "qwen3-14b",
    "text-embedding-ada-002": "bge-m3",
    "text-embedding-3-small": "bge-m3",
    "text-embedding-3-large": "bge-m3",
    "whisper-1": "whisper-large-v3",
    "/claude-3-(opus|sonnet)-.*/": "llama-3.3-70b-instruct",
    "/claude-3-haiku-.*/": "qwen3-8b",
    "/gemini-1\\.5-(pro|flash).*/": "qwen3-14b",
    "/mistral-(small|medium)-.*/": "mistral-small-24b",
    "/(?P<family>llama)-(\\d+)b/": "\\g<family>-\\2-instruct",
    "/gpt-4o-mini.*/": SERVED_MODEL,
    "/gpt-4.*/": "qwen3-14b",
    "/deepseek-.*/": "deepseek-r1-distill-qwen-14b",
}

# The field of every paced stream event that carries the upstream's send time (CLOCK_MONOTONIC
# in ns, shared by all processes of the machine). Last in the object, so ``"bench_ts":123}``.
TS_FIELD = "bench_ts"
TS_FINGERPRINT = "system_fingerprint"

_SYSTEM = (
    "You are a helpful assistant for the customer support team of a mid-sized online retailer. "
    "Answer in the customer's language, keep answers short and friendly, never invent order "
    "numbers, tracking codes or prices, and when you do not know something say so and offer to "
    "hand the conversation over to a human colleague. Format lists with dashes, not numbers."
)
_CONVERSATION = [
    {
        "role": "user",
        "content": "Hi, I ordered a pair of running shoes last Tuesday and they have not arrived yet.",
    },
    {
        "role": "assistant",
        "content": "Sorry to hear that! Could you tell me the email address you used for the order, "
        "so I can look it up?",
    },
    {
        "role": "user",
        "content": "Sure, it's jane.doe@example.com. The tracking page has said 'label created' for "
        "four days now. Is the parcel lost, and can you send a replacement or refund me instead?",
    },
]


def chat_body(*, stream: bool = False, model: str = REQUESTED_MODEL) -> bytes:
    """A ~1 KB chat completion request, encoded as the OpenAI Python SDK would."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": _SYSTEM}, *_CONVERSATION],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 512,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "user": "support-widget-4711",
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": False}
    return json.dumps(body).encode()


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_ANSWER = (
    "I'm sorry your shoes are late! A label that was created but not scanned for four days "
    "usually means the carrier has not picked the parcel up yet. I can't issue a refund or a "
    "replacement myself, but I've flagged your order so a colleague can check with the warehouse "
    "today and email you at the address you gave me. Is there anything else I can help with?"
)

# A non-streamed answer as vLLM writes it (~700 bytes).
CANNED_JSON = _compact(
    {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1764115200,
        "model": SERVED_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _ANSWER, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 231, "total_tokens": 318, "completion_tokens": 87},
    }
)

_TOKENS = [" " + word for word in _ANSWER.split(" ")]
_TOKENS[0] = _TOKENS[0].lstrip()

# How a stream with thinking stripping starts: a short think block whose tags are split across
# events, as a tokenizer splits them, then the answer.
THINK_PIECES = [
    "<th",
    "ink>\n",
    "The customer",
    " wants a",
    " refund or",
    " replacement.",
    "\n</",
    "think",
    ">\n\n",
]


def _chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1764115200,
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def stream_contents(events: int, *, think: bool = False) -> list[str | None]:
    """The text of each event: ``events - 1`` content pieces, then None for the finish event."""
    pieces = list(THINK_PIECES) if think else []
    while len(pieces) < events - 1:
        pieces.extend(_TOKENS)
    return [*pieces[: max(events - 1, 0)], None]


def event_heads(events: int, *, think: bool = False, fingerprint: bool = False) -> list[bytes]:
    """Each paced event up to its timestamp: append ``b"%d" % send_time_ns`` and then
    ``ts_tail(fingerprint)`` to finish it.

    The first event also carries the assistant role, as OpenAI-compatible servers send it. With
    ``fingerprint`` the time goes into ``system_fingerprint`` (a string) instead of ``bench_ts``:
    a peer that rebuilds every chunk from known fields (LiteLLM) keeps that one.
    """
    heads = []
    for index, text in enumerate(stream_contents(events, think=think)):
        if text is None:
            chunk = _chunk({}, "stop")
        else:
            delta = {"role": "assistant", "content": text} if index == 0 else {"content": text}
            chunk = _chunk(delta, None)
        chunk[TS_FINGERPRINT if fingerprint else TS_FIELD] = "0" if fingerprint else 0
        encoded = b"data: " + _compact(chunk)
        suffix = b"0" + ts_tail(fingerprint)[:-2]
        assert encoded.endswith(suffix)
        heads.append(encoded[: -len(suffix)])
    return heads


def ts_tail(fingerprint: bool) -> bytes:
    """What follows the timestamp to the end of the event."""
    return b'"}\n\n' if fingerprint else b"}\n\n"


DONE = b"data: [DONE]\n\n"


def canned_sse(events: int = 20) -> bytes:
    """A whole un-paced stream (no timestamps) for the canned upstream: content, finish, DONE."""
    out = []
    for index, text in enumerate(stream_contents(events)):
        if text is None:
            chunk = _chunk({}, "stop")
        else:
            chunk = _chunk({"role": "assistant", "content": text} if index == 0 else {"content": text}, None)
        out.append(b"data: " + _compact(chunk) + b"\n\n")
    return b"".join(out) + DONE
