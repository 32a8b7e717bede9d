"""Every failure the ingress can meet, as an OpenAI error object with the right status.

Engine errors carry their own status and code; Ray's errors (a dead replica, a full queue) are
translated here, once, for the JSON and the SSE paths; FastAPI's and Starlette's own errors (bad
JSON, unknown routes, wrong methods) and anything unexpected get the same shape. A 500 never
carries the exception's text: the client gets the request id, the log gets the traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from engine.errors import EngineError, EngineFailureError, InvalidRequestError, NotReadyError, OverCapacityError

from .. import logging as events
from ..messages import ReplicaError

log = logging.getLogger("mlx_serving.ingress")

RETRY_AFTER_S = 1.0  # what a 429 or 503 tells a client to wait when nothing more precise is known
_HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
               415: "unsupported_media_type"}


def as_replica_error(e: BaseException) -> ReplicaError:
    """Map anything raised while talking to a replica onto our taxonomy."""
    if isinstance(e, ReplicaError):
        return e
    if isinstance(e, EngineError):
        return ReplicaError.of(e)
    if isinstance(e, BackPressureError):
        events.queue_saturated(_model(), "serve_queue", "every replica's max_ongoing + max_queued requests are taken")
        return ReplicaError.of(OverCapacityError("every replica of this model is at capacity; retry shortly",
                                                 retry_after=RETRY_AFTER_S))
    if isinstance(e, DeploymentUnavailableError):
        return ReplicaError.of(NotReadyError("the model's deployment is unavailable; retry shortly",
                                             retry_after=RETRY_AFTER_S))
    if isinstance(e, RayActorError):
        events.replica_died(_model(), f"{type(e).__name__}: {str(e)[:300]}")
        return ReplicaError.of(EngineFailureError("the model replica serving this request died; retry the request",
                                                  code="replica_died", retry_after=RETRY_AFTER_S))
    if isinstance(e, (RayError, TaskCancelledError)):
        log.warning("replica call failed: %r", e)
        return ReplicaError.of(EngineFailureError("the model replica failed; retry the request",
                                                  retry_after=RETRY_AFTER_S))
    return ReplicaError.of(internal_error(e))


def internal_error(e: BaseException) -> EngineError:
    """A bug's error for the client: no exception text, the request id to quote; the traceback is logged."""
    log.error("internal error: %r", e, exc_info=e)
    note = events.request_note.get() or {}
    rid = note.get("request_id") or events.serve_request_id()
    err = EngineError("internal server error" + (f" (request id {rid})" if rid else ""), code="internal_error")
    return err


def _model() -> str | None:
    note = events.request_note.get()
    return note.get("model") if note else None


class AuthenticationError(EngineError):
    code = "invalid_api_key"
    kind = "auth"


def error_response(err: ReplicaError | EngineError, headers: dict[str, str] | None = None) -> JSONResponse:
    if isinstance(err, EngineError):
        err = ReplicaError.of(err)
    hdrs = dict(headers or {})
    retry = err.retry_after if err.retry_after is not None else RETRY_AFTER_S if err.http_status in (429, 503) else None
    if retry is not None:
        hdrs["Retry-After"] = str(max(1, round(retry)))
    return JSONResponse(err.to_openai(), status_code=err.http_status, headers=hdrs)


# Characters that JSON leaves raw but Python's str.splitlines (and so httpx's iter_lines) treats as line
# breaks: written raw, a model's output holding one would cut an SSE event in two for such clients.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: Any) -> str:
    """One SSE event; ``payload`` is a JSON text or a JSON-able value."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))
    if not text.isascii():
        text = text.translate(_LINE_BREAKS_JSON_KEEPS)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def install_handlers(app: FastAPI) -> None:
    """Make every error the app can produce an OpenAI error object."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = err.get("msg", "invalid request")
        code = "invalid_json" if err.get("type") == "json_invalid" else "invalid_request"
        return error_response(InvalidRequestError(f"{'.'.join(loc) + ': ' if loc else ''}{msg}",
                                                  param=".".join(loc) or None, code=code))

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif status == 400:
            message = "the request body is not valid JSON"
        else:
            message = str(exc.detail)[:200]
        err = ReplicaError(code=_HTTP_CODES.get(status, "http_error"), message=message, http_status=status,
                           type="invalid_request_error" if 400 <= status < 500 else "server_error")
        return error_response(err, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(internal_error(exc))
