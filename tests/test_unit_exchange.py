"""The per-request record's pure parts: request ids and endpoint labels."""

from __future__ import annotations

import re

import pytest

from service import exchange


def test_fresh_request_ids_are_random_hex_and_never_repeat_across_pool_refills() -> None:
    """Ids come from a pool of random bytes drawn 256 ids at a time: 600 ids cross two refills."""
    ids = [next(exchange._FRESH_IDS) for _ in range(600)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", each) for each in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat/completions"),
        ("/v1/chat/completions/", "chat/completions"),
        ("/v1/responses/resp_1/input_items", "responses"),
        ("/v1/messages/count_tokens", "messages/count_tokens"),
        ("/v1/made-up/path", "other"),
    ],
)
def test_endpoint_label_of_a_path(path: str, endpoint: str) -> None:
    assert exchange.endpoint_of(path) == endpoint
