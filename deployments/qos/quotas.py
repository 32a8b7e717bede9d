"""Per-key limits: requests and tokens per minute, requests at once; OpenAI's ``x-ratelimit-*`` headers.

Requests are counted when they start, tokens when they end (prompt plus completion: a request's cost is
known only then), so a key can overdraw its token budget once and then waits until it refills. Both
are token buckets that refill continuously, as OpenAI's limits do. Each ingress replica keeps its own
counts (docs/qos.md: with N ingress replicas a key can use up to N times its limits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from engine.errors import OverCapacityError

from .config import KeyPolicy


class RateLimitError(OverCapacityError):
    """429 for a key over its limits, with the ``x-ratelimit-*`` headers to send."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.headers = headers


@dataclass
class Bucket:
    """``capacity`` per minute, refilled continuously; ``level`` may go below zero (tokens overdrawn)."""

    capacity: float
    level: float = field(init=False)
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60.0)
        self.at = now
        return self.level

    def seconds_until(self, amount: float, now: float) -> float:
        missing = amount - self.refill(now)
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``20ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class KeyLimiter:
    """One key's limits in this ingress."""

    def __init__(self, policy: KeyPolicy) -> None:
        self.policy = policy
        self.requests = Bucket(policy.requests_per_minute) if policy.requests_per_minute else None
        self.tokens = Bucket(policy.tokens_per_minute) if policy.tokens_per_minute else None
        self.inflight = 0

    def admit(self) -> dict[str, str]:
        """Take one request (429 with ``Retry-After`` and the headers when over a limit); the headers."""
        now = time.monotonic()
        waits = []
        if self.requests is not None:
            waits.append(self.requests.seconds_until(1.0, now))
        if self.tokens is not None:
            waits.append(self.tokens.seconds_until(0.0, now))  # overdrawn: wait until back at zero
        wait = max(waits, default=0.0)
        busy = self.policy.max_concurrent is not None and self.inflight >= self.policy.max_concurrent
        if wait > 0 or busy:
            what = "concurrency limit" if busy and wait <= 0 else "rate limit"
            raise RateLimitError(f"API key {self.policy.name!r} is over its {what}; retry later",
                                 retry_after=max(wait, 1.0), headers=self.headers(now))
        if self.requests is not None:
            self.requests.level -= 1.0
        self.inflight += 1
        return self.headers(now)

    def done(self, tokens: int) -> None:
        self.inflight -= 1
        if self.tokens is not None:
            self.tokens.refill(time.monotonic())
            self.tokens.level -= tokens

    def headers(self, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            level = bucket.refill(now)
            out[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(level)))
            out[f"x-ratelimit-reset-{kind}"] = _duration((bucket.capacity - level) * 60.0 / bucket.capacity)
        return out


class Quotas:
    """The limiters of every key with a policy (keys without one have no limits)."""

    def __init__(self, policies: list[KeyPolicy]) -> None:
        self.limiters = {p.key: KeyLimiter(p) for p in policies}

    def for_key(self, key_hash: str | None) -> KeyLimiter | None:
        return self.limiters.get(key_hash) if key_hash else None

    def carry_over(self, old: Quotas) -> None:
        """Keys kept across a reconfigure keep their counts (a key rotation must not reset limits)."""
        for key, limiter in self.limiters.items():
            before = old.limiters.get(key)
            if before is not None and before.policy == limiter.policy:
                self.limiters[key] = before
