"""The router deployment: the one place that decides canary / A-B routing.

It holds a ``deployments.routing.Router`` (routes, variants, weights, sticky assignment, per-variant
statistics, circuit breakers, staged rollouts). Its routes are the deployment's ``user_config``, so
``serve deploy FILE`` / ``mlx-serving up --config FILE`` with new weights calls ``reconfigure`` on
the running router and restarts nothing.

Tokens do not flow through it (each Ray hop costs about 1 ms of CPU per streamed item, see
docs/canary.md): an ingress keeps the router's routing *table* (``watch``, pushed by long poll),
picks variants locally with the same ``routing.assignment`` code, streams straight from the chosen
model replica, and sends outcomes back in batches (``record_batch``). Half-open circuits are the
exception: their probes are rationed here, so an ingress asks ``choose`` for a route while one of its
variants is half-open.

Every rollout decision and circuit transition is one JSON log line (``rollout_decision``, ``rollback``,
``breaker_transition``) and a count in ``mlx_serving_router_events``; every reported outcome counts an
assignment (``mlx_serving_route_assignments``) and an outcome (``mlx_serving_routed_requests``); see
``metrics.RouterMetrics`` and docs/observability.md.

Rollout state and open circuits are saved per route in Ray's internal KV whenever they change
(``routing.persist``), and taken back when a replica starts, so a restarted router does not send
traffic to a canary it rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from ray import serve

from .config import route_problems
from .logging import setup as setup_logging
from .metrics import RouterMetrics
from .routing import Outcome, Router, RoutingConfig
from .routing.config import SATURATION_CODES
from .routing.errors import RoutingError
from .gcs_kv import RayInternalKV
from .routing.persist import RolloutStore
from .routing.snapshot import RouteSnapshot

logger = logging.getLogger("ray.serve")

TICK_INTERVAL_S = 0.5  # rollout judgements and breaker cooldowns are checked this often
WATCH_TIMEOUT_S = 10.0  # an idle long poll returns after this long (the caller polls again)
LOAD_ATTEMPTS = 3  # reads of saved state before a replica gives up starting (Serve then retries it)
REPUBLISH_S = 5.0  # rollout gauges are set again this often (Ray drops a gauge series left alone for 20 s)


def _default_store() -> RolloutStore | None:
    """The KV store of this replica's application; None outside a Ray Serve replica."""
    if not RayInternalKV.available():
        return None
    try:
        app = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a replica: nothing to scope the keys by
        return None
    return RolloutStore(app)


