"""The admission gate: the order in which one model's requests leave the ingress for its replicas.

Serve's handle queues first in, first out, and a replica takes at most ``max_ongoing_requests``
(sized to its batch), so past that an interactive request would wait behind every batch request
that came before it, where no deadline is looked at. The gate holds requests at the ingress instead,
as many in flight as the model's running replicas take, and lets the next one go when one ends:
interactive before batch, the earliest deadline first. Batch requests never take the last
``reserve`` slots, so an interactive request finds room in a batch at once instead of waiting for a
long batch answer to end. A request whose deadline passes while it waits gets 504 and never reaches
a replica; past ``max_queued`` waiting, 429.

Each ingress replica has its own gate, with its share of the capacity (``shares``: by demand).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

from engine.errors import DeadlineExceededError, OverCapacityError

from .config import PRIORITY_RANK, Priority


@dataclass(order=True)
class _Waiter:
    rank: int
    deadline: float
    arrival: int
    priority: Priority = field(compare=False)
    future: asyncio.Future = field(compare=False)


class AdmissionGate:
    def __init__(self, capacity: int, max_queued: int, reserve_share: float = 0.0) -> None:
        self.max_queued = max_queued
        self.reserve_share = reserve_share
        self.inflight = {"interactive": 0, "batch": 0}
        self._waiting: list[_Waiter] = []
        self._arrivals = itertools.count()
        self.admitted = {"interactive": 0, "batch": 0}
        self.expired = 0
        self.peak = 0  # the most requests held at once, running or waiting, since ``take_peak``
        self.resize(capacity)

    @property
    def waiting(self) -> dict[str, int]:
        out = {"interactive": 0, "batch": 0}
        for w in self._waiting:
            if not w.future.done():
                out[w.priority] += 1
        return out

    def held(self) -> int:
        return self.inflight["interactive"] + self.inflight["batch"] + sum(self.waiting.values())

    def take_peak(self) -> int:
        """This gate's demand for the split between ingress replicas (``shares``); starts a new period."""
        held = self.held()
        peak, self.peak = max(self.peak, held), held
        return peak

    def resize(self, capacity: int) -> None:
        """The model's replicas changed (a host came or went, autoscaling): let waiters use new room."""
        self.capacity = max(1, capacity)
        reserve = math.ceil(self.capacity * self.reserve_share) if self.capacity > 1 else 0
        self.batch_capacity = self.capacity - reserve
        self._wake()

    def _has_room(self, priority: Priority) -> bool:
        total = self.inflight["interactive"] + self.inflight["batch"]
        if total >= self.capacity:
            return False
        return priority == "interactive" or self.inflight["batch"] < self.batch_capacity

    async def enter(self, priority: Priority, deadline: float) -> None:
        """Wait for a slot; ``deadline`` is on ``time.monotonic()``'s clock."""
        ahead = any(not w.future.done() and w.rank <= PRIORITY_RANK[priority] for w in self._waiting)
        if not ahead and self._has_room(priority):
            self._admit(priority)
            self.peak = max(self.peak, self.held())
            return
        if sum(self.waiting.values()) >= self.max_queued:
            raise OverCapacityError(f"{self.max_queued} requests are waiting for this model; retry shortly",
                                    retry_after=1.0)
        waiter = _Waiter(PRIORITY_RANK[priority], deadline, next(self._arrivals), priority,
                         asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiting, waiter)
        self.peak = max(self.peak, self.held())
        try:
            done, _ = await asyncio.wait({waiter.future}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:  # the client left while it waited
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave(priority)  # it had just been given a slot: hand it on
            else:
                waiter.future.cancel()
            raise
        if not done:
            waiter.future.cancel()
            self.expired += 1
            raise DeadlineExceededError("the deadline passed while the request waited for a replica")

    def _admit(self, priority: Priority) -> None:
        self.inflight[priority] += 1
        self.admitted[priority] += 1

    def leave(self, priority: Priority) -> None:
        """A request that entered has ended (or never got going): its slot goes to the next waiter."""
        self.inflight[priority] -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting[0]
            if waiter.future.done():  # expired or cancelled
                heapq.heappop(self._waiting)
                continue
            if not self._has_room(waiter.priority):  # the first in line waits; so does everyone behind it
                return
            heapq.heappop(self._waiting)
            self._admit(waiter.priority)
            waiter.future.set_result(None)
