"""Circuit breaker state machine with an injected clock."""

from __future__ import annotations

from deployments.routing import BreakerState, CircuitBreaker, CircuitBreakerConfig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_open_half_open_close_and_reopen() -> None:
    clock = Clock()
    b = CircuitBreaker(CircuitBreakerConfig(failure_threshold=3, cooldown_s=10, half_open_probes=1), "canary", clock)
    assert b.record_failure() == [] and b.record_failure() == []
    b.record_success()  # breaks the run of consecutive failures
    assert b.record_failure() == [] and b.record_failure() == []
    [opened] = b.record_failure()
    assert (opened.from_state, opened.to_state, opened.name) == (BreakerState.CLOSED, BreakerState.OPEN, "canary")
    assert "3 consecutive failures" in opened.reason
    assert not b.available() and b.retry_after() == 10.0

    clock.t += 9.9
    assert b.poll() == [] and not b.available()
    clock.t += 0.1
    [half] = b.poll()
    assert half.to_state is BreakerState.HALF_OPEN and b.available()
    assert b.acquire() and not b.available() and not b.acquire()  # one probe only

    [reopened] = b.record_failure()
    assert (reopened.from_state, reopened.to_state, reopened.reason) == (BreakerState.HALF_OPEN, BreakerState.OPEN, "probe failed")
    assert reopened.at == clock.t and b.retry_after() == 10.0

    clock.t += 10
    assert [e.to_state for e in b.poll()] == [BreakerState.HALF_OPEN]
    assert b.acquire()
    [closed] = b.record_success()
    assert (closed.to_state, closed.reason) == (BreakerState.CLOSED, "probe succeeded")
    assert b.available() and b.consecutive_failures == 0
    assert closed.to_dict()["to_state"] == "closed"


def test_failure_rate_in_window() -> None:
    b = CircuitBreaker(CircuitBreakerConfig(failure_threshold=100, failure_rate=0.5, window=10, min_requests=10),
                       clock=Clock())
    for i in range(9):
        assert (b.record_failure() if i % 2 else b.record_success()) == []
    [event] = b.record_failure()  # 5 failures in 10
    assert event.to_state is BreakerState.OPEN and "failure rate 0.50" in event.reason


def test_outcomes_while_open_are_ignored_and_lost_probes_are_renewed() -> None:
    clock = Clock()
    b = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, cooldown_s=5, half_open_probes=2), clock=clock)
    b.record_failure()
    assert b.record_success() == [] and b.record_failure() == [] and b.state is BreakerState.OPEN
    clock.t += 5
    b.poll()
    assert b.acquire() and b.acquire() and not b.acquire()
    clock.t += 5  # neither probe ever reported back
    assert b.poll() == [] and b.state is BreakerState.HALF_OPEN and b.acquire()


def test_disabled_and_reconfigured() -> None:
    off = CircuitBreaker(CircuitBreakerConfig(enabled=False, failure_threshold=1), clock=Clock())
    assert off.record_failure() == [] and off.available()
    b = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, cooldown_s=60), clock=Clock())
    b.record_failure()
    b.configure(CircuitBreakerConfig(failure_threshold=5, cooldown_s=1))
    assert b.state is BreakerState.OPEN  # a config push does not close an open circuit
    assert b.retry_after() == 1.0
