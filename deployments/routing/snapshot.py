"""What of a route's routing state outlives the router process, as a pydantic model that round-trips
through JSON.

Kept: the rollout (state, stage, decision history, last Welch test) and circuits that are open, so a
restarted router neither sends traffic to a canary it rolled back nor to a variant it cut off.
Not kept: statistics (sample windows are evidence for the stage in progress; a restored running stage
starts its window over) and closed circuits' failure counts.

Times inside the router are ``time.monotonic`` readings, meaningless in another process or on another
host, so a snapshot stores wall-clock times and durations and ``Clocks`` converts both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .breaker import BreakerState, CircuitBreaker
from .config import RolloutPolicy
from .rollout import Action, RolloutController, RolloutDecision, RolloutState

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Clocks:
    """One simultaneous reading of the monotonic and the wall clock, to convert times between them."""

    mono: float
    wall: float

    def to_wall(self, t: float) -> float:
        return self.wall - (self.mono - t)

    def to_mono(self, w: float) -> float:
        return self.mono - (self.wall - w)


class DecisionRecord(BaseModel):
    """A ``RolloutDecision`` with its time on the wall clock (epoch seconds)."""

    model_config = ConfigDict(extra="forbid")

    at: float
    action: Action
    state: RolloutState
    stage_index: int
    canary_percent: float
    reason: str
    metric: str | None = None
    statistic: float | None = None
    df: float | None = None
    p_value: float | None = None
    effect: float | None = None
    canary_error_rate: float | None = None
    baseline_error_rate: float | None = None

    @classmethod
    def of(cls, d: RolloutDecision, clocks: Clocks) -> DecisionRecord:
        fields = {k: v for k, v in d.to_dict().items() if k != "kind"}  # non-finite floats become None
        return cls.model_validate({**fields, "at": clocks.to_wall(d.at)})

    def decision(self, clocks: Clocks) -> RolloutDecision:
        return RolloutDecision(**{**self.model_dump(), "at": clocks.to_mono(self.at)})


class RolloutSnapshot(BaseModel):
    """A rollout's state and the identity of what it judged (a different canary deployment is a new rollout)."""

    model_config = ConfigDict(extra="forbid")

    canary: str
    canary_deployment: str
    baseline: str
    state: RolloutState
    stage_index: int = Field(ge=0)
    stages: list[float]  # informational: a config push may change them and the stage index is clamped
    history: list[DecisionRecord] = Field(default_factory=list)
    last_test: DecisionRecord | None = None

    @classmethod
    def of(cls, ro: RolloutController, canary_deployment: str, clocks: Clocks) -> RolloutSnapshot:
        return cls(canary=ro.canary, canary_deployment=canary_deployment, baseline=ro.baseline, state=ro.state,
                   stage_index=ro.stage_index, stages=list(ro.policy.stages),
                   history=[DecisionRecord.of(d, clocks) for d in ro.history],
                   last_test=DecisionRecord.of(ro.last_test, clocks) if ro.last_test else None)

    def mismatch(self, policy: RolloutPolicy, baseline: str, canary_deployment: str) -> str | None:
        """Why this saved state does not belong to the configured rollout, or None when it does (the
        same rule that decides whether a config push keeps a rollout in memory)."""
        if self.canary != policy.canary:
            return f"canary changed from {self.canary!r} to {policy.canary!r}"
        if self.canary_deployment != canary_deployment:
            return f"canary deployment changed from {self.canary_deployment!r} to {canary_deployment!r}"
        if self.baseline != baseline:
            return f"baseline changed from {self.baseline!r} to {baseline!r}"
        return None

    def restore_into(self, ro: RolloutController, clocks: Clocks) -> None:
        ro.restore(self.state, self.stage_index, [d.decision(clocks) for d in self.history],
                   self.last_test.decision(clocks) if self.last_test else None, now=clocks.mono)


class BreakerSnapshot(BaseModel):
    """A circuit that was not closed when saved, and the cooldown it had left."""

    model_config = ConfigDict(extra="forbid")

    deployment: str
    state: BreakerState
    retry_after_s: float = Field(0.0, ge=0)

    @classmethod
    def of(cls, breaker: CircuitBreaker, deployment: str, clocks: Clocks) -> BreakerSnapshot:
        return cls(deployment=deployment, state=breaker.state, retry_after_s=breaker.retry_after(clocks.mono) or 0.0)

    def restore_into(self, breaker: CircuitBreaker, saved_at: float, clocks: Clocks) -> None:
        """Open it again for what is left of its cooldown (a half-open one probes again at once)."""
        left = self.retry_after_s - max(0.0, clocks.wall - saved_at) if self.state is BreakerState.OPEN else 0.0
        breaker.restore_open(max(0.0, left), now=clocks.mono)


class RouteSnapshot(BaseModel):
    """Everything persisted for one route; ``version`` changes when this format does."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = SNAPSHOT_VERSION
    route: str
    saved_at: float  # wall clock
    rollout: RolloutSnapshot | None = None
    breakers: dict[str, BreakerSnapshot] = Field(default_factory=dict)  # by variant name; closed ones left out
