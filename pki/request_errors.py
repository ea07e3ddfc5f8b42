"""The contract's status codes and `RequestError`, the one way a refused request travels from pki to the
transports (HTTP status, a message safe to show, the field at fault, Retry-After)."""

from __future__ import annotations

from typing import Any

# The contract's status codes.
BAD_REQUEST = 400
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409
TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415
TOO_MANY_REQUESTS = 429
UNAVAILABLE = 503


def error_body(message: str, field: str | None = None) -> dict[str, Any]:
    """The one JSON error shape of every API here (HTTP, MQTT, the dashboard's own): {"error", "field"?}."""
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return body


class RequestError(Exception):
    """A request the CA refuses: HTTP status, a message safe to show, and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.field)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
