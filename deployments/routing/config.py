"""Routing configuration: what the router deployment reads from Serve ``user_config``.

Every model is ``extra="forbid"`` so a typo in a YAML file fails ``serve deploy`` loudly instead of
silently routing with defaults.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LatencyMetric = Literal["ttft", "tpot", "e2e"]

# Errors that say the client asked for something wrong, not that the variant is unhealthy: they count
# in per-code stats but neither trip a breaker nor raise a canary's error rate. (The ingress also marks
# every 4xx outcome, 429 included, as ``client_error``; these codes cover callers that do not.)
DEFAULT_CLIENT_ERROR_CODES: tuple[str, ...] = (
    "invalid_request",
    "request_too_large",
    "invalid_api_key",
    "model_not_found",
)

# A variant turning a request away because it is full (429) is busy, not broken: whatever a route's
# ``client_error_codes`` say, these never trip its breaker, raise its error rate or roll it back.
SATURATION_CODES: frozenset[str] = frozenset({"over_capacity"})


class VariantConfig(BaseModel):
    """One target of a route: a model-variant deployment and its share of traffic."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Variant name used in stats, overrides and rollouts.")
    deployment: str = Field("", description="Model-variant deployment this variant sends to (default: name).")
    weight: float = Field(1.0, ge=0, description="Relative share of traffic; 0 drains the variant.")

    @model_validator(mode="after")
    def _default_deployment(self) -> VariantConfig:
        if not self.deployment:
            self.deployment = self.name
        return self


class LatencyGuard(BaseModel):
    """Roll back when the canary is slower with statistical significance *and* by a material amount."""

    model_config = ConfigDict(extra="forbid")

    metric: LatencyMetric = "e2e"
    alpha: float = Field(0.01, gt=0, lt=1, description="Significance level of the one-sided Welch test.")
    min_effect: float = Field(0.2, ge=0, description="Relative slowdown (canary_mean / baseline_mean - 1) that matters.")
    min_samples: int = Field(30, ge=2, description="Latency samples needed on each side before testing.")


class RolloutPolicy(BaseModel):
    """Staged canary rollout with automatic rollback."""

    model_config = ConfigDict(extra="forbid")

    canary: str = Field(min_length=1, description="Variant being rolled out.")
    stages: list[float] = Field(default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0],
                                description="Canary traffic percentages, strictly increasing, in (0, 100].")
    min_requests_per_stage: int = Field(100, ge=0, description="Canary requests needed in a stage before judging it.")
    min_seconds_per_stage: float = Field(60.0, ge=0, description="Time a stage runs at least before judging it.")
    max_error_rate_increase: float = Field(0.02, ge=0, le=1, description="Absolute error-rate excess over baseline that rolls back.")
    latency: LatencyGuard | None = Field(default_factory=LatencyGuard, description="None disables the latency guard.")
    auto_start: bool = Field(True, description="Start at stage 0 on the first tick; otherwise wait for a manual start.")
    rollback_on_open_circuit: bool = Field(True, description="An open canary breaker rolls back at once.")

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages: list[float]) -> list[float]:
        if not stages:
            raise ValueError("stages must list at least one canary percentage")
        bad = [s for s in stages if not 0 < s <= 100]
        if bad:
            raise ValueError(f"stage percentages must be in (0, 100], got {bad}")
        if any(b <= a for a, b in zip(stages, stages[1:])):
            raise ValueError(f"stages must be strictly increasing, got {stages}")
        return stages


class CircuitBreakerConfig(BaseModel):
    """When to stop sending to a variant, and how to probe it back."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the circuit.")
    failure_rate: float | None = Field(None, gt=0, le=1, description="Failure rate in the window that opens it (None: off).")
    window: int = Field(20, ge=1, description="Most recent outcomes the failure rate is measured over.")
    min_requests: int = Field(10, ge=1, description="Outcomes in the window before the failure rate is trusted.")
    cooldown_s: float = Field(30.0, gt=0, description="Time open before probing.")
    half_open_probes: int = Field(1, ge=1, description="Requests let through while half-open.")

    @model_validator(mode="after")
    def _check_window(self) -> CircuitBreakerConfig:
        if self.min_requests > self.window:
            raise ValueError(f"min_requests ({self.min_requests}) cannot exceed window ({self.window})")
        return self


class RouteConfig(BaseModel):
    """A model name clients use (``"chat"``) and the variants behind it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Route (model name) clients ask for.")
    variants: list[VariantConfig] = Field(min_length=1)
    baseline: str | None = Field(None, description="Reference variant for rollouts and fallbacks (default: first).")
    sticky: bool = Field(True, description="Hash a client key so one client stays on one variant.")
    rollout: RolloutPolicy | None = None
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    client_error_codes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLIENT_ERROR_CODES),
                                          description="Error codes blamed on the client, not the variant.")
    sample_window: int = Field(2000, ge=10, description="Latency samples kept per variant and metric.")

    @model_validator(mode="after")
    def _check_variants(self) -> RouteConfig:
        names = [v.name for v in self.variants]
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        if dupes:
            raise ValueError(f"route {self.name!r}: variant names must be unique, duplicated: {dupes}")
        if not any(v.weight > 0 for v in self.variants):
            raise ValueError(f"route {self.name!r}: at least one variant needs a positive weight")
        if self.baseline is None:
            self.baseline = names[0]
        elif self.baseline not in names:
            raise ValueError(f"route {self.name!r}: baseline {self.baseline!r} is not one of its variants {names}")
        if self.rollout is not None:
            if self.rollout.canary not in names:
                raise ValueError(f"route {self.name!r}: rollout canary {self.rollout.canary!r} is not one of its variants {names}")
            if self.rollout.canary == self.baseline:
                raise ValueError(f"route {self.name!r}: rollout canary {self.rollout.canary!r} cannot also be the baseline")
        return self

    def variant(self, name: str) -> VariantConfig | None:
        return next((v for v in self.variants if v.name == name), None)


class RoutingConfig(BaseModel):
    """The whole router ``user_config``: ``{"routes": [...]}``."""

    model_config = ConfigDict(extra="forbid")

    routes: list[RouteConfig] = Field(default_factory=list)

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, routes: list[RouteConfig]) -> list[RouteConfig]:
        dupes = sorted(n for n, c in Counter(r.name for r in routes).items() if c > 1)
        if dupes:
            raise ValueError(f"route names must be unique, duplicated: {dupes}")
        return routes
