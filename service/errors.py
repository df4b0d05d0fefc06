"""Every error the proxy itself makes, in OpenAI's shape, built in one place."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from sanic.response import HTTPResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


# Anthropic's error types (https://docs.anthropic.com/en/api/errors), for /v1/messages clients.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class ProxyError(Exception):
    """Raised anywhere on the request path; the handler turns it into the client's answer."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Messages may quote what a client sent, undecodable bytes included: keep them printable.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        error = {"message": self.message, "type": _TYPES.get(self.status, "api_error"), "code": self.code}
        return orjson.dumps({"error": error})

    def anthropic_body(self) -> bytes:
        """Anthropic's shape, which its SDKs read the message from; our code stays in the message."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return orjson.dumps(
            {"type": "error", "error": {"type": kind, "message": f"{self.message} ({self.code})"}}
        )

    def response(self, *, anthropic: bool = False) -> HTTPResponse:
        """The answer in OpenAI's shape, or Anthropic's for clients of its Messages API."""
        body = self.anthropic_body() if anthropic else self.body()
        return HTTPResponse(body, status=self.status, headers=self.headers, content_type="application/json")
