"""A replica across hosts (engine/shard.py): its placement group, its rank actors, its group's addresses.

Serve reserves the replica's placement group: one bundle per host of ``shard.hosts``, pinned by the
``host`` label, strictly spread. The replica itself runs in bundle 0 and is rank 0 (the engine the
ingress talks to); it starts a ``RankActor`` in each other bundle. Each rank picks a free port on its
host's address, rank 0 builds the group's description from them, and every rank joins and loads its
shard at the same time. The replica watches its followers: one that ends while the model is loaded
means a rank or its host was lost, and the replica exits (its streams end with an error event, as
for any replica that dies) so that Serve rebuilds it with a fresh placement group, which Ray places
as soon as the hosts allow.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Callable

import ray

from engine.distributed import ShardLost, ShardSpec, Watchdog

from .config import ModelDeploymentConfig, ShardConfig
from .messages import RankInfo

log = logging.getLogger("mlx_serving.replica")


def deployment_options(cfg: ModelDeploymentConfig) -> dict[str, Any]:
    """Serve options that reserve the hosts of a sharded replica: one bundle per host."""
    shard = cfg.shard
    assert shard is not None
    bundles = []
    for host in shard.hosts:
        bundle: dict[str, float] = {"CPU": cfg.num_cpus, f"host:{host}": 1}  # a host resource: never an empty bundle
        if cfg.memory_gb is not None:
            bundle["memory"] = int(cfg.memory_gb * 2**30)
        bundles.append(bundle)
    return {
        "placement_group_bundles": bundles,
        "placement_group_strategy": "STRICT_SPREAD",
        "placement_group_bundle_label_selector": [{"host": h} for h in shard.hosts],
    }


def rank0_actor_options(cfg: ModelDeploymentConfig) -> dict[str, Any]:
    """The replica's own resources: within bundle 0 (Serve places it there)."""
    assert cfg.shard is not None
    opts: dict[str, Any] = {"num_cpus": cfg.num_cpus, "resources": {f"host:{cfg.shard.hosts[0]}": 1}}
    if cfg.memory_gb is not None:
        opts["memory"] = int(cfg.memory_gb * 2**30)
    if cfg.env_vars:
        opts["runtime_env"] = {"env_vars": dict(cfg.env_vars)}
    return opts


def free_address(ip: str) -> str:
    """``ip:port`` with a port free on ``ip`` now (the ring binds it a moment later)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"


def rank_info(rank: int, ip: str | None) -> RankInfo:
    ctx = ray.get_runtime_context()
    host = (ctx.get_node_labels() or {}).get("host")
    return RankInfo(rank=rank, host=host if isinstance(host, str) or host is None else host[0],
                    address=free_address(ip or ray.util.get_node_ip_address()), pid=os.getpid(),
                    node_id=ctx.get_node_id())


@ray.remote(max_concurrency=4)  # ``run`` holds one thread for the model's life; the others answer
class RankActor:
    """Rank 1..N-1 of a sharded replica: loads its shard and replays rank 0's steps."""

    def __init__(self, model: str, rank: int) -> None:
        from . import logging as events

        events.setup("replica")
        self.model, self.rank = model, rank
        self._bell = threading.Event()  # rank 0 rings it to bring this rank back from idle (engine.shard)

    def address(self, ip: str | None) -> RankInfo:
        """Where this rank runs, with ``ip:port`` for the ring (``ip`` when the config names one, else
        this node's address)."""
        return rank_info(self.rank, ip)

    def prepare(self, source: dict[str, Any]) -> str:
        """This host's own copy of the model (a hub id downloads here), before any rank joins: joining
        is bounded by the step timeout, a download is not."""
        from engine.sources import ModelSource

        return ModelSource(**source).local_dir()

    def run(self, local_dir: str, spec: dict[str, Any]) -> str:
        """Until rank 0 stops the model ("stopped"). A lost group ends this process: nothing of it can
        be reused, and the replica is rebuilt with fresh ranks."""
        from engine.shard import follow

        parsed = ShardSpec.model_validate(spec)
        watchdog = Watchdog(parsed.step_timeout_s, self._expired)
        try:
            follow(local_dir, parsed, watchdog, wait_bell=self._wait_bell)
        except ShardLost as e:
            log.error("model %s, rank %d: %s; this rank exits", self.model, self.rank, e)
            os._exit(1)
        return "stopped"

    def wake(self) -> None:
        self._bell.set()

    def _wait_bell(self) -> None:
        self._bell.wait()
        self._bell.clear()

    def _expired(self, what: str) -> None:
        log.error("model %s, rank %d: %s timed out; this rank exits", self.model, self.rank, what)
        os._exit(1)


