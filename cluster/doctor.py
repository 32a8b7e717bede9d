"""``mlx-serving doctor``: what this machine and its cluster look like, and what to fix.

Each check is information, fine, or something to fix (with the fix). The command exits 1 when any
check needs fixing. macOS checks (Metal memory, the wired limit) follow MLX's and Apple's documented
APIs; on this project's Linux machines they run with the platform patched in tests only.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Verdict = Literal["info", "ok", "fix"]
GB = 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str | None = None

    def lines(self) -> list[str]:
        mark = {"info": "    ", "ok": "ok  ", "fix": "FIX "}[self.verdict]
        out = [f"{mark}{self.name}: {self.detail}"]
        if self.fix:
            out.append(f"      {'fix' if self.verdict == 'fix' else 'hint'}: {self.fix}")
        return out


def _sysctl(name: str) -> str | None:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- this machine ---------------------------------------------------------------------------------
def machine_checks(system: str | None = None) -> list[Check]:
    """Platform and chip, MLX and its device."""
    system = system or platform.system()
    chip = _sysctl("machdep.cpu.brand_string") if system == "Darwin" else platform.processor() or platform.machine()
    out = [Check("platform", "info", f"{system} {platform.release()} on {platform.machine()} ({chip or 'unknown chip'}), "
                                     f"Python {platform.python_version()}")]
    try:
        import mlx.core as mx
    except ImportError as e:
        return [*out, Check("mlx", "fix", f"cannot import mlx: {e}",
                            "pip install -e . (mlx on macOS, mlx[cpu] on Linux, the cuda extra for NVIDIA)")]
    out.append(Check("mlx", "ok", f"{_version('mlx')}, default device {mx.default_device()}"))
    if system == "Darwin" and platform.machine() != "arm64":
        out.append(Check("apple silicon", "fix", f"this Mac is {platform.machine()}: MLX needs Apple silicon",
                         "run the replicas on an M-series Mac"))
    return out


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def memory_checks(system: str | None = None) -> list[Check]:
    """macOS: Metal memory and the wired limit; Linux: the BLAS MLX's CPU backend uses."""
    system = system or platform.system()
    if system == "Darwin":
        return _metal_checks()
    if system == "Linux":
        from engine import blas

        text = blas.describe()
        slow = text.startswith("reference BLAS")
        fix = None
        if slow:
            lib = blas.openblas_path()
            fix = ("apt install libopenblas0-pthread (mlx-serving up then preloads it)" if lib is None
                   else "nothing for `mlx-serving up` (it preloads OpenBLAS into Ray); elsewhere set "
                        f"LD_PRELOAD={lib}")
        verdict: Verdict = "fix" if slow and blas.openblas_path() is None else "info" if slow else "ok"
        return [Check("blas", verdict, text, fix)]
    return []


def _metal_checks() -> list[Check]:
    """What mlx-lm's ``maybe_set_recommended_wired_limit`` looks at, from ``mx.device_info()`` (MLX's
    current API; ``mx.metal.device_info`` is deprecated) and the ``iogpu.wired_limit_mb`` sysctl."""
    import mlx.core as mx

    info = mx.device_info()
    memory = int(info.get("memory_size", 0))
    working_set = int(info.get("max_recommended_working_set_size", 0))
    out = [Check("metal", "info", f"{info.get('device_name', 'GPU')}: {memory / GB:.1f} GiB unified memory, "
                                  f"recommended working set {working_set / GB:.1f} GiB")]
    wired = _sysctl("iogpu.wired_limit_mb")
    if wired is not None and wired.isdigit() and int(wired) > 0:
        out.append(Check("wired limit", "ok", f"iogpu.wired_limit_mb = {wired} MiB (raised above macOS's default)"))
    else:
        out.append(Check("wired limit", "info", "macOS's default (about 2/3 to 3/4 of memory may be wired for the GPU)",
                         "for a model near that size: sudo sysctl iogpu.wired_limit_mb=<MiB> (resets at reboot), "
                         "as mlx-lm's docs describe"))
    return out


# -- the cluster ----------------------------------------------------------------------------------
def ray_checks(dashboard: str | None, pids: list[int]) -> list[Check]:
    """Ray's version, the cluster's auth mode, and what its processes here listen on beyond loopback."""
    from . import exposure

    out = [Check("ray", "info", _version("ray"))]
    if dashboard is None:
        return [*out, Check("cluster", "info", "no Ray cluster runs here (`mlx-serving up` starts one)")]
    mode = exposure.ray_auth_mode(dashboard)
    if mode == "token":
        out.append(Check("ray auth", "ok", f"token auth on ({dashboard})"))
    elif mode == "disabled":
        out.append(Check("ray auth", "fix", "auth disabled: any host that reaches the GCS port can run code here",
                         "restart the cluster with RAY_AUTH_MODE=token (`mlx-serving up` and `cluster up` do)"))
    else:
        out.append(Check("ray auth", "info", f"unknown: the dashboard at {dashboard} did not say"))
    found = exposure.listeners(pids)
    beyond, loopback = exposure.split(found)
    serve_grpc = [x for x in beyond if x.process.startswith("ray::ServeReplica")]
    others = [x for x in beyond if x not in serve_grpc]
    if others:
        out.append(Check("listening beyond loopback", "fix" if mode != "token" else "info",
                         ", ".join(f"{x.process} {x}" for x in others),
                         "bind Ray to 127.0.0.1 on a single machine (`mlx-serving up` does)" if mode != "token" else None))
    else:
        out.append(Check("listening beyond loopback", "ok",
                         f"only Serve's replica gRPC ({len(serve_grpc)} socket(s), behind the Ray token); "
                         f"{len(loopback)} socket(s) on loopback"))
    return out