class RouterDeployment:
    def __init__(self, models: list[str], tick_interval_s: float = TICK_INTERVAL_S,
                 store: RolloutStore | None = None, metrics: RouterMetrics | None = None) -> None:
        setup_logging("router")  # JSON lines on stderr, tagged with the app, deployment and replica
        self.models = list(models)
        self.tick_interval_s = tick_interval_s
        self.router = Router()
        self.store = store if store is not None else _default_store()
        if self.store is None:
            logger.warning("router: no Ray internal KV here: rollout state will not survive a restart")
        self._persist_lock = asyncio.Lock()
        self.version = 0  # bumped whenever the routing table changes
        self._table: dict[str, Any] = {}
        self._changed = asyncio.Event()
        self._started = time.time()
        self._epoch = f"{os.getpid():x}{time.time_ns() % 2**32:08x}"
        self._events_total: dict[str, int] = {}
        self.metrics = metrics or RouterMetrics()
        self._republished = time.monotonic()
        self._ticker: asyncio.Task | None = None
        self._ensure_ticker()

    # -- configuration ------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply ``{"routes": [...]}`` from the Serve user_config; stats, breakers and rollouts of
        unchanged variants carry over (see ``Router.reconfigure``)."""
        config = RoutingConfig.model_validate(user_config or {})
        found = route_problems(config.routes, self.models)
        if found:  # Serve reports this as a failed update and keeps the routes it had
            raise ValueError("invalid routes: " + "; ".join(msg for _, msg in found))
        held = set(self.router.routes)
        saved = await self._load([r.name for r in config.routes if r.name not in held])
        for note in self.router.reconfigure(config, saved):
            logger.warning("router: %s", note)
        summary = {r: self.router.weights(r) for r in self.router.routes}
        logger.info("router: routes configured: %s", summary or "none")
        self._export_rollout_gauges()
        self._after_change()
        await self._persist()
        self._ensure_ticker()

    # -- data path (used by the ingress) ------------------------------------------------------------
    @property
    def table_version(self) -> str:
        """Changes with the table, and with every restart of the router (the epoch)."""
        return f"{self._epoch}:{self.version}"

    async def watch(self, version: str | None = None, timeout_s: float = WATCH_TIMEOUT_S) -> tuple[str, dict[str, Any]]:
        """``(version, table)`` as soon as the table differs from the caller's ``version`` (long poll)."""
        self._ensure_ticker()
        if version == self.table_version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.table_version, self._table

    async def choose(self, route: str, key: str | None = None, force: str | None = None) -> dict[str, Any]:
        """One decision: ``{"route", "variant", "deployment", "reason"}``; routing errors come back as
        ``{"error": kind, "message", "retry_after"}`` so the caller maps them without unpickling."""
        try:
            d = self.router.choose(route, key=key, force=force)
        except RoutingError as e:
            return {"error": type(e).__name__, "message": str(e), "retry_after": getattr(e, "retry_after", None)}
        finally:
            self._after_change()  # a probe admitted or a cooldown elapsed may change the table
            await self._persist()
        return {"route": d.route, "variant": d.variant, "deployment": d.deployment, "reason": d.reason}

    async def record(self, route: str, variant: str, outcome: dict[str, Any]) -> None:
        await self.record_batch([(route, variant, outcome)])

    async def record_batch(self, items: list[tuple[str, str, dict[str, Any]]]) -> str:
        """Outcomes of routed requests, batched by the ingress; returns the table version after them."""
        for route, variant, o in items:
            outcome = Outcome(**o)
            self.router.record(route, variant, outcome)
            self.metrics.routed(route, variant, _outcome_label(outcome))
        self._after_change()
        await self._persist()
        return self.table_version

    # -- admin --------------------------------------------------------------------------------------
    async def command(self, route: str, action: str, stage: int | None = None, reason: str = "manual") -> dict[str, Any]:
        """promote | rollback | pause | resume | start | set_stage; errors come back as data (see choose)."""
        try:
            if action == "set_stage":
                if stage is None:
                    raise ValueError("set_stage needs a stage index")
                decision = self.router.set_stage(route, stage, reason)
            elif action in ("promote", "rollback", "pause", "resume", "start"):
                decision = getattr(self.router, action)(route, reason)
            else:
                raise ValueError(f"unknown rollout action {action!r}")
        except (RoutingError, ValueError) as e:
            return {"error": type(e).__name__, "message": str(e)}
        finally:
            self._after_change()
            await self._persist()  # the admin's answer comes once the command is saved
        return decision.to_dict()

    async def report(self) -> dict[str, Any]:
        out = self.router.report()
        out["table_version"] = self.table_version
        out["events_total"] = dict(self._events_total)
        out["router"] = {"pid": os.getpid(), "started_at": self._started, "tick_interval_s": self.tick_interval_s}
        return out

    async def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "routes": self.router.routes, "table_version": self.table_version}

    async def tick(self) -> None:
        self.router.tick()
        self._after_change()
        await self._persist()

    # -- internals ----------------------------------------------------------------------------------
    def _ensure_ticker(self) -> None:
        if self._ticker is not None and not self._ticker.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the event loop yet; the next call starts it
        self._ticker = loop.create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval_s)
            try:
                self.router.tick()
                self._after_change()
                self._republish()
                await self._persist()  # also retries saves that failed
            except Exception:  # noqa: BLE001 - a bad tick must not stop rollouts for good
                logger.exception("router: tick failed")

    async def _load(self, routes: list[str]) -> dict[str, RouteSnapshot]:
        """Saved state of routes this replica does not hold yet (all of them when it has just started).

        A read that keeps failing raises: starting those routes fresh could send traffic to a canary
        that was rolled back, so the replica (or the config update) fails and Serve tries again.
        """
        if self.store is None or not routes:
            return {}
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                return await asyncio.to_thread(self.store.load, routes)
            except Exception as e:  # noqa: BLE001 - GCS unreachable for a moment
                if attempt == LOAD_ATTEMPTS:
                    raise RuntimeError(f"cannot read saved rollout state of routes {routes}: {type(e).__name__}: {e}") from e
                logger.warning("router: reading saved rollout state failed (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(0.5 * attempt)
        return {}

    async def _persist(self) -> None:
        """Save the routes whose state changed, one write at a time so the newest state lands last;
        a failed save is retried on the next tick."""
        if self.store is None:
            self.router.take_dirty()
            return
        async with self._persist_lock:
            dirty = self.router.take_dirty()
            if not dirty:
                return
            snapshots = [self.router.snapshot(r) for r in dirty]
            try:
                await asyncio.to_thread(self.store.save, snapshots)
            except Exception as e:  # noqa: BLE001 - the GCS is briefly unreachable: keep routing, save later
                self.router.mark_dirty(dirty)
                logger.warning("router: saving rollout state of %s failed (%s: %s); retrying", dirty, type(e).__name__, e)

    def _after_change(self) -> None:
        """Log and count new events, export rollout gauges, and publish the table if it changed."""
        for e in self.router.drain_events():
            self._count(e)
        table = self.router.table()
        if table != self._table:
            self._table = table
            self.version += 1
            self._changed.set()  # wakes every long poll waiting on this event ...
            self._changed = asyncio.Event()  # ... and the next ones wait for the next change

    def _count(self, e: dict[str, Any]) -> None:
        """One JSON event line, the event counter and (for a rollout decision) the rollout gauges."""
        key = f"{e.get('kind')}:{self.metrics.event(e)}"
        self._events_total[key] = self._events_total.get(key, 0) + 1

    def _export_rollout_gauges(self) -> None:
        """Gauges for every rollout, also those restored or carried over without a new decision; none
        for routes that are gone or have no rollout any more."""
        rollouts = {route: r["rollout"] for route, r in self.router.report()["routes"].items() if r["rollout"]}
        self.metrics.keep_only(set(rollouts))
        for route, ro in rollouts.items():
            self.metrics.rollout(route, ro["state"], float(ro["canary_percent"]))

    def _republish(self) -> None:
        now = time.monotonic()
        if now - self._republished >= REPUBLISH_S:
            self._republished = now
            self.metrics.republish()


def _outcome_label(outcome: Outcome) -> str:
    """ok | over_capacity | client_error | the failure's code: saturation and client errors apart from failures."""
    if outcome.ok:
        return "ok"
    if outcome.code in SATURATION_CODES:
        return outcome.code
    return "client_error" if outcome.client_error else (outcome.code or "error")


def router_deployment() -> serve.Deployment:
    """The router deployment (bind it to the application's model names); routes come from ``user_config``."""
    return serve.deployment(RouterDeployment).options(
        name="router",
        num_replicas=1,  # one decider: statistics and rollout state live in one place
        max_ongoing_requests=1000,  # long polls from every ingress replica plus admin calls
        graceful_shutdown_timeout_s=2.0,  # only long polls are ever in flight; ingresses poll again
        logging_config={"enable_access_log": False},  # a line per outcome batch and long poll is noise; decisions are logged
        ray_actor_options={"num_cpus": 0},
    )
