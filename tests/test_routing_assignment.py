"""Variant assignment: proportions, stickiness, minimal movement, exclusion, forcing."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from scipy import stats

from deployments.routing import N_BUCKETS, allocate, assign, bucket_of

KEYS = [f"user-{i}" for i in range(1000)]


def test_weighted_split_matches_weights_chi_square() -> None:
    weights = {"a": 70.0, "b": 20.0, "c": 10.0}
    rng = random.Random(1234)
    n = 6000
    counts = dict.fromkeys(weights, 0)
    for _ in range(n):
        a = assign(weights, rng=rng)
        assert a is not None and a.reason == "weighted"
        counts[a.variant] += 1
    total = sum(weights.values())
    chi2 = sum((counts[k] - n * w / total) ** 2 / (n * w / total) for k, w in weights.items())
    assert chi2 < stats.chi2.ppf(0.999, df=len(weights) - 1), counts


def test_sticky_split_matches_weights() -> None:
    weights = {"a": 70.0, "b": 30.0}
    share_a = sum(assign(weights, key=k, salt="chat").variant == "a" for k in KEYS) / len(KEYS)  # type: ignore[union-attr]
    assert abs(share_a - 0.7) < 0.05


def test_same_key_same_variant() -> None:
    weights = {"a": 50.0, "b": 30.0, "c": 20.0}
    first = {k: assign(weights, key=k, salt="chat").variant for k in KEYS}  # type: ignore[union-attr]
    again = {k: assign(weights, key=k, salt="chat", rng=random.Random(99)).variant for k in reversed(KEYS)}  # type: ignore[union-attr]
    assert first == again
    assert set(first.values()) == {"a", "b", "c"}


def test_buckets_are_stable_across_processes() -> None:
    """Python's hash() is salted per process; the bucket hash must not be."""
    code = "from deployments.routing import bucket_of; print([bucket_of(f'user-{i}', 'chat') for i in range(50)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str([bucket_of(f"user-{i}", "chat") for i in range(50)])


def test_allocate_contiguous_ranges() -> None:
    ranges = allocate({"stable": 95, "zero": 0, "canary": 5})
    assert ranges == [("stable", 0, 9500), ("zero", 9500, 9500), ("canary", 9500, N_BUCKETS)]
    assert allocate({"a": 0.0}) == []


def test_weight_change_moves_only_the_shifted_share() -> None:
    keys = [f"user-{i}" for i in range(10_000)]
    before = {k: assign({"stable": 95, "canary": 5}, key=k, salt="chat").variant for k in keys}  # type: ignore[union-attr]
    after = {k: assign({"stable": 90, "canary": 10}, key=k, salt="chat").variant for k in keys}  # type: ignore[union-attr]
    movers = [k for k in keys if before[k] != after[k]]
    assert 0.04 < len(movers) / len(keys) < 0.06
    assert all(before[k] == "stable" and after[k] == "canary" for k in movers)


def test_excluded_variant_does_not_move_healthy_keys() -> None:
    weights = {"a": 50.0, "b": 30.0, "c": 20.0}
    before = {k: assign(weights, key=k, salt="chat") for k in KEYS}
    after = {k: assign(weights, eligible=["a", "b"], key=k, salt="chat") for k in KEYS}
    displaced = [k for k in KEYS if before[k].variant == "c"]  # type: ignore[union-attr]
    for k in KEYS:
        if before[k].variant != "c":  # type: ignore[union-attr]
            assert after[k].variant == before[k].variant and after[k].reason == "sticky"  # type: ignore[union-attr]
    assert all(after[k].reason == "sticky-rehashed" for k in displaced)  # type: ignore[union-attr]
    to_a = sum(after[k].variant == "a" for k in displaced) / len(displaced)  # type: ignore[union-attr]
    assert 0.5 < to_a < 0.75  # displaced share spreads in proportion 50:30


def test_no_eligible_variant_and_force() -> None:
    weights = {"a": 1.0, "b": 0.0}
    assert assign(weights, eligible=["b"]) is None  # zero weight is never picked by weight
    forced = assign(weights, eligible=[], key="k", force="b")
    assert forced is not None and forced.variant == "b" and forced.reason == "forced"
    with pytest.raises(LookupError, match="unknown variant 'zzz'"):
        assign(weights, force="zzz")
