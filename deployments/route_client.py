"""The ingress's side of routing: a copy of the router's table, local picks, batched outcome reports.

The router deployment decides (weights, breakers, rollouts); this keeps its latest table (pushed by a
long poll on ``RouterDeployment.watch``) and applies the same ``routing.assignment.assign`` call that
``Router.choose`` makes, so a routed request costs no extra Ray hop: the ingress streams straight from
the chosen variant's model replica. Outcomes go back to the router in batches, off the request path.
While a variant of a route is half-open its probes are rationed by the router, so picks for that
route ask ``RouterDeployment.choose`` (one unary call) until the circuit settles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from engine.errors import EngineError, InvalidRequestError, ModelNotFoundError, NotReadyError

from .routing.assignment import assign
from .routing.stats import Outcome

logger = logging.getLogger("ray.serve")

FLUSH_INTERVAL_S = 0.05  # outcomes wait at most this long before they travel to the router
MAX_PENDING = 10_000  # outcomes kept while the router is unreachable (older ones are dropped)
TABLE_WAIT_S = 30.0  # a request arriving before the first table waits at most this long


@dataclass(frozen=True)
class Pick:
    route: str
    variant: str
    deployment: str  # the model (name in the app's `models`) that serves it
    reason: str


class RouteClient:
    def __init__(self, router: DeploymentHandle | None, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.router = router
        self.flush_interval_s = flush_interval_s
        self.version: Any = None
        self.table: dict[str, dict[str, Any]] = {}
        self.loaded = router is None  # no router: no routes, nothing to wait for
        self._loaded_event: asyncio.Event | None = None
        self._pending: list[tuple[str, str, dict[str, Any]]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._rng = random.Random()
        self.dropped = 0

    # -- table --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background tasks (idempotent; needs the running event loop)."""
        if self.router is None or self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._loaded_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._watch_forever()), loop.create_task(self._flush_forever())]

    async def ensure_loaded(self) -> None:
        if self.loaded:
            return
        self.start()
        assert self._loaded_event is not None
        try:
            await asyncio.wait_for(self._loaded_event.wait(), TABLE_WAIT_S)
        except asyncio.TimeoutError:
            raise NotReadyError("the routing table has not arrived from the router deployment yet; retry shortly",
                                retry_after=1.0) from None

    def is_route(self, name: str) -> bool:
        return name in self.table

    @property
    def routes(self) -> list[str]:
        return list(self.table)

    async def _watch_forever(self) -> None:
        assert self.router is not None
        while True:
            try:
                version, table = await self.router.watch.remote(self.version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - router restarting or briefly unreachable: keep the last table
                logger.warning("ingress: routing table refresh failed (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(1.0)
                continue
            if version != self.version:
                self.table, self.version = table, version
                if not self.loaded:
                    self.loaded = True
                    assert self._loaded_event is not None
                    self._loaded_event.set()

    # -- decisions ----------------------------------------------------------------------------------
    async def pick(self, route: str, key: str | None = None, force: str | None = None) -> Pick:
        """The variant for one request of ``route`` (which must be in the table)."""
        entry = self.table[route]
        deployments: dict[str, str] = entry["deployments"]
        if force is not None:
            if force not in deployments:
                raise InvalidRequestError(f"route {route!r} has no variant {force!r}; its variants: "
                                          f"{', '.join(deployments)}", param="x-mlx-force-variant",
                                          code="unknown_variant")
            return Pick(route, force, deployments[force], "forced")
        if entry["probing"]:
            return await self._ask_router(route, key)
        a = assign(entry["weights"], entry["closed"], key if entry["sticky"] else None, salt=route, rng=self._rng)
        if a is None:
            raise NotReadyError(f"route {route!r}: no variant is available (circuits open or weights zero)",
                                code="no_variant_available", retry_after=entry.get("retry_after_s") or 1.0)
        return Pick(route, a.variant, deployments[a.variant], a.reason)

    async def _ask_router(self, route: str, key: str | None) -> Pick:
        assert self.router is not None
        try:
            d = await self.router.choose.remote(route, key, None)
        except Exception as e:  # noqa: BLE001
            raise NotReadyError(f"the router deployment is unavailable: {type(e).__name__}", retry_after=1.0) from e
        if "error" in d:
            raise routing_error(d)
        return Pick(d["route"], d["variant"], d["deployment"], d["reason"])

    # -- outcomes -----------------------------------------------------------------------------------
    def record(self, pick: Pick, outcome: Outcome) -> None:
        """Queue one outcome for the router (never blocks the request)."""
        if self.router is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(0)
            self.dropped += 1
        self._pending.append((pick.route, pick.variant, dataclasses.asdict(outcome)))
        if self._wake is not None:
            self._wake.set()

    async def _flush_forever(self) -> None:
        assert self.router is not None and self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval_s)  # let a batch gather
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await self.router.record_batch.remote(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - statistics are best effort; requests never wait on them
                self.dropped += len(batch)
                logger.warning("ingress: %d routing outcomes lost (%s: %s)", len(batch), type(e).__name__, e)
                await asyncio.sleep(1.0)


def routing_error(d: dict[str, Any]) -> EngineError:
    """A routing error the router returned as data, as the error a client sees."""
    kind, message = d.get("error"), d.get("message", "routing failed")
    if kind == "UnknownRouteError":
        return ModelNotFoundError(message, param="model")
    if kind == "NoVariantAvailableError":
        return NotReadyError(message, code="no_variant_available", retry_after=d.get("retry_after") or 1.0)
    if kind == "UnknownVariantError":
        return InvalidRequestError(message, code="unknown_variant")
    if kind == "NoRolloutError":
        return ModelNotFoundError(message, code="no_rollout")
    return ConflictError(message)


class ConflictError(EngineError):
    """A rollout command that does not apply in the rollout's current state (409)."""

    code = "invalid_transition"
    kind = "conflict"


class PermissionDeniedError(EngineError):
    """A valid key that may not do this (403): admin routes and forced variants need an admin key."""

    code = "permission_denied"
    kind = "forbidden"
