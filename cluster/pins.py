"""A fleet plan as a Ray Serve config: every model's replicas pinned to the hosts the planner chose.

Serve gives all replicas of one deployment the same actor options, so a per-replica pin is not
expressible; a per-deployment one is, and is exact when each planned host holds one replica:

- ``hosts``: the plan's hosts of the model -> ``label_selector {"host": "in(a,b)"}``;
- ``max_replicas_per_node``: the most replicas the plan puts on one host (1 when the plan spreads,
  as it does whenever there are at least as many eligible hosts as replicas). N replicas, N allowed
  hosts and at most one per host: Ray has to put exactly one on each planned host;
- ``memory_gb``: the replica's footprint (weights + KV budget) as Ray's ``memory`` resource. Nodes
  started by ``mlx-serving cluster up --inventory`` offer their usable memory (``ray start
  --memory``), so Ray itself never overcommits a Mac, not even when it moves replicas around;
- ``fallback_hosts``: the other hosts the model's constraints allow -> ``fallback_strategy``. Ray uses
  them only when no planned host can take a replica: when a host dies, its replicas restart on a
  host with room (memory permitting) instead of waiting for it to come back.

A sharded model (one replica across hosts) gets none of these pins: its entry's ``shard.hosts`` name
the planned hosts in rank order, ``num_replicas`` is 1 and ``memory_gb`` is each host's share.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from deployments.config import relay_actor_options

from .inventory import GB, Fleet, ModelPlacementSpec
from .placement import Assignment, Plan, model_weight_bytes, shard_config

APP_NAME = "mlx-serving"


def weight_bytes(source: str, revision: str | None = None) -> int:
    """Like ``placement.model_weight_bytes``, and ``demo:*`` sources are built (offline) and measured."""
    from engine import sources

    if sources.is_demo(source):
        return model_weight_bytes(sources.resolve(source))
    return model_weight_bytes(source, revision)


def _floor_mib_gb(nbytes: int) -> float:
    """Bytes as GB rounded down to a MiB: exact in binary floating point, never more than planned."""
    return math.floor(nbytes / 2**20) / 1024


def model_entries(fleet: Fleet, plan: Plan, *, failover: bool = True) -> list[dict[str, Any]]:
    """The ``models:`` list of the application's args, placement fields filled from the plan."""
    out = []
    for spec in fleet.models:
        sharded = plan.shard_of(spec.name)
        if sharded is not None:
            out.append(_sharded_entry(spec, sharded))
            continue
        placed = plan.hosts_for(spec.name)
        counts = Counter(placed)
        hosts = list(dict.fromkeys(placed))
        footprint = next(a.footprint_gb for a in plan.assignments if a.model == spec.name)
        entry: dict[str, Any] = {
            "name": spec.name,
            "source": spec.source,
            "num_replicas": spec.replicas,
            "hosts": hosts,
            "max_replicas_per_node": max(counts.values()),
            "memory_gb": _floor_mib_gb(int(round(footprint * GB))),
        }
        if failover:
            spare = [h.name for h in fleet.hosts if spec.selects(h) and h.name not in hosts]
            if spare:
                entry["fallback_hosts"] = spare
        entry.update(spec.deployment)
        out.append(entry)
    return out


def _sharded_entry(spec: ModelPlacementSpec, rank0: Assignment) -> dict[str, Any]:
    """A sharded model's entry: one replica whose ``shard.hosts`` place it (a bundle per host, in rank
    order), so none of the single-host pins; ``memory_gb`` is each host's share."""
    assert rank0.shard_mode is not None
    shard = shard_config(spec, rank0.shard_hosts, rank0.shard_mode)
    given = spec.shard.model_fields_set if spec.shard is not None else set()  # the rest keep ShardConfig's defaults
    return {
        "name": spec.name,
        "source": spec.source,
        "num_replicas": 1,
        "memory_gb": _floor_mib_gb(int(round(rank0.footprint_gb * GB))),
        "shard": shard.model_dump(mode="json", include={"hosts", "mode", *given}),
        **spec.deployment,
    }


def app_args(fleet: Fleet, plan: Plan, *, failover: bool = True) -> dict[str, Any]:
    return {**fleet.app, "models": model_entries(fleet, plan, failover=failover)}


def control_plane_overrides(fleet: Fleet) -> list[dict[str, Any]]:
    """Serve ``deployments:`` overrides that keep the ingress (and the router) on the head host.

    The HTTP proxy runs on the head; an ingress on another Mac would die with that Mac and drop
    every request in flight, for every model, instead of only those of the Mac's own replicas.
    """
    # An override replaces the code's ray_actor_options: it keeps the app's env_vars itself.
    pin = {**relay_actor_options(fleet.app.get("env_vars") or {}), "label_selector": {"host": fleet.head}}
    out = [{"name": "ingress", "ray_actor_options": dict(pin)}]
    if fleet.app.get("routes") or fleet.app.get("router"):
        out.append({"name": "router", "ray_actor_options": dict(pin)})
    return out


def serve_config(fleet: Fleet, plan: Plan, *, failover: bool = True, http_host: str = "0.0.0.0",
                 http_port: int = 8000, app_name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """A complete Ray Serve config file (``serve deploy`` / ``mlx-serving up --config``)."""
    return {
        # One HTTP entry point on the head: a proxy per node would need a port per node when
        # several simulated hosts share a machine, and losing the head stops the cluster anyway.
        "proxy_location": "HeadOnly",
        "http_options": {"host": http_host, "port": http_port},
        "applications": [{
            "name": app_name,
            "route_prefix": route_prefix,
            "import_path": "deployments.app:build_app",
            "args": app_args(fleet, plan, failover=failover),
            "deployments": control_plane_overrides(fleet),
        }],
    }


def header(inventory: str, plan: Plan) -> str:
    lines = [
        f"# Ray Serve config made by `mlx-serving plan {inventory} --emit-config` from this plan:",
        *("#   " + line for line in plan.as_table().splitlines()),
        "# Replicas are pinned with label selectors on the `host` label; see docs/fleet.md.",
        "# Deploy: mlx-serving up --config THIS_FILE   (or: serve deploy THIS_FILE)",
    ]
    return "\n".join(lines) + "\n"
