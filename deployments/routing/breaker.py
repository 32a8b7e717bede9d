"""Per-variant circuit breaker: stop sending traffic to a failing variant, then probe it back.

closed --(consecutive failures or failure rate)--> open --(cooldown_s)--> half_open
half_open --(probe success)--> closed;  half_open --(probe failure)--> open

Time only moves through ``poll(now)`` (the clock is injectable), and every transition is returned
as a ``BreakerEvent`` so the caller can log and count it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from .config import CircuitBreakerConfig


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerEvent:
    at: float
    name: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "breaker", **asdict(self), "from_state": str(self.from_state), "to_state": str(self.to_state)}


class CircuitBreaker:
    """Breaker for one variant. Outcomes arriving while open (requests sent before it opened) are ignored.

    While half-open any outcome is taken as the probe's: requests carry no token, and a success or
    failure of the variant at that moment is the evidence wanted anyway.
    """

    def __init__(self, config: CircuitBreakerConfig | None = None, name: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or CircuitBreakerConfig()
        self.name = name
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._window: deque[bool] = deque(maxlen=self.config.window)  # True = failure
        self._half_open_since: float | None = None
        self._probes = 0

    def configure(self, config: CircuitBreakerConfig) -> None:
        """Take new thresholds and keep the current state (a config push must not reset an open circuit)."""
        self.config = config
        self._window = deque(self._window, maxlen=config.window)

    def available(self) -> bool:
        """Whether a request may be sent now (call ``poll`` first so cooldowns have elapsed)."""
        if not self.config.enabled or self.state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.HALF_OPEN and self._probes < self.config.half_open_probes

    def acquire(self) -> bool:
        """Admit one request; while half-open it uses one probe slot."""
        if not self.available():
            return False
        if self.config.enabled and self.state is BreakerState.HALF_OPEN:
            self._probes += 1
        return True

    def retry_after(self, now: float | None = None) -> float | None:
        """Seconds until an open circuit half-opens; None when not open."""
        if self.state is not BreakerState.OPEN or self.opened_at is None:
            return None
        now = self._clock() if now is None else now
        return max(0.0, self.opened_at + self.config.cooldown_s - now)

    def poll(self, now: float | None = None) -> list[BreakerEvent]:
        """Apply time: open -> half_open after the cooldown; renew probe slots whose results never came."""
        now = self._clock() if now is None else now
        if self.state is BreakerState.OPEN and self.opened_at is not None \
                and now - self.opened_at >= self.config.cooldown_s:
            self._half_open_since = now
            self._probes = 0
            return [self._move(BreakerState.HALF_OPEN, now, f"cooldown of {self.config.cooldown_s:g}s elapsed")]
        if self.state is BreakerState.HALF_OPEN and self._half_open_since is not None \
                and self._probes >= self.config.half_open_probes \
                and now - self._half_open_since >= self.config.cooldown_s:
            self._half_open_since = now  # probes lost (cancelled, replica gone): let new ones through
            self._probes = 0
        return []

    def record_success(self, now: float | None = None) -> list[BreakerEvent]:
        now = self._clock() if now is None else now
        if not self.config.enabled:
            return []
        if self.state is BreakerState.HALF_OPEN:
            self._reset_counts()
            return [self._move(BreakerState.CLOSED, now, "probe succeeded")]
        if self.state is BreakerState.CLOSED:
            self.consecutive_failures = 0
            self._window.append(False)
        return []

    def record_neutral(self) -> None:
        """An outcome that says nothing about the variant (a client's 4xx, a 429 at capacity).

        It neither breaks a run of failures nor extends one, and stays out of the failure-rate
        window. While half-open it hands its probe slot back, so the next request probes instead of
        the circuit waiting a whole cooldown for evidence that never came.
        """
        if self.config.enabled and self.state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def record_failure(self, now: float | None = None) -> list[BreakerEvent]:
        now = self._clock() if now is None else now
        if not self.config.enabled:
            return []
        if self.state is BreakerState.HALF_OPEN:
            return [self._open(now, "probe failed")]
        if self.state is BreakerState.OPEN:
            return []
        self.consecutive_failures += 1
        self._window.append(True)
        cfg = self.config
        if self.consecutive_failures >= cfg.failure_threshold:
            return [self._open(now, f"{self.consecutive_failures} consecutive failures")]
        if cfg.failure_rate is not None and len(self._window) >= cfg.min_requests:
            rate = sum(self._window) / len(self._window)
            if rate >= cfg.failure_rate:
                return [self._open(now, f"failure rate {rate:.2f} over the last {len(self._window)} requests")]
        return []

    def restore_open(self, retry_after_s: float, now: float | None = None) -> None:
        """Open the circuit as a previous router process left it, half-opening ``retry_after_s`` from
        now (capped at the cooldown); no event: nothing changed, the state came back."""
        now = self._clock() if now is None else now
        left = min(max(retry_after_s, 0.0), self.config.cooldown_s)
        self.state = BreakerState.OPEN
        self.opened_at = now - (self.config.cooldown_s - left)
        self._half_open_since = None
        self._reset_counts()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        return {"state": str(self.state), "consecutive_failures": self.consecutive_failures,
                "retry_after_s": self.retry_after(now), "probes_in_flight": self._probes}

    def _open(self, now: float, reason: str) -> BreakerEvent:
        self.opened_at = now
        self._half_open_since = None
        self._reset_counts()
        return self._move(BreakerState.OPEN, now, reason)

    def _reset_counts(self) -> None:
        self.consecutive_failures = 0
        self._window.clear()
        self._probes = 0

    def _move(self, to: BreakerState, now: float, reason: str) -> BreakerEvent:
        event = BreakerEvent(now, self.name, self.state, to, reason)
        self.state = to
        return event
