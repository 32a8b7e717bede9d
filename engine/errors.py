"""One error taxonomy for the whole product.

Every failure a caller can see is an ``EngineError`` with a machine-readable ``code`` and a
``kind``: what went wrong, in the engine's terms. The engine knows nothing of HTTP; the serving layer
maps each kind to a status and an OpenAI error ``type`` (``deployments/statuses.py``), so a new error
never needs a second mapping table.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["invalid", "auth", "forbidden", "not_found", "conflict", "too_large", "capacity",
                    "unavailable", "timeout", "internal"]


class EngineError(Exception):
    code: str = "engine_error"
    kind: ErrorKind = "internal"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code

    def __reduce__(self):  # keep code/param/retry_after across pickling (Ray hops)
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after))


def _rebuild(cls: type[EngineError], message: str, param: str | None, code: str, retry_after: float | None) -> EngineError:
    return cls(message, param=param, code=code, retry_after=retry_after)


class InvalidRequestError(EngineError):
    code = "invalid_request"
    kind = "invalid"


class ModelNotFoundError(EngineError):
    code = "model_not_found"
    kind = "not_found"


class RequestTooLargeError(EngineError):
    code = "request_too_large"
    kind = "too_large"


class OverCapacityError(EngineError):
    code = "over_capacity"
    kind = "capacity"


class NotReadyError(EngineError):
    code = "not_ready"
    kind = "unavailable"


class EngineFailureError(EngineError):
    """The GPU thread died, a step raised, or a replica vanished: the request cannot finish."""

    code = "engine_failure"
    kind = "unavailable"


class DeadlineExceededError(EngineError):
    code = "deadline_exceeded"
    kind = "timeout"


class ModelLoadError(EngineError):
    code = "model_load_failed"
    kind = "unavailable"

