"""Per-variant statistics: summaries, bounded memory, error classification, stage reset."""

from __future__ import annotations

import random

import numpy as np
import pytest

from deployments.routing import LatencySamples, Outcome, VariantStats


def test_summary_matches_numpy() -> None:
    rng = random.Random(3)
    values = [rng.expovariate(2.0) for _ in range(1500)]
    s = LatencySamples(maxlen=2000)
    for v in values:
        s.add(v)
    summary = s.summary()
    assert summary["count"] == 1500
    assert summary["mean"] == pytest.approx(float(np.mean(values)))
    for q in (50, 95, 99):
        assert summary[f"p{q}"] == pytest.approx(float(np.percentile(values, q)))


def test_memory_is_bounded_but_totals_are_exact() -> None:
    s = LatencySamples(maxlen=100)
    for v in range(1000):
        s.add(float(v))
    assert len(s.recent) == 100 and s.values()[0] == 900.0
    assert s.count == 1000 and s.mean == pytest.approx(499.5)
    assert s.summary()["p50"] == pytest.approx(949.5)  # percentiles describe the recent window
    s.resize(10)
    assert s.values() == [float(v) for v in range(990, 1000)]


def test_errors_by_code_and_latency_only_from_successes() -> None:
    st = VariantStats(maxlen=50)
    st.record(Outcome(ok=True, ttft_s=0.1, tpot_s=0.01, e2e_s=1.0))
    st.record(Outcome(ok=False, code="engine_failure", e2e_s=0.001))
    st.record(Outcome(ok=False, code="invalid_request"), failure=False)
    st.record(Outcome(ok=False))
    st.record(Outcome(ok=True, ttft_s=float("nan"), e2e_s=-1.0))  # garbage latencies are not samples
    w = st.total
    # the client error is counted but not judged: 2 failures out of the 4 requests that say something
    assert w.requests == 5 and w.failures == 2 and w.client_errors == 1 and w.judged == 4
    assert w.error_rate == pytest.approx(0.5)
    assert st.summary()["total"]["client_errors"] == 1 and st.summary()["total"]["judged"] == 4
    assert w.errors_by_code == {"engine_failure": 1, "invalid_request": 1, "unknown": 1}
    assert w.latency["e2e"].values() == [1.0] and w.latency["ttft"].count == 1


def test_reset_stage_keeps_total() -> None:
    st = VariantStats()
    for _ in range(10):
        st.record(Outcome(e2e_s=1.0))
    st.reset_stage()
    st.record(Outcome(e2e_s=2.0))
    assert st.stage.requests == 1 and st.stage.latency["e2e"].values() == [2.0]
    assert st.total.requests == 11
    summary = st.summary()
    assert summary["stage"]["latency"]["e2e"]["mean"] == 2.0
    assert summary["total"]["latency"]["tpot"] == {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
