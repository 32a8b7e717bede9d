"""Route snapshots in Ray's internal KV, so a restarted router replica takes its rollouts back.

It touches Ray only through a two-method backend: the default one is Ray's internal KV
(``deployments.gcs_kv``; the GCS keeps the values as long as the Ray cluster lives), tests pass a
dict. Calls block on the GCS: the router deployment runs them in a thread, never on its event loop.

Keys: ``rollout/<application>/<route>`` in namespace ``mlx_serving``; values: ``RouteSnapshot`` JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydantic import ValidationError

from ..gcs_kv import KVBackend, RayInternalKV
from .snapshot import RouteSnapshot

logger = logging.getLogger("ray.serve")

NAMESPACE = "mlx_serving"


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
