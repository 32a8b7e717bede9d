"""``/ready``: readiness from Serve's own view, cached and refreshed off the event loop.

``serve.status()`` is a blocking call to the Serve controller; made on the ingress's event loop it
would stall every stream the ingress relays, and a load balancer polls ``/ready`` often. The answer
is cached for ``MAX_AGE_S``; an older one is refreshed on a thread, and a caller waits for it at most
``WAIT_S`` before getting the last known answer.
"""

from __future__ import annotations

import asyncio
import time

from . import load_progress
from .config import AppConfig
from .protocol import ModelStatus

MAX_AGE_S = 1.0
WAIT_S = 2.0


def _status_name(status: object) -> str:
    return str(getattr(status, "value", status))


class Readiness:
    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.config: AppConfig | None = None
        self._cached: list[ModelStatus] | None = None
        self._at = 0.0
        self._refresh: asyncio.Future | None = None

    async def statuses(self, config: AppConfig) -> list[ModelStatus]:
        self.config = config
        if self._cached is not None and time.monotonic() - self._at <= MAX_AGE_S:
            return self._cached
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(asyncio.to_thread(self._read, config))
        try:
            self._cached = await asyncio.wait_for(asyncio.shield(self._refresh), WAIT_S)
            self._at = time.monotonic()
        except asyncio.TimeoutError:
            if self._cached is None:
                return [ModelStatus(name=m.name, ready=False, detail="status unavailable: the Serve controller is "
                                    "slow to answer") for m in config.models]
        return self._cached

    def _read(self, config: AppConfig) -> list[ModelStatus]:
        """A model is ready when a replica of it runs (on a thread: this blocks on the controller).

        Serve's full details, not ``serve.status()`` (which is made from them): they also hold the
        autoscaler's current target per deployment. They are read as the plain dict the controller
        sends (the schema of Ray's REST API), not parsed into ``ServeInstanceDetails``. That parse
        pickles each deployment's request router class again, and took a tenth of the time the
        ingress's Ray and Serve threads held Python's lock, profiled on a GPU under load (QoS
        refreshes this every second)."""
        try:
            from ray.serve.context import _get_global_client

            deployments = _get_global_client().get_serve_details()["applications"][self.app_name]["deployments"]
        except Exception as e:  # noqa: BLE001 - the controller is briefly unreachable
            return [ModelStatus(name=m.name, ready=False, detail=f"status unavailable: {type(e).__name__}")
                    for m in config.models]
        out = []
        for m in config.models:
            target = m.num_replicas if m.num_replicas is not None else int((m.autoscaling_config or {}).get("min_replicas", 1))
            d = deployments.get(m.deployment_name)
            if d is None:
                out.append(ModelStatus(name=m.name, ready=False, detail="deployment not found", replicas_target=target))
                continue
            replicas = d.get("replicas") or []
            # A model stays ready while one replica runs; fewer than configured (a host is down, its
            # replicas wait for it or for room elsewhere) is reported as degraded, not as down.
            running = sum(_status_name(r.get("state")) == "RUNNING" for r in replicas)
            # Serve's message may hold a whole traceback: its first line says enough.
            text = (d.get("message") or "").strip()
            message = text.splitlines()[0][:200].removesuffix("Error:").strip() if text else ""
            detail = f"{_status_name(d.get('status'))} {message}".strip()
            loading = []
            if running < target:
                detail += f" ({running} of {target} replicas running)"
                starting = {r.get("replica_id") for r in replicas if _status_name(r.get("state")) != "RUNNING"}
                loading = load_progress.read(self.app_name, m.deployment_name, starting) if starting else []
                detail += "".join(f"; {r.describe()}" for r in loading)
            lost = self._lost_hosts(m.shard.hosts) if m.shard is not None and running < target else []
            if lost:
                detail += (f"; degraded: sharded across {', '.join(m.shard.hosts)}, lost host(s) {', '.join(lost)}: "
                           "the replica is rebuilt when they are back")
            out.append(ModelStatus(name=m.name, ready=running > 0, replicas_healthy=running, detail=detail,
                                   replicas_target=target, degraded=0 < running < target or bool(lost),
                                   autoscaling_target=d.get("target_num_replicas") if m.autoscaling_config else None,
                                   loading=loading, lost_hosts=lost))
        return out

    @staticmethod
    def _lost_hosts(hosts: list[str]) -> list[str]:
        """The hosts of a sharded model with no live Ray node: what its replica waits for."""
        import ray

        alive = {str(n.get("Labels", {}).get("host")) for n in ray.nodes() if n.get("Alive")}
        return [h for h in hosts if h not in alive]
