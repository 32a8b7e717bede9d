"""Structured JSON logs for the Serve deployments, and the events the cluster reports.

Every line carries the request id of the request it is about. Ray Serve already does the hard part:
its proxy takes ``x-request-id`` from the client (or makes one), returns it as the ``x-request-id``
response header, and carries it in its request context through every ``DeploymentHandle`` call, so
the ingress and the model replica see the same id. ``setup()`` plugs that context into
``engine.logs`` (plus the deployment, the replica and what the ingress learned about the request:
the model and the completion id), so a plain ``logging.getLogger("mlx_serving.x").info(...)`` in a
request's code path is tagged. Outside Serve the HTTP middleware (``deployments.metrics``) sets the
id itself.

Events (one JSON line each, ``"event": <name>``), for the router and the replicas to call:
``replica_started``, ``replica_unhealthy``, ``replica_died``, ``engine_dead``, ``queue_saturated``,
``breaker_transition`` and ``rollout_decision`` (named ``rollback`` when the action is a rollback);
the router deployment logs both through ``router_event`` (via ``metrics.RouterMetrics.event``).

Where the lines go: each Ray worker's stderr, i.e. ``/tmp/ray/session_latest/logs/worker-*.err`` on
the node (and the actor's log view in the Ray dashboard, ``ray logs actor --id ...``); set
``MLX_SERVING_LOG_FILE`` to append to a file instead.
"""

from __future__ import annotations

import contextvars
import logging
import os
from typing import Any

from engine import logs
from engine.logs import RateLimited, event

# What the ingress learned about the request in flight (model, variant, completion id); the HTTP
# middleware creates it per request and reads it back for the access log and the metrics.
request_note: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("mlx_serving_note", default=None)
NOTE_FIELDS = ("model", "completion_id")  # copied onto every log line of the request

_replica_fields: dict[str, Any] | None = None
_component: dict[str, Any] = {}
_saturation = RateLimited(10.0)
_deaths = RateLimited(1.0)


def annotate(**fields: Any) -> None:
    """Record facts about the current request (no-op outside a request)."""
    note = request_note.get()
    if note is not None:
        note.update(fields)


def serve_request_id() -> str | None:
    """The Serve request id of the request this code runs for (None outside Serve)."""
    try:
        from ray.serve import context as sc

        rid = sc._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - no Serve here, or its private API moved
        return None
    return rid or None


def _replica() -> dict[str, Any]:
    global _replica_fields
    if _replica_fields is None:
        try:
            from ray.serve import context as sc

            rc = sc._get_internal_replica_context()
        except Exception:  # noqa: BLE001
            rc = None
        if rc is None:
            return {}
        _replica_fields = {"app": rc.app_name or None, "deployment": rc.deployment,
                           "replica": getattr(rc, "replica_tag", None)}
    return _replica_fields


def _context() -> dict[str, Any]:
    out: dict[str, Any] = dict(_component)
    out.update(_replica())
    rid = serve_request_id()
    if rid:
        out["request_id"] = logs.clip(rid)
    note = request_note.get()
    if note:
        for k in NOTE_FIELDS:
            if note.get(k):
                out[k] = note[k]
    return out


def setup(component: str, **static: Any) -> logging.Logger:
    """JSON logs for this process (idempotent): call from a deployment's constructor."""
    _component.update({"component": component, "pid": os.getpid(), **static})
    logs.add_context_provider(_context)
    return logs.configure()


# -- events ---------------------------------------------------------------------------------------
def replica_started(model: str, load_s: float, **fields: Any) -> None:
    event("replica_started", model=model, load_s=round(load_s, 3), **fields)


def replica_unhealthy(model: str, detail: str, **fields: Any) -> None:
    event("replica_unhealthy", logging.ERROR, model=model, detail=detail, **fields)


def replica_died(model: str | None = None, detail: str = "", **fields: Any) -> None:
    """The ingress met a dead replica (Serve starts a new one: this is the restart's first sign)."""
    held = _deaths.allow(model)
    if held is not None:
        event("replica_died", logging.WARNING, model=model, detail=detail, suppressed=held, **fields)


def engine_dead(model: str, detail: str, **fields: Any) -> None:
    event("engine_dead", logging.ERROR, model=model, detail=detail, **fields)


def queue_saturated(model: str | None, where: str, detail: str = "", **fields: Any) -> None:
    """Requests turned away with 429: at most one line per (model, where) every 10 s, with a count."""
    held = _saturation.allow((model, where))
    if held is not None:
        event("queue_saturated", logging.WARNING, model=model, where=where, detail=detail, suppressed=held, **fields)


def qos_action(model: str, action: str, reason: str = "", **fields: Any) -> None:
    """A remediation the ingress took or saw (shedding on/off, a scale-out or scale-in)."""
    level = logging.WARNING if action in ("shed_batch_on", "scale_out") else logging.INFO
    event("qos_action", level, model=model, action=action, reason=reason, **fields)


def breaker_transition(route: str, variant: str, from_state: str, to_state: str, reason: str = "",
                       **fields: Any) -> None:
    level = logging.WARNING if to_state == "open" else logging.INFO
    event("breaker_transition", level, route=route, variant=variant, from_state=from_state,
          to_state=to_state, reason=reason, **fields)


def rollout_decision(route: str, action: str, state: str | None = None, canary_percent: float | None = None,
                     reason: str = "", **fields: Any) -> None:
    """A rollout decision; a rollback is its own event name (``rollback``) so alerts can match it alone."""
    level = logging.WARNING if action == "rollback" else logging.INFO
    event("rollback" if action == "rollback" else "rollout_decision", level, route=route, action=action,
          state=state, canary_percent=canary_percent, reason=reason, **fields)


# Fields of the router's event dicts that a log line does without: ``kind`` is in the event's name and
# ``at`` is the router process's monotonic clock (the line's ``ts`` is the wall-clock time).
_ROUTER_ONLY = ("kind", "at")


def router_event(e: dict[str, Any]) -> None:
    """One of ``Router.drain_events()``'s dicts (``kind`` ``breaker`` or a rollout decision) as a JSON line:
    a breaker's ``name`` becomes ``variant``; a rollout decision keeps ``stage_index`` and its evidence
    (``metric``, ``statistic``, ``df``, ``p_value``, ``effect``, ``canary_error_rate``, ``baseline_error_rate``).

    Logged outside the caller's context: an event is about a route, not about the Serve call (an
    ingress's batch of outcomes, a long poll) whose request id happens to be current when it is drained."""
    contextvars.Context().run(_router_event, dict(e))


def _router_event(e: dict[str, Any]) -> None:
    route = str(e.pop("route", ""))
    breaker = e.get("kind") == "breaker"
    for k in _ROUTER_ONLY:
        e.pop(k, None)
    if breaker:
        breaker_transition(route, str(e.pop("name", "")), str(e.pop("from_state", "")), str(e.pop("to_state", "")),
                           str(e.pop("reason", "") or ""), **e)
    else:
        rollout_decision(route, str(e.pop("action", "")), e.pop("state", None), e.pop("canary_percent", None),
                         str(e.pop("reason", "") or ""), **e)
