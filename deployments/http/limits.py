"""What the ingress refuses before FastAPI parses a body: too large (413), not UTF-8, nested too deep.

Python's JSON parser and pydantic recurse per nesting level, so a small body of ten thousand ``[``
reaches deep into both (a ``RecursionError`` or a serializer error would be a 500). The depth is
measured on the raw bytes instead: strings blanked out with one regex, then a running sum of
brackets with numpy (a few milliseconds for the largest body allowed).
"""

from __future__ import annotations

import asyncio
import re
from typing import Callable

import numpy as np

from engine.errors import InvalidRequestError, RequestTooLargeError

from .errors import error_response

_INLINE_BYTES = 64 * 1024
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth_of(body: bytes) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings do not count)."""
    bare = _STRING.sub(b'""', body)
    if not bare:
        return 0
    steps = _OPEN[np.frombuffer(bare, dtype=np.uint8)].astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


class _TooLarge(BaseException):  # BaseException: FastAPI turns any Exception while reading into a 400
    pass


class RequestLimits:
    """Pure ASGI middleware: reads the whole body (bounded), checks it, hands it on unchanged.

    ``limits()`` returns ``(max_body_bytes, max_json_depth)``, read per request so a redeploy's
    limits apply at once. Messages after the body (``http.disconnect``) still reach the app, so a
    client that goes away still cancels its request.
    """

    def __init__(self, app: Callable, limits: Callable[[], tuple[int, int]]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes, max_depth = self.limits()
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise _TooLarge()
            body, first = await self._read(receive, max_bytes)
        except _TooLarge:
            resp = error_response(RequestTooLargeError(f"request body is larger than {max_bytes} bytes"))
            return await resp(scope, receive, send)
        # Milliseconds per megabyte: a large body is checked on a thread, not on the relaying loop.
        problem = _problem(body, max_depth) if len(body) < _INLINE_BYTES else await asyncio.to_thread(
            _problem, body, max_depth)
        if problem is not None:
            return await error_response(problem)(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive: Callable, max_bytes: int) -> tuple[bytes, dict]:
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before sending it all
                return b"".join(chunks), msg
            body = msg.get("body", b"")
            seen += len(body)
            if seen > max_bytes:
                raise _TooLarge()
            chunks.append(body)
            if not msg.get("more_body", False):
                whole = b"".join(chunks)
                return whole, {"type": "http.request", "body": whole, "more_body": False}


def _problem(body: bytes, max_depth: int) -> InvalidRequestError | None:
    if not body:
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidRequestError("the request body is not valid UTF-8", code="invalid_json")
    depth = json_depth_of(body)
    if depth > max_depth:
        return InvalidRequestError(f"the request body nests {depth} levels deep; at most {max_depth} are allowed",
                                   code="json_too_deep")
    return None
