"""One error taxonomy for the whole product.

Every failure a caller can see is an ``EngineError`` with a machine-readable ``code``; the HTTP layer
maps ``http_status`` and ``type`` straight into an OpenAI error object, so a new error never needs a
second mapping table.
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    code: str = "engine_error"
    type: str = "server_error"
    http_status: int = 500

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error object (``{"error": {...}}``)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # keep code/param/retry_after across pickling (Ray hops)
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after))


def _rebuild(cls: type[EngineError], message: str, param: str | None, code: str, retry_after: float | None) -> EngineError:
    return cls(message, param=param, code=code, retry_after=retry_after)


class InvalidRequestError(EngineError):
    code = "invalid_request"
    type = "invalid_request_error"
    http_status = 400


class AuthenticationError(EngineError):
    code = "invalid_api_key"
    type = "authentication_error"
    http_status = 401


class ModelNotFoundError(EngineError):
    code = "model_not_found"
    type = "invalid_request_error"
    http_status = 404


class RequestTooLargeError(EngineError):
    code = "request_too_large"
    type = "invalid_request_error"
    http_status = 413


class OverCapacityError(EngineError):
    code = "over_capacity"
    type = "rate_limit_error"
    http_status = 429


class NotReadyError(EngineError):
    code = "not_ready"
    type = "server_error"
    http_status = 503


class EngineFailureError(EngineError):
    """The GPU thread died, a step raised, or a replica vanished: the request cannot finish."""

    code = "engine_failure"
    type = "server_error"
    http_status = 503


class DeadlineExceededError(EngineError):
    code = "deadline_exceeded"
    type = "timeout_error"
    http_status = 504


class ModelLoadError(EngineError):
    code = "model_load_failed"
    type = "server_error"
    http_status = 503