def inventory_checks(path: str | Path, labels_by_node: dict[str, dict[str, str]],
                     memory_by_host: dict[str, float], models_by_host: dict[str, set[str]] | None = None) -> list[Check]:
    """The inventory's hosts against the cluster's nodes (label ``host``), its plan, each host's
    memory for Ray against what the plan puts there, and (``models_by_host``: the hub models in each
    host's Hugging Face cache) whether each host holds the hub models planned on it."""
    from .fleet_cli import config_from_inventory, plan_errors

    try:
        fleet, planned, _ = config_from_inventory(Path(path))
    except plan_errors() as e:
        return [Check("plan", "fix", str(e), "fix the inventory (docs/fleet.md), or set footprint_gb for models "
                                             "that cannot be measured here")]
    out = [Check("plan", "ok", f"{len(planned.assignments)} replica(s) of {len(fleet.models)} model(s) on "
                               f"{len({a.host for a in planned.assignments})} host(s)")]
    present = {labels.get("host") for labels in labels_by_node.values()}
    missing = [h.name for h in fleet.hosts if h.name not in present]
    if missing:
        out.append(Check("nodes", "fix", f"host(s) of the inventory with no Ray node: {', '.join(missing)}",
                         "start them: `mlx-serving cluster up --inventory` prints each Mac's command"))
    else:
        out.append(Check("nodes", "ok", f"every host of the inventory has a node ({', '.join(h.name for h in fleet.hosts)})"))
    for host in sorted({a.host for a in planned.assignments}):
        need = sum(a.footprint_gb for a in planned.assignments if a.host == host)
        have = memory_by_host.get(host)
        if have is None:
            continue
        verdict: Verdict = "ok" if have >= need else "fix"
        out.append(Check(f"memory on {host}", verdict, f"plan {need:.1f} GB, Ray may use {have:.1f} GB",
                         None if verdict == "ok" else "free memory on that Mac, or move a model (hosts:)"))
    if models_by_host is not None:
        out += _model_presence(path, fleet, planned, models_by_host)
    return out


def _model_presence(path: str | Path, fleet: Any, planned: Any, models_by_host: dict[str, set[str]]) -> list[Check]:
    from engine.sources import is_hub_id

    sources = {m.name: m.source for m in fleet.models}
    absent: dict[str, list[str]] = {}
    for a in planned.assignments:
        source = sources[a.model]
        if a.host in models_by_host and is_hub_id(source) and source not in models_by_host[a.host]:
            absent.setdefault(source, []).append(a.host)
    if not absent:
        return [Check("models on hosts", "ok", "each host up holds the hub models planned on it")]
    return [Check(f"{source} on hosts", "info", f"not in the Hugging Face cache of {', '.join(sorted(set(hosts)))}: "
                  "their replicas download it when they start",
                  f"download it once and copy it over the cluster: mlx-serving models pull {source} --inventory {path}")
            for source, hosts in sorted(absent.items())]


def cluster_view(address: str) -> tuple[dict[str, dict[str, str]], dict[str, float], dict[str, set[str]]]:
    """Node labels, each host's memory for Ray (GB) and the hub models complete in each host's
    Hugging Face cache, from the running cluster."""
    import ray

    from .models_cli import hub_models_by_host

    ray.init(address=address, logging_level="ERROR")
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        labels = {n["NodeID"]: dict(n.get("Labels") or {}) for n in alive}
        memory: dict[str, float] = {}
        for n in alive:
            host = (n.get("Labels") or {}).get("host")
            if host:
                memory[host] = memory.get(host, 0.0) + float((n.get("Resources") or {}).get("memory", 0.0)) / 1e9
        held = {host: {m["repo_id"] for m in models if m["complete"]} for host, models in hub_models_by_host().items()}
        return labels, memory, held
    finally:
        ray.shutdown()


def report(checks: list[Check]) -> tuple[list[str], int]:
    lines = [line for c in checks for line in c.lines()]
    broken = sum(c.verdict == "fix" for c in checks)
    lines.append(f"{broken} thing(s) to fix" if broken else "nothing to fix")
    return lines, 1 if broken else 0


def run(inventory: str | None = None, address: str | None = None) -> int:
    """The checks ``doctor`` prints, for this machine and the cluster ``up``/``cluster up`` started here."""
    from . import exposure, fleet_cli, local

    checks = machine_checks() + memory_checks()
    cluster = fleet_cli.live_state()
    state = local.read_state()
    dashboard = state.dashboard_url if state else cluster.dashboard_url if cluster else None
    pids = (exposure.tree_pids(n.pid for n in cluster.nodes if n.pid) if cluster else exposure.user_ray_pids())
    checks += ray_checks(dashboard, pids)
    if inventory:
        where = address or (cluster.address if cluster else state.address if state else None)
        labels, memory, held = cluster_view(where) if where else ({}, {}, None)
        checks += inventory_checks(inventory, labels, memory, held)
    lines, rc = report(checks)
    print(*lines, sep="\n")
    return rc
