"""Canary / A-B routing decisions in pure Python (no Ray, no MLX), driven by the router deployment.

``Router`` is the one object a deployment holds; the modules below it are usable on their own:
``config`` (pydantic models), ``assignment`` (weighted and sticky picks), ``stats`` (bounded
per-variant statistics), ``welch`` (Welch's t-test), ``breaker`` (circuit breaker), ``rollout``
(staged canary state machine) and ``snapshot`` (what of a route outlives the router process).
``persist`` saves snapshots in Ray's internal KV; it imports Ray only when a store is used.
"""

from .assignment import N_BUCKETS, Assignment, allocate, assign, bucket_of
from .breaker import BreakerEvent, BreakerState, CircuitBreaker
from .config import (
    SATURATION_CODES,
    CircuitBreakerConfig,
    LatencyGuard,
    RolloutPolicy,
    RouteConfig,
    RoutingConfig,
    VariantConfig,
)
from .errors import (
    InvalidTransitionError,
    NoRolloutError,
    NoVariantAvailableError,
    RoutingError,
    UnknownRouteError,
    UnknownVariantError,
)
from .rollout import RolloutController, RolloutDecision, RolloutState
from .router_state import Decision, Router
from .snapshot import BreakerSnapshot, DecisionRecord, RolloutSnapshot, RouteSnapshot
from .stats import LatencySamples, Outcome, StatsWindow, VariantStats
from .welch import WelchResult, betainc, t_cdf, t_sf, welch_from_moments, welch_t_test

__all__ = [
    "N_BUCKETS", "Assignment", "allocate", "assign", "bucket_of",
    "BreakerEvent", "BreakerState", "CircuitBreaker",
    "SATURATION_CODES", "CircuitBreakerConfig", "LatencyGuard", "RolloutPolicy", "RouteConfig", "RoutingConfig", "VariantConfig",
    "InvalidTransitionError", "NoRolloutError", "NoVariantAvailableError", "RoutingError",
    "UnknownRouteError", "UnknownVariantError",
    "RolloutController", "RolloutDecision", "RolloutState",
    "Decision", "Router",
    "BreakerSnapshot", "DecisionRecord", "RolloutSnapshot", "RouteSnapshot",
    "LatencySamples", "Outcome", "StatsWindow", "VariantStats",
    "WelchResult", "betainc", "t_cdf", "t_sf", "welch_from_moments", "welch_t_test",
]
