"""Per-variant request statistics in bounded memory.

Counts and means are exact running totals; percentiles and the Welch test use the most recent
``maxlen`` samples (a sliding window), which keeps memory fixed and makes a rollout judge how a
variant behaves now rather than an hour ago.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from .config import LatencyMetric

METRICS: tuple[LatencyMetric, ...] = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class Outcome:
    """What happened to one routed request. Latencies are seconds; ``None`` when not measured."""

    ok: bool = True
    code: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    client_error: bool = False  # caused by the client (a 4xx, 429 included) or by load: not the variant's fault

    def latency(self, metric: LatencyMetric) -> float | None:
        return {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2e": self.e2e_s}[metric]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class LatencySamples:
    """Running count/mean of every sample plus the last ``maxlen`` samples."""

    def __init__(self, maxlen: int = 2000) -> None:
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=maxlen)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.recent.append(value)

    def resize(self, maxlen: int) -> None:
        self.recent = deque(self.recent, maxlen=maxlen)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def values(self) -> list[float]:
        return list(self.recent)

    def summary(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
        s = sorted(self.recent)
        return {"count": self.count, "mean": self.mean, "p50": percentile(s, 50),
                "p95": percentile(s, 95), "p99": percentile(s, 99)}


class StatsWindow:
    """Counts and latency samples over one period (a rollout stage, or since the variant appeared)."""

    def __init__(self, maxlen: int = 2000) -> None:
        self.maxlen = maxlen
        self.requests = 0  # every outcome, client errors included
        self.failures = 0  # errors the variant is to blame for
        self.client_errors = 0  # errors it is not (client 4xx, 429 at capacity): counted, never judged
        self.errors_by_code: dict[str, int] = {}
        self.latency: dict[LatencyMetric, LatencySamples] = {m: LatencySamples(maxlen) for m in METRICS}

    def record(self, outcome: Outcome, failure: bool | None = None) -> None:
        """Count one request; ``failure`` (default: not ok) says whether it counts against the variant.
        A failed request that is not a failure is a client error: it is left out of ``judged`` and so
        of the error rate, where it would otherwise dilute the variant's real failures."""
        self.requests += 1
        if (not outcome.ok) if failure is None else failure:
            self.failures += 1
        elif not outcome.ok:
            self.client_errors += 1
        if not outcome.ok:
            code = outcome.code or "unknown"
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
            return  # a failed request's latency is the failure's, not the model's: keep it out of the samples
        lat = self.latency
        for m, v in (("ttft", outcome.ttft_s), ("tpot", outcome.tpot_s), ("e2e", outcome.e2e_s)):
            if v is not None and 0 <= v < math.inf:  # drops NaN, negatives and inf
                lat[m].add(v)  # type: ignore[index]

    def resize(self, maxlen: int) -> None:
        self.maxlen = maxlen
        for samples in self.latency.values():
            samples.resize(maxlen)

    @property
    def judged(self) -> int:
        """Requests that say something about the variant: successes and its own failures."""
        return self.requests - self.client_errors

    @property
    def error_rate(self) -> float:
        """Failures among judged requests (client errors are in neither side of the ratio)."""
        return self.failures / self.judged if self.judged else 0.0

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "judged": self.judged, "failures": self.failures,
                "client_errors": self.client_errors, "error_rate": self.error_rate,
                "errors_by_code": dict(self.errors_by_code),
                "latency": {m: self.latency[m].summary() for m in METRICS}}


class VariantStats:
    """A ``stage`` window, reset when a rollout stage changes, and a ``total`` window that never is."""

    def __init__(self, maxlen: int = 2000) -> None:
        self.maxlen = maxlen
        self.stage = StatsWindow(maxlen)
        self.total = StatsWindow(maxlen)

    def record(self, outcome: Outcome, failure: bool | None = None) -> None:
        self.stage.record(outcome, failure)
        self.total.record(outcome, failure)

    def resize(self, maxlen: int) -> None:
        """Apply a new ``sample_window`` without losing the samples that still fit."""
        self.maxlen = maxlen
        self.stage.resize(maxlen)
        self.total.resize(maxlen)

    def reset_stage(self) -> None:
        self.stage = StatsWindow(self.maxlen)

    def summary(self) -> dict[str, Any]:
        return {"stage": self.stage.summary(), "total": self.total.summary()}
