"""The one shape every HTTP error takes: OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from dataclasses import dataclass

# HTTP status -> the OpenAI error type a client library maps it to.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    """An error a request gets instead of an answer; `param` names the offending field when there is one."""

    status: int
    message: str
    param: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After (503 when the queue is full)

    def __str__(self) -> str:
        return self.message

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_server_error")

    def body(self) -> dict:
        return envelope(self.message, self.type, self.param, self.status)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def envelope(message: str, type: str, param: str | None, code: int | str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
