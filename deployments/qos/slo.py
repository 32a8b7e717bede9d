"""SLOs of one model: burn rates over two windows (Google SRE style) and the shedding they switch on.

Each request ends up good or bad for each SLO: a latency SLO ("95% of requests at most X") watches
interactive requests (batch ones have no latency promise), an error-rate SLO every answer (a 5xx is
bad), availability every request (a 5xx or a 429 is bad). A burn rate is the share of bad events in a
window over the share the SLO allows (its error budget): 1 spends the budget exactly as fast as the
SLO period allows, 14.4 over an hour spends 2% of a 30-day budget. Counts live in per-second buckets
for the last hour; measurements are the ingress's own (a replica's stream as it arrives).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .config import QosConfig, SloConfig

WINDOWS_S = {"5m": 300, "1h": 3600}
MIN_EVENTS = 20  # fewer requests than this in the short window switch nothing


@dataclass
class _Second:
    at: int
    total: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)


class SloTracker:
    def __init__(self, slo: SloConfig) -> None:
        self.slo = slo
        self.budgets = slo.objectives()  # slo name -> share of requests allowed to be bad
        self._seconds: deque[_Second] = deque()

    def observe(self, *, status: int, interactive: bool, ttft_s: float | None = None, tpot_s: float | None = None,
                now: float | None = None) -> None:
        second = self._second(time.monotonic() if now is None else now)
        outcomes: dict[str, bool] = {}  # slo -> was it bad
        if interactive and status < 400:
            if "ttft" in self.budgets and ttft_s is not None:
                outcomes["ttft"] = ttft_s > self.slo.ttft_p95_s  # type: ignore[operator]
            if "tpot" in self.budgets and tpot_s is not None:
                outcomes["tpot"] = tpot_s > self.slo.tpot_p95_s  # type: ignore[operator]
        if "errors" in self.budgets and status != 429 and not 400 <= status < 500:
            outcomes["errors"] = status >= 500
        if "availability" in self.budgets and not (400 <= status < 500 and status != 429):
            outcomes["availability"] = status >= 500 or status == 429
        for name, bad in outcomes.items():
            second.total[name] = second.total.get(name, 0) + 1
            second.bad[name] = second.bad.get(name, 0) + int(bad)

    def _second(self, now: float) -> _Second:
        at = int(now)
        if not self._seconds or self._seconds[-1].at != at:
            self._seconds.append(_Second(at))
            while self._seconds and self._seconds[0].at <= at - WINDOWS_S["1h"]:
                self._seconds.popleft()
        return self._seconds[-1]

    def counts(self, window_s: int, now: float | None = None) -> dict[str, tuple[int, int]]:
        """slo -> (bad, total) over the last ``window_s`` seconds."""
        start = int(time.monotonic() if now is None else now) - window_s
        out = {name: (0, 0) for name in self.budgets}
        for s in self._seconds:
            if s.at > start:
                for name, total in s.total.items():
                    bad, tot = out[name]
                    out[name] = (bad + s.bad.get(name, 0), tot + total)
        return out

    def burn_rates(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """slo -> {window: burn rate} (0 with no events in the window)."""
        out: dict[str, dict[str, float]] = {name: {} for name in self.budgets}
        for window, seconds in WINDOWS_S.items():
            for name, (bad, total) in self.counts(seconds, now).items():
                out[name][window] = (bad / total) / self.budgets[name] if total else 0.0
        return out

    def met(self, now: float | None = None) -> dict[str, bool]:
        """slo -> whether the last hour stayed within its budget."""
        return {name: rates["1h"] <= 1.0 for name, rates in self.burn_rates(now).items()}


class Shedder:
    """Batch requests get 429 while the model's SLOs burn; hysteresis keeps it from flapping."""

    def __init__(self, qos: QosConfig, tracker: SloTracker) -> None:
        self.enabled = qos.shed_batch_on_burn
        self.on_at = qos.shed_burn_rate
        self.tracker = tracker
        self.shedding = False

    def update(self, now: float | None = None) -> str | None:
        """Re-evaluate; the action taken (``shed_batch_on`` / ``shed_batch_off``) or None."""
        if not self.enabled:
            return None
        rates = self.tracker.burn_rates(now)
        events = sum(total for _, total in self.tracker.counts(WINDOWS_S["5m"], now).values())
        burn = max((r["5m"] for r in rates.values()), default=0.0)
        if not self.shedding and burn >= self.on_at and events >= MIN_EVENTS:
            self.shedding = True
            return "shed_batch_on"
        if self.shedding and burn < self.on_at / 2:
            self.shedding = False
            return "shed_batch_off"
        return None
