"""How the ingress replicas split a model's slots between their gates: by demand, not evenly.

Each ingress replica has its own admission gate. Split evenly (slots / ingress replicas), the gates
waste slots whenever clients do not spread evenly over the ingresses, as when every client uses one
Mac's address: on two H200 "hosts" with one model replica and an ingress per host, the clients of
one proxy had 16 of the batch's 32 slots and TTFT tripled (``bench_scaling.py``, docs/benchmarks.md).

So every ingress publishes its demand each tick (per model, the most requests its gate held at once,
running or waiting, since the last tick) in Ray's internal KV and reads the others'. A model's slots
are split max-min fair over those demands, and the slots nobody asks for are split evenly, so a
burst at an idle ingress finds room at once. Entries are told apart by sequence number, not by
clocks (hosts' clocks differ): an entry whose number has not moved for ``STALE_S`` is an ingress
that is gone, and counts no more. Between ticks a gate keeps its share; for one tick after demand
moves, the shares may add up to more than the slots, and the replicas' own ``max_ongoing_requests``
holds then (the extra requests wait in Serve's handle queue).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from pydantic import BaseModel, Field, ValidationError

from ..gcs_kv import ListingKVBackend, RayInternalKV

log = logging.getLogger("ray.serve")

NAMESPACE = "mlx_serving_qos"
STALE_S = 3.0  # an entry unchanged this long (three ticks) is an ingress replica that is gone
FORGET_S = 60.0  # ... and one unchanged this long is deleted (its replica will not come back)


class IngressDemand(BaseModel):
    """One ingress replica's entry: what its gates held at most since its last tick, per model."""

    seq: int = Field(ge=0)
    demand: dict[str, int]


def fair_share(capacity: int, demands: Mapping[str, int], me: str) -> int:
    """``me``'s slots of ``capacity``: max-min fair over ``demands`` (``me`` among them), plus an even
    part of the slots nobody asks for. Never below one, so a first request always gets through."""
    left, alloc = float(capacity), 0.0
    for k, (who, d) in enumerate(sorted(demands.items(), key=lambda kv: (kv[1], kv[0]))):
        share = min(float(d), left / (len(demands) - k))
        left -= share
        if who == me:
            alloc = share
    return max(1, math.ceil(round(alloc + left / len(demands), 6)))


class DemandBoard:
    """This ingress's entry and its view of the others', for one Serve application."""

    def __init__(self, app: str, me: str, backend: ListingKVBackend | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = f"{app}/"
        self.me = me
        self.backend: ListingKVBackend = backend if backend is not None else RayInternalKV()
        self.clock = clock
        self.seq = 0
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (its seq, when it last moved)
        self.unreachable = False  # the store failed at the last exchange (warned once per outage)

    def exchange(self, demand: dict[str, int]) -> dict[str, dict[str, int]] | None:
        """Publish ``demand``; the live ingresses' demands, this one's included, by replica. None when
        the store cannot be reached: the gates then keep the even split. Blocks on the GCS."""
        self.seq += 1
        mine = self.prefix + self.me
        try:
            self.backend.put(mine, IngressDemand(seq=self.seq, demand=demand).model_dump_json().encode(), NAMESPACE)
            keys = [k for k in self.backend.keys(self.prefix, NAMESPACE) if k != mine]
            entries = {k: self.backend.get(k, NAMESPACE) for k in keys}
        except Exception as e:  # noqa: BLE001 - the GCS is briefly unreachable: keep the even split
            if not self.unreachable:
                log.warning("QoS: ingress demands unavailable (%s); gates keep the even split", type(e).__name__)
            self.unreachable = True
            return None
        self.unreachable = False
        now, live, seen = self.clock(), {self.me: demand}, {}
        for key, raw in entries.items():
            try:
                entry = IngressDemand.model_validate_json(raw or b"")
            except ValidationError:
                continue
            last_seq, moved = self._seen.get(key, (-1, now))
            seen[key] = (entry.seq, now if entry.seq != last_seq else moved)
            age = now - seen[key][1]
            if age < STALE_S:
                live[key[len(self.prefix):]] = entry.demand
            elif age >= FORGET_S:
                self._forget(key)
        self._seen = seen
        return live

    def _forget(self, key: str) -> None:
        try:
            self.backend.delete(key, NAMESPACE)
        except Exception:  # noqa: BLE001 - deleted on a later tick
            pass
