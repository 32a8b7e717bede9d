"""The ``mlx-serving`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from engine.demo import PRESETS

from . import exposure, fleet_cli, local, models_cli, nodes, serve_config, up_cli
from .doctor import run as doctor_run


def _cmd_make_demo(args: argparse.Namespace) -> int:
    if args.vision:
        from engine.demo_vision import make_demo_vision_model

        path = make_demo_vision_model(args.dir, force=args.force)
    else:
        from engine.demo import make_demo_model

        path = make_demo_model(args.dir, args.preset, force=args.force)
    print(path)
    return 0


def _check_file(path: str) -> tuple[str, list[str], list[str], list[str]]:
    """``(what the file is, problems, warnings, notes)``: a fleet inventory (a top-level ``hosts:``)
    is checked as one (``mlx-serving plan`` reads those), anything else as a Serve config. A sharded
    model's mode is checked against its architecture where the model is here (notes say where not)."""
    import yaml

    from . import shard_modes
    from .inventory import FleetError, parse_fleet

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        return "file", [str(e)], [], []
    if isinstance(data, dict) and "hosts" in data and "applications" not in data:
        try:
            fleet = parse_fleet(data, path)
        except FleetError as e:
            return "fleet inventory", [f"{loc or '<root>'}: {msg}" for loc, msg in e.problems], [], []
        found, notes = shard_modes.check(shard_modes.in_fleet(fleet))
        return f"fleet inventory: {len(fleet.hosts)} host(s), {len(fleet.models)} model(s)", found, [], notes
    if not isinstance(data, dict):
        return "file", [f"the top level must be a mapping: `applications:` (a Serve config) or `hosts:` "
                        f"(a fleet inventory), not {type(data).__name__}"], [], []
    # A warning, not an error: the key may come from MLX_SERVING_API_KEYS when `mlx-serving up` runs
    # (validate cannot see that environment), and `up` refuses the bind itself if it does not.
    try:
        warning = exposure.http_bind_problem(data, allowed_by_flag=False, at_up=False)
        found = serve_config.problems(data)  # shard modes included
    except ValueError as e:
        return "Serve config", [str(e)], [], []
    apps = data.get("applications") if isinstance(data.get("applications"), list) else []
    notes = [n for i, a in enumerate(apps) if isinstance(a, dict) and a.get("import_path") == serve_config.BUILD_APP
             for n in serve_config.shard_mode_problems(a, f"applications[{i}]")[1]]
    return "Serve config", found, [warning] if warning else [], notes


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        kind, found, warnings, unchecked = _check_file(path)
        if found:
            bad += 1
            print(f"{path}: {len(found)} problem(s)")
        else:
            notes = [kind] if kind.startswith("fleet") else []
            notes += [f"{len(warnings)} warning(s)"] if warnings else []
            notes += unchecked
            print(f"{path}: ok" + (f" ({'; '.join(notes)})" if notes else ""))
        for p in found:
            print(f"  - {p}")
        for w in warnings:
            print(f"  - warning: {w}")
    return 1 if bad else 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = local.read_state()
    cluster = fleet_cli.live_state()
    dashboard = args.dashboard if args.dashboard != _DEFAULT_DASHBOARD or state is None else state.dashboard_url
    if args.dashboard == _DEFAULT_DASHBOARD and state is None and cluster is not None:
        dashboard = cluster.dashboard_url
    try:
        details = local.serve_details(dashboard)
    except Exception as e:  # noqa: BLE001 - no cluster, no dashboard
        print(f"no Ray Serve reachable at {dashboard}: {e}", file=sys.stderr)
        return 1
    import ray

    ray.init(address=models_cli.cluster_address(args.address), logging_level="ERROR")
    hosts = {n["NodeID"]: (n.get("Labels") or {}).get("host", n.get("NodeManagerAddress")) for n in ray.nodes() if n.get("Alive")}
    print("hosts:")
    for node, host in sorted(hosts.items(), key=lambda kv: str(kv[1])):
        print(f"  {host:<24} node {node[:12]}")
    for app_name, app in (details.get("applications") or {}).items():
        print(f"application {app_name}: {app.get('status')}")
        for dep_name, dep in (app.get("deployments") or {}).items():
            print(f"  {dep_name}: {dep.get('status')}")
            for r in dep.get("replicas", []):
                print(f"    replica {r.get('replica_id', '')[:10]} {r.get('state'):<10} host={hosts.get(r.get('node_id'), r.get('node_ip'))} pid={r.get('pid')}")
    if state is not None:
        code, body = local.get_json(state.http_url + "/ready")
        ready = body if isinstance(body, dict) else {}
        print(f"ready: {ready.get('ready', False)} ({state.http_url})")
        for m in ready.get("models", []):
            flag = "NOT ready" if not m["ready"] else "DEGRADED" if m.get("degraded") else "ready"
            print(f"  model {m['name']}: {flag} ({m.get('detail', '')})")
        _print_qos(state.http_url)
    inventory = args.inventory or (cluster.inventory if cluster is not None else None)
    rc = 0
    if inventory:
        running: dict[str, list[str]] = {}
        for app in (details.get("applications") or {}).values():
            for dep_name, dep in (app.get("deployments") or {}).items():
                for r in dep.get("replicas", []):
                    host = hosts.get(r.get("node_id"))
                    if host is not None and r.get("state") in ("RUNNING", "STARTING", "UPDATING"):
                        tag = "" if r.get("state") == "RUNNING" else f" ({r.get('state').lower()})"
                        running.setdefault(host, []).append(dep_name.removeprefix("model-") + tag)
        rc = fleet_cli.print_memory_plan(inventory, {h: n for n, h in hosts.items()}, running)
    up_cli.print_security({"applications": [a.get("deployed_app_config") or {} for a in
                                      (details.get("applications") or {}).values()]},
                    dashboard, details.get("http_options") or {}, detail=True)
    return rc


