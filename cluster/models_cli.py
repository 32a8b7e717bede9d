"""``mlx-serving models pull`` and ``models list``: one download, copied to every host over Ray."""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import sys
from typing import Any

from engine import sources

from . import model_copy


def _err(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 1


def cluster_address(explicit: str | None = None) -> str:
    """The Ray cluster the CLI talks to: the flag, else what `up` / `cluster up` recorded, else Ray's own."""
    from . import fleet_cli, local

    if explicit:
        return explicit
    state, cluster = local.read_state(), fleet_cli.live_state()
    return state.address if state else cluster.address if cluster else "auto"


def alive_hosts() -> dict[str, str]:
    """host label -> node id, of the cluster this process is connected to."""
    import ray

    return {n["Labels"]["host"]: n["NodeID"] for n in ray.nodes() if n.get("Alive") and (n.get("Labels") or {}).get("host")}


def writer_on(host: str) -> Any:
    """A ``CacheWriter`` actor on ``host``: it writes into that host's own Hugging Face cache."""
    import ray

    actor = ray.remote(model_copy.CacheWriter).options(num_cpus=0, label_selector={"host": host})
    return actor.remote()


def ray_call(actor: Any) -> Any:
    import ray

    return lambda name, *args: functools.partial(ray.get, getattr(actor, name).remote(*args))


def hosts_for(model: str, inventory: str) -> list[str]:
    """The hosts an inventory's plan runs ``model`` on, with their failover hosts (a sharded model: all its hosts)."""
    from . import fleet_cli

    _, _, config = fleet_cli.config_from_inventory(inventory)
    hosts: list[str] = []
    known = []
    for app in config["applications"]:
        for m in app.get("args", {}).get("models", []):
            known.append(m["source"])
            if m["source"] == model:
                placed = m.get("hosts", []) + m.get("fallback_hosts", []) + (m.get("shard") or {}).get("hosts", [])
                hosts += [h for h in placed if h not in hosts]
    if not hosts:
        raise ValueError(f"{inventory} runs no model from {model!r}; its sources: {', '.join(sorted(set(known)))}")
    return hosts


def _targets(args: argparse.Namespace, alive: dict[str, str]) -> list[str]:
    if args.hosts and args.inventory:
        raise ValueError("give --hosts or --inventory, not both")
    wanted = ([h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts
              else hosts_for(args.model, args.inventory) if args.inventory else sorted(alive))
    missing = [h for h in wanted if h not in alive]
    if missing:
        raise ValueError(f"not in the cluster: {', '.join(missing)} (hosts up: {', '.join(sorted(alive)) or 'none'})")
    return wanted


def _copy(host: str, position: int, snap: model_copy.CachedSnapshot, local_dir: str, chunk_bytes: int) -> str:
    from tqdm.auto import tqdm

    notes: list[str] = []
    with tqdm(total=snap.total_bytes, unit="B", unit_scale=True, desc=host, position=position, leave=True) as bar:
        where = model_copy.send(ray_call(writer_on(host)), snap, local_dir, advance=bar.update, chunk_bytes=chunk_bytes,
                                resumed=lambda path, n: notes.append(f"resumed {path} at {n / 2**20:.1f} MiB"))
    return "; ".join(notes + [where])


def cmd_pull(args: argparse.Namespace) -> int:
    if not sources.is_hub_id(args.model):
        return _err(f"{args.model!r} is not a hub id (org/name): `models pull` copies hub models. A local directory "
                    "must exist at the same path on every host; demo:* models are built on each host.")
    import ray

    from . import fleet_cli

    print(f"downloading {args.model}{'@' + args.revision if args.revision else ''} here (or finding it in the cache)",
          flush=True)
    local_dir = sources.download(args.model, args.revision)
    snap = model_copy.read_snapshot(local_dir, args.model)
    print(f"{args.model} at commit {snap.commit}: {len(snap.files)} files, {snap.total_bytes / 2**30:.2f} GiB", flush=True)
    ray.init(address=cluster_address(args.address), logging_level="ERROR")
    try:
        hosts = _targets(args, alive_hosts())
    except (ValueError, *fleet_cli.plan_errors()) as e:
        return _err(f"models pull: {e}")
    print(f"copying to {', '.join(hosts)} over the cluster", flush=True)
    results: dict[str, str] = {}
    failed = False
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = {pool.submit(_copy, h, i, snap, local_dir, args.chunk_bytes): h for i, h in enumerate(hosts)}
        for fut, host in futures.items():
            try:
                results[host] = "ok: " + fut.result()
            except Exception as e:  # noqa: BLE001 - one host's failure is reported, the others go on
                failed = True
                results[host] = f"FAILED: {getattr(e, 'cause', None) or e}"
    for host in hosts:
        print(f"  {host}: {results[host]}")
    if failed:
        print("run the same command again: completed files are kept, partial ones resume", file=sys.stderr)
    return 1 if failed else 0


def hub_models_by_host(timeout_s: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    """host -> the hub models in its Hugging Face cache (``CacheWriter.models``), asked on every host at once."""
    import ray

    refs = {host: writer_on(host).models.remote() for host in sorted(alive_hosts())}
    return {host: ray.get(ref, timeout=timeout_s) for host, ref in refs.items()}


def cmd_list(args: argparse.Namespace) -> int:
    import ray

    ray.init(address=cluster_address(args.address), logging_level="ERROR")
    alive = alive_hosts()
    held: dict[tuple[str, str], dict[str, Any]] = {}
    for host, models in hub_models_by_host().items():
        for m in models:
            row = held.setdefault((m["repo_id"], m["commit"]), {"refs": set(), "bytes": m["bytes"], "hosts": []})
            row["refs"].update(m["refs"])
            row["hosts"].append(host if m["complete"] else host + " (incomplete)")
    if not held:
        print(f"no hub models in the Hugging Face caches of {', '.join(sorted(alive))}")
        return 0
    rows = [("MODEL", "REVISION", "SIZE", "HOSTS")]
    for (repo, commit), row in sorted(held.items()):
        rev = commit[:12] + (f" ({', '.join(sorted(row['refs']))})" if row["refs"] else "")
        rows.append((repo, rev, f"{row['bytes'] / 2**30:.2f} GiB", ", ".join(row["hosts"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def add_parsers(msub: Any) -> None:
    pull = msub.add_parser("pull", help="download a hub model here once, then copy it to the hosts over the cluster")
    pull.add_argument("model", help="a hub id, e.g. mlx-community/Qwen3-4B-4bit")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.add_argument("--hosts", help="comma-separated host names (Ray node label host=...)")
    pull.add_argument("--inventory", help="copy to the hosts this fleet inventory's plan runs the model on")
    pull.add_argument("--address", help="Ray cluster address (default: the one `up` / `cluster up` started)")
    pull.add_argument("--chunk-bytes", type=int, default=model_copy.CHUNK_BYTES, help=argparse.SUPPRESS)
    pull.set_defaults(func=cmd_pull)
    ls = msub.add_parser("list", help="which hosts hold which hub models (their Hugging Face caches)")
    ls.add_argument("--address", help="Ray cluster address (default: the one `up` / `cluster up` started)")
    ls.set_defaults(func=cmd_list)

