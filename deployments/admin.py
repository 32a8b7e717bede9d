"""``/admin/rollouts``: report and steer canary rollouts through the router deployment (admin keys only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from ray.serve.handle import DeploymentHandle

from engine.errors import ModelNotFoundError

from .http.relay import unary
from .route_client import RouteClient, routing_error


class RolloutCommand(BaseModel):
    reason: str | None = Field(None, max_length=500, description="Recorded with the decision.")


class StageCommand(RolloutCommand):
    stage: int = Field(ge=0, le=1000, description="Index into the rollout policy's stages.")


async def report(router: DeploymentHandle | None, routes: RouteClient) -> dict[str, Any]:
    """Every route: variants, weights, breakers, per-variant counts and latency summaries, rollout
    stage and state, the last Welch test and decision, recent events, and this ingress's table."""
    ingress = {"table_version": routes.version, "routes": routes.routes, "outcomes_dropped": routes.dropped}
    if router is None:
        return {"routes": {}, "recent_events": [], "router": None, "ingress": ingress,
                "detail": "no router deployed: this application has no routes"}
    return {**await unary(lambda: router.report.remote()), "ingress": ingress}


async def command(router: DeploymentHandle | None, route: str, action: str, stage: int | None,
                  reason: str | None) -> dict[str, Any]:
    if router is None:
        raise ModelNotFoundError(f"no route named {route!r}: this application has no routes", param="route")
    result = await unary(lambda: router.command.remote(route, action, stage, reason or f"manual {action} (admin API)"))
    if "error" in result:
        raise routing_error(result)
    return result
