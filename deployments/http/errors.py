"""Every failure the ingress can meet, as an OpenAI error response with the right status.

Engine errors carry their own status and code; Ray's errors (a dead replica, a full queue) are
translated here, once, for both the JSON and the SSE paths.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from engine.errors import EngineError, EngineFailureError, NotReadyError, OverCapacityError

from . import logging as events
from .messages import ReplicaError


def as_replica_error(e: BaseException) -> ReplicaError:
    """Map anything raised while talking to a replica onto our taxonomy."""
    if isinstance(e, ReplicaError):
        return e
    if isinstance(e, EngineError):
        return ReplicaError.of(e)
    if isinstance(e, BackPressureError):
        events.queue_saturated(_model(), "serve_queue", "every replica's max_ongoing + max_queued requests are taken")
        return ReplicaError.of(OverCapacityError("every replica of this model is at capacity; retry shortly", retry_after=1.0))
    if isinstance(e, DeploymentUnavailableError):
        return ReplicaError.of(NotReadyError(f"model deployment is unavailable: {e}"))
    if isinstance(e, RayActorError):
        events.replica_died(_model(), f"{type(e).__name__}: {str(e)[:300]}")
        return ReplicaError.of(EngineFailureError("the model replica serving this request died; retry the request",
                                                  code="replica_died"))
    if isinstance(e, (RayError, TaskCancelledError)):
        return ReplicaError.of(EngineFailureError(f"model replica failed: {type(e).__name__}"))
    return ReplicaError.of(EngineFailureError(f"internal error: {type(e).__name__}: {e}", code="internal_error"))


def _model() -> str | None:
    note = events.request_note.get()
    return note.get("model") if note else None


def error_response(err: ReplicaError | EngineError, headers: dict[str, str] | None = None) -> JSONResponse:
    if isinstance(err, EngineError):
        err = ReplicaError.of(err)
    hdrs = dict(headers or {})
    if err.retry_after is not None:
        hdrs["Retry-After"] = str(max(1, round(err.retry_after)))
    return JSONResponse(err.to_openai(), status_code=err.http_status, headers=hdrs)


def sse_event(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