class ShardRanks:
    """Rank 0's handle on the other ranks of its replica (used in the replica's constructor)."""

    def __init__(self, cfg: ModelDeploymentConfig) -> None:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        shard = cfg.shard
        assert shard is not None
        self.cfg, self.shard = cfg, shard
        pg = get_current_placement_group()
        if pg is None:
            raise RuntimeError("a sharded replica runs in its placement group (deployment_options)")
        self.actors = [
            RankActor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                num_cpus=cfg.num_cpus, resources={f"host:{host}": 1},
                **({"memory": int(cfg.memory_gb * 2**30)} if cfg.memory_gb is not None else {}),
            ).remote(cfg.name, rank)
            for rank, host in enumerate(shard.hosts) if rank > 0]
        self._runs: list[Any] = []
        self.ranks: list[RankInfo] = []
        self._stopping = False

    def spec(self, timeout_s: float = 120.0) -> list[ShardSpec]:
        """Every rank's ``ShardSpec``: addresses asked of each host, rank 0's own first."""
        shard = self.shard
        self.ranks = [rank_info(0, shard.addresses.get(shard.hosts[0]))] + ray.get(
            [a.address.remote(shard.addresses.get(h)) for a, h in zip(self.actors, shard.hosts[1:])], timeout=timeout_s)
        for r in self.ranks:
            if r.host != shard.hosts[r.rank]:
                raise RuntimeError(f"rank {r.rank} runs on host {r.host!r}, not {shard.hosts[r.rank]!r}: check the host labels")
        addresses = [r.address for r in self.ranks]
        common: dict[str, Any] = {"mode": shard.mode, "size": len(shard.hosts), "step_timeout_s": shard.step_timeout_s,
                                  "load_timeout_s": shard.load_timeout_s}
        if _backend(shard) == "jaccl":
            common.update(backend="jaccl", coordinator=addresses[0], rdma_devices=[
                [None if a == b else shard.rdma_devices[a][b] for b in shard.hosts] for a in shard.hosts])
        else:
            common.update(backend="ring", addresses=[[a] for a in addresses])
        return [ShardSpec(rank=r, **common) for r in range(len(shard.hosts))]

    def prepare(self) -> list[Any]:
        """Every follower fetches the model on its host (started now, waited for in ``start``)."""
        source = {"source": self.cfg.source, "revision": self.cfg.revision}
        return [a.prepare.remote(source) for a in self.actors]

    def start(self, prepared: list[Any], specs: list[ShardSpec]) -> None:
        """Once every host has the model: the followers join and load; rank 0 does the same in its
        engine right after."""
        dirs = ray.get(prepared)
        self._runs = [a.run.remote(d, s.model_dump()) for a, d, s in zip(self.actors, dirs, specs[1:])]

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call ``on_lost(description)`` (from a thread) when a follower ends while the model serves."""
        def wait() -> None:
            done, _ = ray.wait(self._runs, num_returns=1, timeout=None)
            if self._stopping:
                return
            i = self._runs.index(done[0])
            host = self.shard.hosts[i + 1]
            try:
                ray.get(done[0])
                why = "stopped"
            except Exception as e:  # noqa: BLE001 - the actor died: its process, or its host
                why = type(e).__name__
            on_lost(f"rank {i + 1} on host {host} ended ({why})")

        threading.Thread(target=wait, name="mlx-shard-ranks", daemon=True).start()

    def wake(self) -> None:
        """Rank 0's bell: the idle followers go back to waiting in the ring (fire and forget: rank 0's
        next message waits for them there)."""
        for a in self.actors:
            a.wake.remote()

    def stopping(self) -> None:
        """The model is being unloaded: followers ending now is expected."""
        self._stopping = True


def _backend(shard: ShardConfig) -> str:
    if shard.backend != "auto":
        return shard.backend
    import mlx.core as mx

    return "jaccl" if shard.rdma_devices and mx.distributed.is_available("jaccl") else "ring"
