"""Staged canary rollout: a per-route state machine that advances, promotes or rolls back.

pending --start--> running --(guards pass at the last stage)--> promoted
running --(error or latency regression, open canary circuit, manual)--> rolled_back
running <--pause/resume--> paused;  set_stage(i) (re)enters running at stage i from any state.

A stage is judged once it has ``min_requests_per_stage`` canary requests *and* ``min_seconds_per_stage``
of time, so a rollout never advances on too little evidence. Only judged requests count (successes and
the variant's own failures): a 429 or a client's 4xx says nothing about the canary, so it neither
fills a stage nor raises the error rate. The controller owns no statistics: the
router passes the canary's and baseline's ``VariantStats`` in and resets their stage windows when a
decision says the stage changed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal

from .config import RolloutPolicy
from .errors import InvalidTransitionError
from .stats import VariantStats
from .welch import welch_t_test


class RolloutState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


Action = Literal["start", "wait", "advance", "promote", "rollback", "pause", "resume", "set_stage"]
_STAGE_CHANGES = frozenset({"start", "advance", "set_stage"})


@dataclass(frozen=True)
class RolloutDecision:
    """One judgement or command, with the evidence behind it."""

    at: float
    action: Action
    state: RolloutState  # state after the decision
    stage_index: int
    canary_percent: float
    reason: str
    metric: str | None = None
    statistic: float | None = None  # Welch t (canary minus baseline)
    df: float | None = None
    p_value: float | None = None
    effect: float | None = None  # canary_mean / baseline_mean - 1
    canary_error_rate: float | None = None
    baseline_error_rate: float | None = None

    @property
    def changes_stage(self) -> bool:
        """The stage window restarts: the router must reset stage statistics."""
        return self.action in _STAGE_CHANGES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return {"kind": "rollout", **{k: _finite(v) for k, v in d.items()}}


def _finite(v: Any) -> Any:
    """JSON has no NaN/inf: report them as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RolloutController:
    """Rollout state for one route; ``evaluate`` is called from the router's periodic tick."""

    def __init__(self, policy: RolloutPolicy, baseline: str, clock: Callable[[], float] = time.monotonic,
                 history: int = 100) -> None:
        self.policy = policy
        self.baseline = baseline
        self._clock = clock
        self.state = RolloutState.PENDING
        self.stage_index = 0
        self.stage_started_at: float | None = None
        self.last_decision: RolloutDecision | None = None  # including waits
        self.last_test: RolloutDecision | None = None  # the last one that ran the Welch test
        self.history: deque[RolloutDecision] = deque(maxlen=history)

    @property
    def canary(self) -> str:
        return self.policy.canary

    @property
    def canary_percent(self) -> float:
        if self.state in (RolloutState.PENDING, RolloutState.ROLLED_BACK):
            return 0.0
        if self.state is RolloutState.PROMOTED:
            return 100.0
        return float(self.policy.stages[self.stage_index])

    def _baseline_idle(self) -> bool:
        """The stage sends the baseline no traffic (canary at 100%)."""
        return self.canary_percent >= 100.0

    def configure(self, policy: RolloutPolicy, baseline: str) -> None:
        """New thresholds or stages; keeps the state (a config push must not restart a rollout)."""
        self.policy = policy
        self.baseline = baseline
        self.stage_index = min(self.stage_index, len(policy.stages) - 1)

    def weights(self, configured: Mapping[str, float]) -> dict[str, float]:
        """Effective weights in configured order: the canary gets the stage percentage, the other
        variants share the rest in proportion to their configured weights (all to the baseline if
        those are all zero)."""
        pct = self.canary_percent
        others = {n: max(w, 0.0) for n, w in configured.items() if n != self.canary}
        share = sum(others.values())
        if share <= 0:
            others = {n: (1.0 if n == self.baseline else 0.0) for n in others}
            share = 1.0
        return {n: pct if n == self.canary else (100.0 - pct) * others[n] / share for n in configured}

    # -- automatic judgement ------------------------------------------------------------------------

    def evaluate(self, canary: VariantStats, baseline: VariantStats, now: float | None = None,
                 canary_circuit_open: bool = False) -> RolloutDecision | None:
        """Judge the current stage; None when there is nothing to judge (not running)."""
        now = self._clock() if now is None else now
        if self.state is RolloutState.PENDING:
            return self.start(now, "auto start") if self.policy.auto_start else None
        if self.state is not RolloutState.RUNNING:
            return None
        p = self.policy
        if canary_circuit_open and p.rollback_on_open_circuit:
            return self._decide(now, "rollback", RolloutState.ROLLED_BACK, "canary circuit breaker opened")
        cw = canary.stage
        elapsed = now - (self.stage_started_at if self.stage_started_at is not None else now)
        if cw.judged < p.min_requests_per_stage or elapsed < p.min_seconds_per_stage:
            # client errors (4xx, 429) are no evidence either way: they neither fill a stage nor fail it
            ignored = f" ({cw.client_errors} client errors not counted)" if cw.client_errors else ""
            return self._decide(now, "wait", self.state,
                                f"collecting: {cw.judged}/{p.min_requests_per_stage} canary requests{ignored}, "
                                f"{elapsed:.0f}/{p.min_seconds_per_stage:.0f}s in stage")
        bw = baseline.stage if baseline.stage.judged > 0 else baseline.total
        c_err, b_err = cw.error_rate, bw.error_rate
        rates = {"canary_error_rate": c_err, "baseline_error_rate": b_err}
        if c_err - b_err > p.max_error_rate_increase:
            return self._decide(now, "rollback", RolloutState.ROLLED_BACK,
                                f"canary error rate {c_err:.3f} exceeds baseline {b_err:.3f} by more than "
                                f"{p.max_error_rate_increase:g}", **rates)
        test: dict[str, Any] = {}
        g = p.latency
        concurrent = not self._baseline_idle()
        if g is not None and concurrent:
            c_samples = cw.latency[g.metric].values()
            b_samples = baseline.stage.latency[g.metric].values()
            if len(c_samples) < g.min_samples or len(b_samples) < g.min_samples:
                return self._decide(now, "wait", self.state,
                                    f"collecting: {len(c_samples)}/{len(b_samples)} {g.metric} samples "
                                    f"(canary/baseline), need {g.min_samples}", **rates)
            res = welch_t_test(c_samples, b_samples, "greater")
            effect = res.mean_a / res.mean_b - 1.0 if res.mean_b > 0 else (math.inf if res.mean_a > 0 else 0.0)
            test = {"metric": g.metric, "statistic": res.statistic, "df": res.df, "p_value": res.p_value,
                    "effect": effect}
            if res.p_value < g.alpha and effect >= g.min_effect:
                return self._decide(now, "rollback", RolloutState.ROLLED_BACK,
                                    f"canary {g.metric} {100 * effect:.1f}% slower than baseline "
                                    f"(p={res.p_value:.2g} < {g.alpha:g}, effect >= {100 * g.min_effect:.0f}%)",
                                    **rates, **test)
        # With the canary at 100% the baseline serves nothing in this stage, and its earlier samples
        # were taken while it carried part of the load only: a canary carrying all of it would look
        # slower for that alone. Latency is judged at the stages where both serve at once.
        skipped = " (latency not compared: the baseline serves nothing at this stage)" if g and not concurrent else ""
        if self.stage_index + 1 < len(p.stages):
            self.stage_index += 1
            self.stage_started_at = now
            return self._decide(now, "advance", RolloutState.RUNNING,
                                f"guards passed: advancing to {p.stages[self.stage_index]:g}%{skipped}", **rates, **test)
        return self._decide(now, "promote", RolloutState.PROMOTED, f"guards passed at the last stage{skipped}",
                            **rates, **test)

    # -- manual commands ----------------------------------------------------------------------------

    def start(self, now: float | None = None, reason: str = "manual start") -> RolloutDecision:
        if self.state is not RolloutState.PENDING:
            raise InvalidTransitionError(f"cannot start a rollout that is {self.state}")
        return self._enter_stage(0, "start", reason, now)

    def set_stage(self, index: int, now: float | None = None, reason: str = "manual") -> RolloutDecision:
        if not 0 <= index < len(self.policy.stages):
            raise InvalidTransitionError(f"stage {index} out of range 0..{len(self.policy.stages) - 1}")
        return self._enter_stage(index, "set_stage", reason, now)

    def promote(self, reason: str = "manual", now: float | None = None) -> RolloutDecision:
        return self._decide(self._now(now), "promote", RolloutState.PROMOTED, reason)

    def rollback(self, reason: str = "manual", now: float | None = None) -> RolloutDecision:
        return self._decide(self._now(now), "rollback", RolloutState.ROLLED_BACK, reason)

    def pause(self, reason: str = "manual", now: float | None = None) -> RolloutDecision:
        if self.state is not RolloutState.RUNNING:
            raise InvalidTransitionError(f"cannot pause a rollout that is {self.state}")
        return self._decide(self._now(now), "pause", RolloutState.PAUSED, reason)

    def resume(self, reason: str = "manual", now: float | None = None) -> RolloutDecision:
        if self.state is not RolloutState.PAUSED:
            raise InvalidTransitionError(f"cannot resume a rollout that is {self.state}")
        return self._decide(self._now(now), "resume", RolloutState.RUNNING, reason)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = self._now(now)
        return {
            "canary": self.canary,
            "baseline": self.baseline,
            "state": str(self.state),
            "stage_index": self.stage_index,
            "stages": list(self.policy.stages),
            "canary_percent": self.canary_percent,
            "stage_age_s": None if self.stage_started_at is None else now - self.stage_started_at,
            "last_decision": self.last_decision.to_dict() if self.last_decision else None,
            "last_test": self.last_test.to_dict() if self.last_test else None,
            "history": [d.to_dict() for d in self.history],
        }

    def restore(self, state: RolloutState, stage_index: int, history: Iterable[RolloutDecision],
                last_test: RolloutDecision | None, now: float | None = None) -> None:
        """Take back a state saved by an earlier router process (``routing.snapshot``). A stage that
        had started starts its window over: the statistics it was collecting did not survive."""
        now = self._now(now)
        self.state = state
        self.stage_index = min(stage_index, len(self.policy.stages) - 1)
        self.stage_started_at = None if state is RolloutState.PENDING else now
        self.history = deque(history, maxlen=self.history.maxlen)
        self.last_test = last_test
        self.last_decision = self.history[-1] if self.history else None

    # -- internals ----------------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _enter_stage(self, index: int, action: Action, reason: str, now: float | None) -> RolloutDecision:
        now = self._now(now)
        self.stage_index = index
        self.stage_started_at = now
        return self._decide(now, action, RolloutState.RUNNING,
                            f"{reason}: stage {index} ({self.policy.stages[index]:g}%)")

    def _decide(self, now: float, action: Action, state: RolloutState, reason: str, **evidence: Any) -> RolloutDecision:
        self.state = state
        decision = RolloutDecision(now, action, state, self.stage_index, self.canary_percent, reason, **evidence)
        self.last_decision = decision
        if decision.p_value is not None:
            self.last_test = decision
        if action != "wait":
            self.history.append(decision)
        return decision
