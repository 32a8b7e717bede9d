"""A bounded worker pool for request preparation, so the event loop only relays.

Tokenizing, chat templates, image decoding and grammar compiles are CPU work of unbounded cost per
request; run on an event loop they would stall every stream it relays. Past ``workers + queue``
requests in flight the pool refuses new work with 429 and ``Retry-After`` instead of queueing it
without limit.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .errors import OverCapacityError

T = TypeVar("T")


class BoundedPool:
    def __init__(self, workers: int, queue: int, name: str = "mlx-prepare") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self.limit = workers + queue
        self._inflight = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker; ``OverCapacityError`` (429) when the pool is full."""
        with self._lock:
            if self._inflight >= self.limit:
                raise OverCapacityError(f"{self._inflight} requests are being prepared; retry shortly",
                                        retry_after=1.0, code="over_capacity")
            self._inflight += 1
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _: Future | None) -> None:
        with self._lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        return self._inflight

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
