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

    def response(self) -> HTTPResponse:
        return HTTPResponse(
            self.body(), status=self.status, headers=self.headers, content_type="application/json"
        )
