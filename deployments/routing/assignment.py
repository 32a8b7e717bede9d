"""Which variant serves a request: weighted random, or sticky by client key.

Sticky assignment hashes the key (blake2b, stable across processes and router replicas, unlike
``hash()``) into one of ``N_BUCKETS`` buckets, and gives each variant a contiguous bucket range, in
configured order, sized by its weight. Changing weights only moves the range boundaries, so moving 5%
of the weight moves about 5% of the keys, and only between the variants whose ranges touch. A key
whose variant is unavailable is rehashed with a second salt over the available variants only: keys
on healthy variants never move, and the displaced share spreads over the rest in proportion to
their weights.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

N_BUCKETS = 10_000
_DEFAULT_RNG = random.Random()

Reason = Literal["forced", "sticky", "sticky-rehashed", "weighted"]


@dataclass(frozen=True)
class Assignment:
    variant: str
    reason: Reason
    bucket: int | None = None


def bucket_of(key: str, salt: str = "", n_buckets: int = N_BUCKETS) -> int:
    """Stable bucket of a key; the salt (the route name) decorrelates routes for one client."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_buckets


def allocate(weights: Mapping[str, float], n_buckets: int = N_BUCKETS) -> list[tuple[str, int, int]]:
    """Contiguous ``(variant, start, end)`` bucket ranges in mapping order, sized by weight.

    Boundaries are rounded cumulative shares, so a weight change moves only the boundaries next to it.
    Zero-weight variants get empty ranges; an all-zero mapping gets no ranges.
    """
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        return []
    ranges: list[tuple[str, int, int]] = []
    cum = 0.0
    start = 0
    items = [(n, max(w, 0.0)) for n, w in weights.items()]
    for i, (name, w) in enumerate(items):
        cum += w
        end = n_buckets if i == len(items) - 1 else min(n_buckets, round(n_buckets * cum / total))
        ranges.append((name, start, end))
        start = end
    return ranges


def variant_for_bucket(ranges: list[tuple[str, int, int]], bucket: int) -> str:
    """The variant whose range holds ``bucket`` (ranges must cover [0, n_buckets))."""
    ends = [end for _, _, end in ranges]
    return ranges[bisect.bisect_right(ends, bucket)][0]  # first end > bucket: never an empty range


def assign(
    weights: Mapping[str, float],
    eligible: Collection[str] | None = None,
    key: str | None = None,
    *,
    force: str | None = None,
    salt: str = "",
    rng: random.Random | None = None,
    n_buckets: int = N_BUCKETS,
) -> Assignment | None:
    """Pick a variant, or None when no eligible variant has a positive weight.

    ``weights`` is ordered (the stable variant order); ``eligible`` (default: all) are the variants
    whose circuit lets traffic through; ``force`` overrides everything (admin pinning, debugging).
    """
    if force is not None:
        if force not in weights:
            raise LookupError(f"cannot force unknown variant {force!r}")
        return Assignment(force, "forced")
    ok = set(weights) if eligible is None else set(eligible)
    live = {n: w for n, w in weights.items() if n in ok and w > 0}
    if not live:
        return None
    if key is None:
        return Assignment(_weighted_pick(live, rng or _DEFAULT_RNG), "weighted")
    b = bucket_of(key, salt, n_buckets)
    primary = variant_for_bucket(allocate(weights, n_buckets), b)
    if primary in live:
        return Assignment(primary, "sticky", b)
    b2 = bucket_of(key, f"{salt}\x00rehash", n_buckets)
    return Assignment(variant_for_bucket(allocate(live, n_buckets), b2), "sticky-rehashed", b2)


def _weighted_pick(weights: Mapping[str, float], rng: random.Random) -> str:
    names = list(weights)
    x = rng.random() * sum(weights.values())
    cum = 0.0
    for name in names:
        cum += weights[name]
        if x < cum:
            return name
    return names[-1]  # float rounding at the top edge
