"""Which replica deployment serves a request's ``model``: a plain model, or a route's variant.

A plain model costs one dict lookup once the routing table is loaded; a route is decided locally
from the router's table (sticky on ``x-session-id``, else the OpenAI ``user`` field), so routing
adds no Ray hop. Only admin keys may pin a route's request to one variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from ray.serve.handle import DeploymentHandle

from engine.errors import InvalidRequestError, ModelNotFoundError

from ..http.auth import Authenticator
from ..route_client import Pick, RouteClient, routing_error

FORCE_HEADER = "x-mlx-force-variant"  # admin keys only: pin a route's request to one variant
SESSION_HEADER = "x-session-id"  # sticky A/B key; the OpenAI `user` field when absent


@dataclass(frozen=True)
class Target:
    handle: DeploymentHandle
    variant: str  # for ``x-mlx-variant``: the variant, or the model for a plain model
    pick: Pick | None  # the route decision; None for a plain model
    model: str  # the model (deployment) that serves it


class Targets:
    def __init__(self, models: dict[str, DeploymentHandle], routes: RouteClient) -> None:
        self.models = models
        self.routes = routes

    async def names(self) -> list[str]:
        """What ``/v1/models`` lists: the models, then the routes that are not also models."""
        if not self.routes.loaded:
            await self.routes.ensure_loaded()
        return list(self.models) + [r for r in self.routes.routes if r not in self.models]

    async def resolve(self, model: str, request: Request, auth: Authenticator, user: str | None = None) -> Target:
        force = request.headers.get(FORCE_HEADER)
        if force is not None:
            auth.admin(request)
        if not self.routes.loaded:
            await self.routes.ensure_loaded()
        if not self.routes.is_route(model):
            if force is not None and force != model:
                raise InvalidRequestError(f"{FORCE_HEADER} applies to routes; {model!r} is a model, not a route",
                                          param=FORCE_HEADER)
            return Target(self.handle(model), model, None, model)
        pick = await self.routes.pick(model, request.headers.get(SESSION_HEADER) or user, force)
        handle = self.models.get(pick.deployment)
        if handle is None:  # validated at deploy time; a stale table during a redeploy could still say so
            raise routing_error({"error": "NoVariantAvailableError",
                                 "message": f"route {model!r}: variant {pick.variant!r} sends to unknown model {pick.deployment!r}"})
        return Target(handle, pick.variant, pick, pick.deployment)

    def handle(self, model: str) -> DeploymentHandle:
        handle = self.models.get(model)
        if handle is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist; GET /v1/models lists the models served",
                                     param="model")
        return handle