def qos_lines(report: dict[str, Any]) -> list[str]:
    """``GET /qos`` for a person: each model's gate, SLOs and shedding, then the caller's key."""
    out = []
    for name, m in (report.get("models") or {}).items():
        waiting = sum((m.get("waiting") or {}).values())
        inflight = sum((m.get("inflight") or {}).values())
        scale = f", autoscaler target {m['autoscaling_target']}" if m.get("autoscaling_target") is not None else ""
        shed = ", SHEDDING batch requests" if m.get("shedding") else ""
        out.append(f"  model {name}: {inflight}/{m.get('capacity')} in flight, {waiting} waiting, "
                   f"{m.get('expired', 0)} expired in the queue{scale}{shed}")
        for slo, v in (m.get("slos") or {}).items():
            rates = v.get("burn_rate") or {}
            out.append(f"    slo {slo} (target {v.get('target')}): {'met' if v.get('met') else 'NOT met'}, burn rate "
                       f"5m {rates.get('5m', 0):.2f} / 1h {rates.get('1h', 0):.2f}, {v.get('bad_1h')} bad of "
                       f"{v.get('total_1h')} in the last hour")
    key = report.get("key")
    if key:
        limits = ", ".join(f"{k.removeprefix('x-ratelimit-')} {v}" for k, v in key.items() if k.startswith("x-ratelimit-"))
        out.append(f"  key {key['name']}: max priority {key['max_priority']}, {key['inflight']} in flight"
                   + (f", {limits}" if limits else ""))
    return out


def _print_qos(http_url: str) -> None:
    """The ingress's QoS view (with the first key of MLX_SERVING_API_KEYS when the API needs one)."""
    key = next((k.strip() for k in os.environ.get("MLX_SERVING_API_KEYS", "").split(",") if k.strip()), None)
    code, body = local.get_json(http_url + "/qos", headers={"Authorization": f"Bearer {key}"} if key else None)
    if code != 200 or not isinstance(body, dict):
        print(f"qos: unavailable (HTTP {code}{': set MLX_SERVING_API_KEYS' if code == 401 else ''})")
        return
    print("qos (one ingress replica's view; docs/qos.md):")
    for line in qos_lines(body):
        print(line)


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from deployments.http.auth import hash_key, new_key

    key = new_key()
    print(f"key:  {key}\nhash: {hash_key(key)}\n"
          "give the key to the client (Authorization: Bearer <key>); put the hash in the config's args.auth.api_keys "
          "(auth.admin_keys for an admin key; `app: {auth: ...}` in a fleet inventory), or the key in "
          "MLX_SERVING_API_KEYS (MLX_SERVING_ADMIN_KEYS) when running `mlx-serving up`, which deploys only its hash")
    return 0


