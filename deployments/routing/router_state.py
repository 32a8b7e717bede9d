"""The router's whole state behind one object, so the Ray Serve router deployment stays thin:

    router = Router(RoutingConfig.model_validate(user_config))   # and router.reconfigure(user_config)
    d = router.choose("chat", key=user_id)                      # -> send to d.deployment
    router.record("chat", d.variant, Outcome(ok=True, ttft_s=..., tpot_s=..., e2e_s=...))
    router.tick()                                               # periodically: rollouts, breaker cooldowns
    for event in router.drain_events(): log / count it
    router.report()                                             # JSON for an admin endpoint
    for route in router.take_dirty(): save(router.snapshot(route))   # persist what changed
    Router(..., saved={route: snapshot})                         # a restarted process takes it back

No Ray and no MLX here; the clock and RNG are injectable so tests never sleep. Methods take a lock:
Serve may call a sync method from a thread pool while the event loop calls another.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .assignment import assign
from .breaker import BreakerEvent, BreakerState, CircuitBreaker
from .config import SATURATION_CODES, RouteConfig, RoutingConfig, VariantConfig
from .errors import NoRolloutError, NoVariantAvailableError, UnknownRouteError, UnknownVariantError
from .rollout import RolloutController, RolloutDecision, RolloutState
from .snapshot import BreakerSnapshot, Clocks, RolloutSnapshot, RouteSnapshot
from .stats import Outcome, VariantStats


@dataclass(frozen=True)
class Decision:
    route: str
    variant: str
    deployment: str
    reason: str  # forced | sticky | sticky-rehashed | weighted


@dataclass
class _Variant:
    config: VariantConfig
    stats: VariantStats
    breaker: CircuitBreaker


@dataclass
class _Route:
    config: RouteConfig
    variants: dict[str, _Variant]  # configured order: the stable order sticky buckets are laid out in
    rollout: RolloutController | None
    canary_tripped: bool = False  # the canary's circuit opened since the last tick

    @property
    def baseline(self) -> str:
        return self.config.baseline or self.config.variants[0].name

    def configured_weights(self) -> dict[str, float]:
        return {n: v.config.weight for n, v in self.variants.items()}

    def weights(self) -> dict[str, float]:
        configured = self.configured_weights()
        return self.rollout.weights(configured) if self.rollout else configured


RoutesInput = RoutingConfig | Mapping[str, Any] | Iterable[RouteConfig | Mapping[str, Any]]


class Router:
    """Routes, per-variant stats and breakers, and rollouts of every route the router serves."""

    def __init__(self, routes: RoutesInput = (), *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 max_events: int = 1000, saved: Mapping[str, RouteSnapshot] | None = None) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._routes: dict[str, _Route] = {}
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_events)  # for drain_events
        self._recent: deque[dict[str, Any]] = deque(maxlen=50)  # for report
        self._dirty: set[str] = set()  # routes whose persistable state changed since take_dirty
        self.reconfigure(routes, saved)

    # -- configuration ------------------------------------------------------------------------------

    def reconfigure(self, routes: RoutesInput, saved: Mapping[str, RouteSnapshot] | None = None) -> list[str]:
        """Apply a new configuration atomically (it is fully validated first).

        A variant keeps its stats and breaker when its name and deployment are unchanged (a new
        deployment behind the same name is a new variant). A rollout keeps its state while its
        canary, baseline and the canary's deployment are unchanged, so pushing new weights or
        thresholds never restarts or resurrects a rollout; ship the canary as a new deployment to
        start over.

        ``saved`` holds persisted snapshots (``snapshot``) for routes this router does not hold yet,
        as after a restart: the same rule decides what of them is taken back, so a rolled-back
        canary stays rolled back. Returns one line per state restored or discarded, for the log.
        """
        config = _as_routing_config(routes)
        notes: list[str] = []
        with self._lock:
            clocks = Clocks(self._clock(), self._wall_clock())
            built: dict[str, _Route] = {}
            for cfg in config.routes:
                old = self._routes.get(cfg.name)
                snap = (saved or {}).get(cfg.name) if old is None else None
                built[cfg.name] = self._build_route(cfg, old, notes)
                if snap is not None:
                    self._restore(built[cfg.name], snap, clocks, notes)
            self._routes = built
            self._dirty.update(built)  # thresholds, stages or the identity of a rollout may have changed
        return notes

    def _build_route(self, cfg: RouteConfig, old: _Route | None, notes: list[str]) -> _Route:
        variants: dict[str, _Variant] = {}
        for vc in cfg.variants:
            prev = old.variants.get(vc.name) if old else None
            if prev is not None and prev.config.deployment == vc.deployment:
                prev.breaker.configure(cfg.circuit_breaker)
                prev.stats.resize(cfg.sample_window)
                variants[vc.name] = _Variant(vc, prev.stats, prev.breaker)
            else:
                breaker = CircuitBreaker(cfg.circuit_breaker, name=vc.name, clock=self._clock)
                variants[vc.name] = _Variant(vc, VariantStats(cfg.sample_window), breaker)
        rollout: RolloutController | None = None
        baseline = cfg.baseline or cfg.variants[0].name
        if cfg.rollout is not None:
            prev_ro = old.rollout if old else None
            prev_canary = old.variants.get(cfg.rollout.canary) if old else None
            canary_kept = prev_canary is not None and variants[cfg.rollout.canary].stats is prev_canary.stats
            if prev_ro is not None and canary_kept and prev_ro.canary == cfg.rollout.canary \
                    and prev_ro.baseline == baseline:
                prev_ro.configure(cfg.rollout, baseline)
                rollout = prev_ro
            else:
                if prev_ro is not None and prev_ro.state is not RolloutState.PENDING:
                    notes.append(f"route {cfg.name!r}: rollout of {cfg.rollout.canary!r} starts over "
                                 f"(it was {prev_ro.state} for canary {prev_ro.canary!r} of a different deployment "
                                 f"or baseline)")
                rollout = RolloutController(cfg.rollout, baseline, clock=self._clock)
        return _Route(cfg, variants, rollout)

    def _restore(self, r: _Route, snap: RouteSnapshot, clocks: Clocks, notes: list[str]) -> None:
        """Take back what of ``snap`` still describes route ``r``; log what is discarded and why."""
        name = r.config.name
        for vname, bs in snap.breakers.items():
            v = r.variants.get(vname)
            if v is not None and v.config.deployment == bs.deployment:
                bs.restore_into(v.breaker, snap.saved_at, clocks)
                notes.append(f"route {name!r}: circuit of {vname!r} restored {bs.state} "
                             f"(retry in {v.breaker.retry_after(clocks.mono) or 0:.0f}s)")
        if snap.rollout is None:
            return
        if r.rollout is None:
            notes.append(f"route {name!r}: saved rollout of {snap.rollout.canary!r} discarded: "
                         "the route has no rollout now")
            return
        canary_deployment = r.variants[r.rollout.canary].config.deployment
        why = snap.rollout.mismatch(r.rollout.policy, r.baseline, canary_deployment)
        if why is not None:
            notes.append(f"route {name!r}: saved rollout ({snap.rollout.state}) discarded, starting fresh: {why}")
            return
        snap.rollout.restore_into(r.rollout, clocks)
        notes.append(f"route {name!r}: rollout of {r.rollout.canary!r} restored {r.rollout.state} at stage "
                     f"{r.rollout.stage_index} ({r.rollout.canary_percent:g}% canary)")

    # -- persistence --------------------------------------------------------------------------------

    def snapshot(self, route: str) -> RouteSnapshot:
        """The persistable state of one route (see ``routing.snapshot`` for what is kept and why)."""
        with self._lock:
            r = self._route(route)
            clocks = Clocks(self._clock(), self._wall_clock())
            breakers = {n: BreakerSnapshot.of(v.breaker, v.config.deployment, clocks)
                        for n, v in r.variants.items()
                        if v.breaker.config.enabled and v.breaker.state is not BreakerState.CLOSED}
            rollout = None
            if r.rollout is not None:
                canary_deployment = r.variants[r.rollout.canary].config.deployment
                rollout = RolloutSnapshot.of(r.rollout, canary_deployment, clocks)
            return RouteSnapshot(route=route, saved_at=clocks.wall, rollout=rollout, breakers=breakers)

    def take_dirty(self) -> list[str]:
        """Routes (still configured) whose persistable state changed since the last call: a rollout
        decision other than a wait, a circuit transition, or a reconfigure."""
        with self._lock:
            dirty = [name for name in self._routes if name in self._dirty]
            self._dirty.clear()
            return dirty

    def mark_dirty(self, routes: Iterable[str]) -> None:
        """Ask for these routes to be saved again (their last save failed)."""
        with self._lock:
            self._dirty.update(routes)

    @property
    def routes(self) -> list[str]:
        with self._lock:
            return list(self._routes)

    def weights(self, route: str) -> dict[str, float]:
        """Effective weights (rollout stage applied, breakers not) in configured order."""
        with self._lock:
            return self._route(route).weights()

    def table(self) -> dict[str, dict[str, Any]]:
        """What a caller needs to make ``choose``'s unforced decisions itself (an ingress routing locally).

        Per route: ``sticky``, effective ``weights`` in configured order, ``deployments`` (variant ->
        deployment), ``closed`` (variants whose circuit lets everything through), ``probing``
        (half-open variants: their probes are rationed here, so route through ``choose`` while any
        exist) and ``retry_after_s`` (soonest reopening of an open circuit). Picking with
        ``assign(weights, closed, key if sticky else None, salt=route)`` gives ``choose``'s answer.
        """
        with self._lock:
            now = self._clock()
            out: dict[str, dict[str, Any]] = {}
            for name, r in self._routes.items():
                self._poll_breakers(r, now)
                states = {n: (v.breaker.state if v.breaker.config.enabled else BreakerState.CLOSED)
                          for n, v in r.variants.items()}
                waits = [w for v in r.variants.values() if (w := v.breaker.retry_after(now)) is not None]
                out[name] = {
                    "sticky": r.config.sticky,
                    "weights": r.weights(),
                    "deployments": {n: v.config.deployment for n, v in r.variants.items()},
                    "closed": [n for n, s in states.items() if s is BreakerState.CLOSED],
                    "probing": [n for n, s in states.items() if s is BreakerState.HALF_OPEN],
                    "retry_after_s": min(waits) if waits else None,
                }
            return out

    # -- data path ----------------------------------------------------------------------------------

    def choose(self, route: str, key: str | None = None, force: str | None = None) -> Decision:
        """Pick the variant for one request.

        ``key`` (a user id) makes the choice sticky when the route is sticky; ``force`` pins a variant
        by name and bypasses weights and breakers (admin override). Raises ``UnknownRouteError``,
        ``UnknownVariantError`` or ``NoVariantAvailableError``.
        """
        with self._lock:
            r = self._route(route)
            if force is not None:
                v = r.variants.get(force)
                if v is None:
                    raise UnknownVariantError(route, force)
                return Decision(route, force, v.config.deployment, "forced")
            now = self._clock()
            self._poll_breakers(r, now)
            eligible = [n for n, v in r.variants.items() if v.breaker.available()]
            weights = r.weights()
            a = assign(weights, eligible, key if r.config.sticky else None, salt=route, rng=self._rng)
            if a is None:
                waits = [v.breaker.retry_after(now) for n, v in r.variants.items() if weights[n] > 0]
                known = [w for w in waits if w is not None]
                raise NoVariantAvailableError(route, min(known) if known else None)
            chosen = r.variants[a.variant]
            chosen.breaker.acquire()
            return Decision(route, a.variant, chosen.config.deployment, a.reason)

    def record(self, route: str, variant: str, outcome: Outcome) -> None:
        """Feed back one request's outcome. Outcomes for routes or variants removed since are dropped."""
        with self._lock:
            r = self._routes.get(route)
            v = r.variants.get(variant) if r else None
            if r is None or v is None:
                return
            failure = self._is_failure(r, outcome)
            v.stats.record(outcome, failure)
            now = self._clock()
            if outcome.ok:
                events = v.breaker.record_success(now)
            elif failure:
                events = v.breaker.record_failure(now)
            else:  # the client's doing or a full queue: no evidence about the variant either way
                v.breaker.record_neutral()
                events = []
            for e in events:
                if r.rollout is not None and variant == r.rollout.canary and e.to_state is BreakerState.OPEN:
                    r.canary_tripped = True
            self._log(route, events)

    @staticmethod
    def _is_failure(r: _Route, outcome: Outcome) -> bool:
        """Whether an outcome counts against its variant: never a client error (the ingress's flag, or a
        code the route lists), never a saturated variant turning a request away (429)."""
        if outcome.ok or outcome.client_error:
            return False
        code = outcome.code or "unknown"
        return code not in r.config.client_error_codes and code not in SATURATION_CODES

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Apply time: breaker cooldowns, then rollout judgements. Returns the events this tick made
        (they are also queued for ``drain_events``)."""
        with self._lock:
            now = self._clock() if now is None else now
            made: list[dict[str, Any]] = []
            for name, r in self._routes.items():
                made += self._poll_breakers(r, now)
                if r.rollout is None:
                    continue
                canary, baseline = r.variants[r.rollout.canary], r.variants[r.baseline]
                tripped = r.canary_tripped or canary.breaker.state is BreakerState.OPEN
                r.canary_tripped = False
                decision = r.rollout.evaluate(canary.stats, baseline.stats, now, canary_circuit_open=tripped)
                if decision is not None:
                    made += self._apply(name, r, decision)
            return made

    # -- manual rollout commands (admin endpoint) ---------------------------------------------------

    def start(self, route: str, reason: str = "manual start") -> RolloutDecision:
        return self._command(route, lambda ro: ro.start(self._clock(), reason))

    def promote(self, route: str, reason: str = "manual") -> RolloutDecision:
        return self._command(route, lambda ro: ro.promote(reason, self._clock()))

    def rollback(self, route: str, reason: str = "manual") -> RolloutDecision:
        return self._command(route, lambda ro: ro.rollback(reason, self._clock()))

    def set_stage(self, route: str, index: int, reason: str = "manual") -> RolloutDecision:
        return self._command(route, lambda ro: ro.set_stage(index, self._clock(), reason))

    def pause(self, route: str, reason: str = "manual") -> RolloutDecision:
        return self._command(route, lambda ro: ro.pause(reason, self._clock()))

    def resume(self, route: str, reason: str = "manual") -> RolloutDecision:
        return self._command(route, lambda ro: ro.resume(reason, self._clock()))

    # -- observation --------------------------------------------------------------------------------

    def drain_events(self) -> list[dict[str, Any]]:
        """Breaker transitions and rollout decisions (not waits) since the last drain, oldest first."""
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
            return events

    def report(self) -> dict[str, Any]:
        """JSON-serializable view of every route: weights, breakers, stats, rollout and recent events."""
        with self._lock:
            now = self._clock()
            return {"routes": {name: self._route_report(r, now) for name, r in self._routes.items()},
                    "recent_events": list(self._recent)}

    def _route_report(self, r: _Route, now: float) -> dict[str, Any]:
        weights = r.weights()
        total = sum(w for w in weights.values() if w > 0)
        variants = [{
            "name": n,
            "deployment": v.config.deployment,
            "configured_weight": v.config.weight,
            "weight": weights[n],
            "share_percent": 100.0 * weights[n] / total if total > 0 and weights[n] > 0 else 0.0,
            "available": v.breaker.available(),
            "breaker": v.breaker.snapshot(now),
            "stats": v.stats.summary(),
        } for n, v in r.variants.items()]
        return {"baseline": r.baseline, "sticky": r.config.sticky, "variants": variants,
                "rollout": r.rollout.snapshot(now) if r.rollout else None}

    # -- internals ----------------------------------------------------------------------------------

    def _route(self, route: str) -> _Route:
        r = self._routes.get(route)
        if r is None:
            raise UnknownRouteError(route)
        return r

    def _poll_breakers(self, r: _Route, now: float) -> list[dict[str, Any]]:
        return self._log(r.config.name, [e for v in r.variants.values() for e in v.breaker.poll(now)])

    def _command(self, route: str, fn: Callable[[RolloutController], RolloutDecision]) -> RolloutDecision:
        with self._lock:
            r = self._route(route)
            if r.rollout is None:
                raise NoRolloutError(route)
            decision = fn(r.rollout)
            self._apply(route, r, decision)
            return decision

    def _apply(self, name: str, r: _Route, decision: RolloutDecision) -> list[dict[str, Any]]:
        if decision.changes_stage:  # compare canary and baseline over the same period
            for v in r.variants.values():
                v.stats.reset_stage()
        return self._log(name, [decision] if decision.action != "wait" else [])

    def _log(self, route: str, events: Iterable[BreakerEvent | RolloutDecision]) -> list[dict[str, Any]]:
        out = [{"route": route, **e.to_dict()} for e in events]
        if out:  # every logged event is a circuit transition or a rollout decision: state worth saving
            self._dirty.add(route)
        self._pending.extend(out)
        self._recent.extend(out)
        return out


def _as_routing_config(routes: RoutesInput) -> RoutingConfig:
    if isinstance(routes, RoutingConfig):
        return routes
    if isinstance(routes, Mapping):
        return RoutingConfig.model_validate(routes)
    return RoutingConfig(routes=[r if isinstance(r, RouteConfig) else RouteConfig.model_validate(r) for r in routes])
