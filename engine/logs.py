"""Structured logs: one JSON object per line, with the request id of the request a line is about.

No Ray import here: the in-process engine uses it as it is, and ``deployments.logging`` adds the
Ray Serve context (request id, deployment, replica) through ``add_context_provider``.

A line looks like::

    {"ts": "2026-11-22T10:04:05.123Z", "level": "INFO", "logger": "mlx_serving.http", "msg": "request",
     "request_id": "6f1c...", "event": "http_request", "status": 200, "model": "chat", ...}

``configure()`` is idempotent and reads ``MLX_SERVING_LOG_FORMAT`` (``json``, the default, or
``text``), ``MLX_SERVING_LOG_LEVEL`` (default ``INFO``) and ``MLX_SERVING_LOG_FILE`` (append there
instead of stderr). Everything under the ``mlx_serving`` logger goes through it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

ROOT_LOGGER = "mlx_serving"
MAX_REQUEST_ID_CHARS = 128  # a client picks x-request-id: keep what we log of it bounded

# The request a piece of code is working on (set by the HTTP middleware, or by a caller of the
# engine in-process). Serve's own request context is consulted too, through a context provider.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlx_serving_request_id", default=None)

_providers: list[Callable[[], dict[str, Any]]] = []
_configured_lock = threading.Lock()
_handler: logging.Handler | None = None

# LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def add_context_provider(fn: Callable[[], dict[str, Any]]) -> None:
    """Register ``fn`` (cheap, never raising) whose fields are added to every record that lacks them."""
    if fn not in _providers:
        _providers.append(fn)


def current_request_id() -> str | None:
    rid = request_id_var.get()
    if rid:
        return rid
    for fn in _providers:
        try:
            rid = fn().get("request_id")
        except Exception:  # noqa: BLE001 - a provider must never break logging
            continue
        if rid:
            return rid
    return None


def clip(value: str | None, limit: int = MAX_REQUEST_ID_CHARS) -> str | None:
    return value if value is None or len(value) <= limit else value[:limit]


class ContextFilter(logging.Filter):
    """Adds ``request_id`` (and whatever the providers know) to records that do not carry them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = request_id_var.get()
            if rid:
                record.request_id = rid
        for fn in _providers:
            try:
                fields = fn()
            except Exception:  # noqa: BLE001
                continue
            for k, v in fields.items():
                if v not in (None, "") and getattr(record, k, None) in (None, ""):
                    setattr(record, k, v)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_") and k not in out:
                out[k] = v
        if "request_id" in out:
            out["request_id"] = clip(str(out["request_id"]))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable fallback (``MLX_SERVING_LOG_FORMAT=text``): the same fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record)} {record.levelname:7s} {record.name}: {record.getMessage()}"
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def configure(level: str | int | None = None, fmt: str | None = None, stream: Any = None,
              path: str | None = None, force: bool = False) -> logging.Logger:
    """Attach one handler to the ``mlx_serving`` logger (idempotent unless ``force``)."""
    global _handler
    logger = logging.getLogger(ROOT_LOGGER)
    with _configured_lock:
        if _handler is not None and not force:
            return logger
        if _handler is not None:
            logger.removeHandler(_handler)
        fmt = (fmt or os.environ.get("MLX_SERVING_LOG_FORMAT") or "json").lower()
        path = path or os.environ.get("MLX_SERVING_LOG_FILE") or None
        handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
        handler.addFilter(ContextFilter())
        logger.addHandler(handler)
        logger.setLevel(level or os.environ.get("MLX_SERVING_LOG_LEVEL") or "INFO")
        logger.propagate = False  # one line per record, not a second copy through the root logger
        _handler = handler
    return logger


def event(name: str, level: int = logging.INFO, logger: str = "events", /, **fields: Any) -> None:
    """Log a named event (``{"event": name, ...fields}``) on ``mlx_serving.<logger>``."""
    log = logging.getLogger(f"{ROOT_LOGGER}.{logger}")
    if log.isEnabledFor(level):
        extra = {(f"{k}_" if k in _STANDARD else k): v for k, v in fields.items()}  # LogRecord refuses its own names
        log.log(level, name, extra={"event": name, **extra})


class RateLimited:
    """Let an event through at most once per ``interval_s`` per key; count what was held back."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[Any, float] = {}
        self._held: dict[Any, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: Any) -> int | None:
        """The number of suppressed events since the last one let through, or None to suppress this one."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)