def _cmd_keys_hash(args: argparse.Namespace) -> int:
    from deployments.http.auth import hash_key

    key = (sys.stdin.readline() if args.key == "-" else args.key).strip()
    if not key:
        print("no key given (`mlx-serving keys hash -` reads it from stdin)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.emit_config:
        return fleet_cli.emit_config(args.file, args.emit_config, failover=not args.no_failover)
    try:
        print(fleet_cli.load_plan(args.file)[1].as_table())  # demo:* sources are measured too
    except fleet_cli.plan_errors() as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


_DEFAULT_DASHBOARD = f"http://127.0.0.1:{local.DEFAULT_DASHBOARD_PORT}"


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    """Where ``up`` and ``serve`` deploy, and how they listen."""
    p.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--host", help="HTTP bind address (default: the config's, else 127.0.0.1)")
    p.add_argument("--address", help="join this Ray cluster instead of using or starting a local one")
    p.add_argument("--dashboard", default=_DEFAULT_DASHBOARD, help="Ray dashboard URL of that cluster")
    p.add_argument("--ray-port", type=int, default=local.DEFAULT_GCS_PORT)
    p.add_argument("--dashboard-port", type=int, default=local.DEFAULT_DASHBOARD_PORT)
    p.add_argument("--num-cpus", type=int, help="CPUs the local Ray head offers (default: all)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for /ready without progress (a download in progress counts as progress)")
    p.add_argument(exposure.ALLOW_FLAG, action="store_true",
                   help="serve HTTP on a non-loopback address with no API key (sets "
                        "args.auth.allow_unauthenticated_network: anyone who reaches the port may use the models)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-serving", description="Serve MLX models across a fleet of Macs on Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local Ray head if needed, deploy a config, wait until ready")
    up.add_argument("--config", help=f"a Ray Serve config file (default: {serve_config.DEFAULT_CONFIG})")
    up.add_argument("--inventory", help="a fleet inventory: deploy its models pinned where `mlx-serving plan` puts them")
    _cluster_flags(up)
    up.set_defaults(func=up_cli.cmd_up)

    serve = sub.add_parser("serve", help="serve one model, like `mlx_lm.server --model X`: a Serve config built in "
                                         "memory, deployed like `up` does")
    serve.add_argument("model", help="a local model directory, a hub id, or demo:PRESET")
    serve.add_argument("--name", help="the model's name in the API (default: the last part of MODEL; demo for demo:*)")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--hosts", help="comma-separated host names to pin the replicas to (Ray node label `host`)")
    serve.add_argument("--emit-config", metavar="FILE", help="also write the config to FILE, for `up --config FILE`")
    _cluster_flags(serve)
    serve.set_defaults(func=up_cli.cmd_serve, config=None, inventory=None)

    down = sub.add_parser("down", help="stop what `up` started, and nothing else")
    down.set_defaults(func=up_cli.cmd_down)

    status = sub.add_parser("status", help="deployments, replicas and their hosts, readiness, SLOs and admission")
    status.add_argument("--dashboard", default=_DEFAULT_DASHBOARD)
    status.add_argument("--address")
    status.add_argument("--inventory", help="also show this fleet's memory plan per host beside what runs there")
    status.set_defaults(func=_cmd_status)

    doctor = sub.add_parser("doctor", help="check this machine and its cluster; each problem with its fix (exit 1 "
                                           "when something must be fixed)")
    doctor.add_argument("--inventory", help="also check the cluster's nodes and memory against this fleet inventory")
    doctor.add_argument("--address", help="the Ray cluster to check against the inventory (default: the one started here)")
    doctor.set_defaults(func=lambda a: doctor_run(a.inventory, a.address))

    validate = sub.add_parser("validate", help="check config files; prints every problem with its path")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    plan = sub.add_parser("plan", help="print the memory plan of a fleet inventory")
    plan.add_argument("file")
    plan.add_argument("--emit-config", metavar="OUT", help="write a Ray Serve config pinning each model's replicas "
                      "to its planned hosts ('-' for stdout)")
    plan.add_argument("--no-failover", action="store_true",
                      help="with --emit-config: no fallback_hosts; replicas of a lost host wait for it to return")
    plan.set_defaults(func=_cmd_plan)

    fleet_cli.add_parsers(sub)

    keys = sub.add_parser("keys", help="API keys: make one, or hash one for the config")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    knew = ksub.add_parser("new", help="print a new API key and its hash")
    knew.set_defaults(func=_cmd_keys_new)
    khash = ksub.add_parser("hash", help="print the hash (sha256:...) of a key, the form the config holds")
    khash.add_argument("key", help="the key, or '-' to read it from stdin (keeps it out of the shell history)")
    khash.set_defaults(func=_cmd_keys_hash)

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    demo = msub.add_parser("make-demo", help="build an offline demo model (random weights, real architecture)")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    demo.add_argument("--vision", action="store_true", help="build the vision-language demo (qwen2_vl family)")
    demo.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    demo.set_defaults(func=_cmd_make_demo)
    models_cli.add_parsers(msub)
    return p


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    nodes.apply_client_env(fleet_cli.live_state())  # auth settings of a cluster `cluster up` started here
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
