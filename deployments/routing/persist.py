"""Route snapshots in Ray's internal KV, so a restarted router replica takes its rollouts back.

The one module under ``routing`` that touches Ray, and only through a two-method backend: the default
one imports ``ray.experimental.internal_kv`` when first used (the GCS keeps the values as long as the
Ray cluster lives), tests pass a dict. Calls block on the GCS: the router deployment runs them in a
thread, never on its event loop.

Keys: ``rollout/<application>/<route>`` in namespace ``mlx_serving``; values: ``RouteSnapshot`` JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from pydantic import ValidationError

from .snapshot import RouteSnapshot

logger = logging.getLogger("ray.serve")

NAMESPACE = "mlx_serving"


class KVBackend(Protocol):
    def get(self, key: str, namespace: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, namespace: str) -> None: ...


class RayInternalKV:
    """Ray's internal KV (the GCS), as every worker of a connected Ray process can reach it."""

    def get(self, key: str, namespace: str) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=namespace)

    def put(self, key: str, value: bytes, namespace: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=namespace)

    @staticmethod
    def available() -> bool:
        """False outside a Ray worker (e.g. Serve's local testing mode): nothing to persist to."""
        try:
            from ray.experimental.internal_kv import _internal_kv_initialized

            return bool(_internal_kv_initialized())
        except Exception:  # noqa: BLE001 - no Ray, no store
            return False


class RolloutStore:
    """Saved route state of one Serve application."""

    def __init__(self, app: str, backend: KVBackend | None = None, namespace: str = NAMESPACE) -> None:
        self.app = app
        self.backend: KVBackend = backend if backend is not None else RayInternalKV()
        self.namespace = namespace

    def key(self, route: str) -> str:
        return f"rollout/{self.app}/{route}"

    def load(self, routes: Iterable[str]) -> dict[str, RouteSnapshot]:
        """Saved snapshots of ``routes``. A missing key means nothing was saved; an unreadable value
        (corrupt, or an older format) is logged and skipped, so that route starts fresh. A backend
        error propagates: starting fresh over a state that exists but could not be read would undo
        a rollback."""
        out: dict[str, RouteSnapshot] = {}
        for route in routes:
            raw = self.backend.get(self.key(route), self.namespace)
            if raw is None:
                continue
            try:
                snap = RouteSnapshot.model_validate_json(raw)
            except ValidationError as e:
                logger.warning("router: saved state of route %r is unreadable, starting fresh: %s",
                               route, str(e).splitlines()[0])
                continue
            if snap.route != route:
                logger.warning("router: saved state under %r names route %r, starting fresh", self.key(route), snap.route)
                continue
            out[route] = snap
        return out

    def save(self, snapshots: Iterable[RouteSnapshot]) -> None:
        for snap in snapshots:
            self.backend.put(self.key(snap.route), snap.model_dump_json().encode(), self.namespace)
