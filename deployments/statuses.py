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


def kind_of(status: int) -> ErrorKind:
    """The kind an HTTP status stands for (a replica's error raised again in the ingress keeps its status)."""
    for kind, (code, _) in STATUS.items():
        if code == status:
            return kind
    return "invalid" if 400 <= status < 500 else "internal"


def status_of(e: EngineError) -> int:
    return STATUS[e.kind][0]


def type_of(e: EngineError) -> str:
    return STATUS[e.kind][1]
