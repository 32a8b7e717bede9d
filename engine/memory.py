"""Unified memory for one engine process: MLX's limits, and admission that stays inside them.

A Mac has one pool of memory for the OS, the weights and every KV cache. A replica that outgrows
its share does not fail: macOS swaps, and every replica on the Mac slows to a crawl. So an engine
with a ``memory_limit_gb`` (a fleet plan sets it per replica, from the model's memory_gb) does two
things. It sets MLX's memory limit (``mx.set_memory_limit``) and, on Metal, the wired limit
(``mx.set_wired_limit``, which keeps the weights resident, capped at the device's recommended
working set as mlx-lm does). And it admits a request only while the KV caches that admitted
requests may grow to (prompt + max_tokens each) fit in what the limit leaves beside the weights and
the prompt cache's entries, less ``ACTIVATION_MARGIN`` of it for activations. A request that does
not fit waits for running ones to finish; a full queue answers 429; one that could never fit gets 413.

MLX's current memory API (``mx.set_memory_limit``, ``mx.set_wired_limit``, ``mx.device_info``) is
used, not the deprecated ``mx.metal.*`` functions; the Metal branch is tested with the platform
stood in for (we have no Mac).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("mlx_serving.engine")

ACTIVATION_MARGIN = 0.1  # share of the limit kept for activations and MLX's temporaries


def apply_limits(limit_bytes: int | None) -> dict[str, tuple[int, int]]:
    """Set this process's MLX limits (before weights load); returns ``{name: (set, previous)}``.

    The limits are per process: one engine per process (a replica) owns them."""
    import mlx.core as mx

    applied: dict[str, tuple[int, int]] = {}
    if limit_bytes:
        applied["memory_limit"] = (limit_bytes, mx.set_memory_limit(limit_bytes))
    if mx.metal.is_available():
        recommended = int(mx.device_info()["max_recommended_working_set_size"])
        wired = min(limit_bytes or recommended, recommended)
        applied["wired_limit"] = (wired, mx.set_wired_limit(wired))
    if applied:
        log.info("MLX limits: %s", ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, (v, _) in applied.items()))
    return applied


def restore_limits(applied: dict[str, tuple[int, int]]) -> None:
    import mlx.core as mx

    setters = {"memory_limit": mx.set_memory_limit, "wired_limit": mx.set_wired_limit}
    for name, (_, previous) in applied.items():
        setters[name](previous)


def kv_bytes_per_token(model: Any) -> int | None:
    """KV cache bytes one token adds, measured on the model itself: one token through a fresh cache.

    Architecture-agnostic: attention caches grow per token, recurrent (SSM) state does not and adds
    nothing. None when the model cannot say (e.g. a vision model's wrapper)."""
    try:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(model)
        model(mx.array([[0]]), cache=cache)
        total = 0
        for c in cache:
            for arr in (getattr(c, "keys", None), getattr(c, "values", None)):
                if isinstance(arr, mx.array) and arr.ndim == 4 and arr.shape[2]:
                    total += arr.nbytes // arr.shape[2]  # (batch, heads, allocated steps, head_dim)
        return total or None
    except Exception:  # noqa: BLE001 - an architecture this probe does not fit: no KV reservation
        log.debug("could not measure KV bytes per token", exc_info=True)
        return None


class MemoryBudget:
    """What may be admitted under a memory limit (the GPU thread's view; no locking).

    KV caches get what the limit leaves beside the weights and the prompt cache's entries, less
    ``ACTIVATION_MARGIN`` of it: a fleet plan's memory_gb is weights plus a KV budget, and this
    keeps that budget for KV caches rather than taking a share of the whole limit."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit = limit_bytes

    @staticmethod
    def need(tokens: int, kv_per_token: int | None) -> int:
        return tokens * (kv_per_token or 0)

    def kv_room(self, weights: int, cached: int = 0) -> int | None:
        return None if self.limit is None else int((self.limit - weights - cached) * (1 - ACTIVATION_MARGIN))

    def fits(self, weights: int, cached: int, reserved: int, need: int) -> bool:
        """Room for ``need`` beside what is ``reserved``; when nothing is, the prompt cache's entries
        do not count (they are bounded, and a request must not wait on them forever)."""
        room = self.kv_room(weights, cached if reserved else 0)
        return room is None or reserved + need <= room

    def never_fits(self, weights: int, need: int) -> bool:
        room = self.kv_room(weights)
        return room is not None and need > room
