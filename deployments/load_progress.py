"""A starting replica's progress (downloading, then loading its weights), for ``/ready`` and ``up``.

A replica's constructor blocks until its model is loaded, so nothing can ask the replica itself.
It writes its progress to Ray's internal key-value store (the GCS) instead, under its app,
deployment and replica id; ``/ready`` reads the entries of replicas Serve still lists, and the
replica removes its entry once it serves. ``up`` counts its readiness timeout from the last
progress, so a large download does not trip it. Replica logs get a line every 10% or 30 s.
"""

from __future__ import annotations

import json
import logging
import time

from .gcs_kv import RayInternalKV
from .protocol import ReplicaLoad, size_text

NAMESPACE = "mlx_serving_load"
REPORT_EVERY_S = 1.0
LOG_EVERY_S = 30.0

log = logging.getLogger("mlx_serving.replica")


def _prefix(app: str, deployment: str) -> str:
    return f"{app}/{deployment}/"


class LoadReporter:
    """Used by a replica's constructor (on its own thread, before and while the engine loads)."""

    def __init__(self, source: str) -> None:
        from ray.serve import context as sc

        rc = sc._get_internal_replica_context()
        self.source = source
        self.replica = rc.replica_id.unique_id if rc else ""
        self.key = _prefix(rc.app_name, rc.deployment) + self.replica if rc else None  # None: not in Serve
        self._sent = 0.0
        self._logged = (0.0, -1)  # (when, tenth of the download)

    def downloading(self, done: int, total: int) -> None:
        now = time.monotonic()
        tenth = 10 * done // total if total else 0
        if now - self._logged[0] >= LOG_EVERY_S or tenth > self._logged[1]:
            self._logged = (now, tenth)
            log.info("downloading %s: %d%% (%s of %s)", self.source, 100 * done // max(total, 1),
                     size_text(done), size_text(total))
        if now - self._sent >= REPORT_EVERY_S or done == total:
            self._sent = now
            self._put(ReplicaLoad(replica=self.replica, phase="downloading", done_bytes=done, total_bytes=total))

    def loading(self) -> None:
        self._put(ReplicaLoad(replica=self.replica, phase="loading"))

    def done(self) -> None:
        if self.key is None:
            return
        try:
            RayInternalKV().delete(self.key, NAMESPACE)
        except Exception:  # noqa: BLE001 - progress is advisory; a stale entry is ignored once the replica is gone
            pass

    def _put(self, load: ReplicaLoad) -> None:
        if self.key is None:
            return
        load.updated_at = time.time()
        try:
            RayInternalKV().put(self.key, load.model_dump_json().encode(), NAMESPACE)
        except Exception:  # noqa: BLE001 - advisory, as above
            pass


def read(app: str, deployment: str, replicas: set[str]) -> list[ReplicaLoad]:
    """Progress of the replicas of ``deployment`` that Serve still lists (a dead one's entry is ignored)."""
    kv, out = RayInternalKV(), []
    prefix = _prefix(app, deployment)
    for key in kv.keys(prefix, NAMESPACE):
        if key[len(prefix):] not in replicas:
            continue
        raw = kv.get(key, NAMESPACE)
        if raw:
            out.append(ReplicaLoad.model_validate(json.loads(raw)))
    return sorted(out, key=lambda r: r.replica)
