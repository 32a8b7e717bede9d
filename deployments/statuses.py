"""Engine error kinds -> HTTP statuses and OpenAI error types: the one place that knows both."""

from __future__ import annotations

from engine.errors import EngineError, ErrorKind

STATUS: dict[ErrorKind, tuple[int, str]] = {
    "invalid": (400, "invalid_request_error"),
    "auth": (401, "authentication_error"),
    "forbidden": (403, "permission_error"),
    "not_found": (404, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "capacity": (429, "rate_limit_error"),
    "unavailable": (503, "server_error"),
    "timeout": (504, "timeout_error"),
    "internal": (500, "server_error"),
}


def status_of(e: EngineError) -> int:
    return STATUS[e.kind][0]


def type_of(e: EngineError) -> str:
    return STATUS[e.kind][1]
