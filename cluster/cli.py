"""The ``mlx-serving`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from engine.demo import PRESETS

from . import fleet_cli, local, nodes, serve_config


def _cmd_make_demo(args: argparse.Namespace) -> int:
    if args.vision:
        from engine.demo_vision import make_demo_vision_model

        path = make_demo_vision_model(args.dir, force=args.force)
    else:
        from engine.demo import make_demo_model

        path = make_demo_model(args.dir, args.preset, force=args.force)
    print(path)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            found = serve_config.problems(serve_config.load(path))
        except (OSError, ValueError) as e:
            found = [str(e)]
        if found:
            bad += 1
            print(f"{path}: {len(found)} problem(s)")
            for p in found:
                print(f"  - {p}")
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


def _cmd_up(args: argparse.Namespace) -> int:
    if args.inventory:  # a fleet inventory: plan it, pin every model's replicas to the planned hosts
        if args.config:
            print("give --config or --inventory, not both", file=sys.stderr)
            return 1
        path = Path(args.inventory)
        try:
            _, fleet_plan, config = fleet_cli.config_from_inventory(path)
        except fleet_cli.plan_errors() as e:
            print(str(e), file=sys.stderr)
            return 1
        print(fleet_plan.as_table())
    else:
        path = Path(args.config) if args.config else serve_config.DEFAULT_CONFIG
        config = serve_config.load(path)
    found = serve_config.problems(config)
    if found:
        print(f"{path} is not valid:", *(f"  - {p}" for p in found), sep="\n", file=sys.stderr)
        return 1
    http = config.setdefault("http_options", {})
    if args.port is not None:
        http["port"] = args.port
    if args.host is not None:
        http["host"] = args.host
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    http_url = f"http://{'127.0.0.1' if http['host'] in ('0.0.0.0', '::') else http['host']}:{http['port']}"

    previous = local.read_state()
    started_head = False
    cluster = None if args.address else fleet_cli.live_state()
    if args.address:
        address, dashboard = args.address, args.dashboard
    elif cluster is not None:  # nodes started by `cluster up` or an earlier `up`: its address, never "auto"
        address, dashboard = cluster.address, cluster.dashboard_url
        started_head = cluster.mode == "local"
        print(f"using the Ray cluster started by `mlx-serving {'up' if started_head else 'cluster up'}` "
              f"({address}, hosts {', '.join(n.host for n in cluster.nodes)})")
        if cluster.mode == "simulate" and config.get("proxy_location") != "HeadOnly":
            config["proxy_location"] = "HeadOnly"  # simulated hosts share this machine's HTTP port
            print("proxy_location: HeadOnly (simulated hosts share this machine)")
        fleet_cli.warn_missing_hosts(address, config)
        previous = None
    elif (existing := local.existing_cluster()) is not None:
        (address, auth_env), dashboard = existing, args.dashboard
        os.environ.update(auth_env)
        nodes.refresh_ray_auth()
        print(f"using the Ray cluster already running on this machine ({address})")
    else:
        print("starting a Ray head on this machine ...", flush=True)
        try:
            head = fleet_cli.start_local_head(port=args.ray_port, dashboard_port=args.dashboard_port,
                                              num_cpus=args.num_cpus, timeout=180.0)
        except (RuntimeError, TimeoutError) as e:
            print(f"could not start Ray: {e}", file=sys.stderr)
            return 1
        address, dashboard = head.address, head.dashboard_url
        started_head = True
    if previous is not None and not started_head:
        started_head = previous.started_head

    from engine import sources

    for a in serve_config.app_args(config):  # build demo models here first: errors show up now, not in a replica log
        for m in a.get("models", []):
            if sources.is_demo(m.get("source", "")):
                print(f"demo model {m['source']} at {sources.resolve(m['source'])}")

    print(f"deploying {path} ...", flush=True)
    local.deploy(dashboard, serve_config.for_deploy(config))  # routes into the router's user_config: edits apply live
    app_names = [a.get("name", "default") for a in config["applications"]]
    local.write_state(local.UpState(started_head=started_head, address=address, dashboard_url=dashboard,
                                    app_names=app_names, http_url=http_url))
    prefix = config["applications"][0].get("route_prefix", "/").rstrip("/")
    base = http_url + prefix
    try:
        body = local.wait_ready(base, args.timeout, progress=None)
    except TimeoutError as e:
        print(f"deployed, but {e}\nsee `mlx-serving status` and the Ray dashboard at {dashboard}", file=sys.stderr)
        return 1
    models = ", ".join(m["name"] for m in body.get("models", []))
    print(f"ready: {models}\n  OpenAI API: {base}/v1\n  Ray dashboard: {dashboard}\n"
          f"try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{body['models'][0]['name']}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state = local.read_state()
    if state is None:
        print("nothing to stop: `mlx-serving up` has not started anything here")
        return 0
    cluster = nodes.read_state()
    if state.started_head and cluster is not None and cluster.mode == "local":
        return fleet_cli.stop_cluster(cluster)
    if state.started_head:
        print("the Ray head `mlx-serving up` started is not running any more")
    else:
        import ray
        from ray import serve

        ray.init(address=state.address, logging_level="ERROR")
        for name in state.app_names:
            print(f"deleting Serve application {name!r}")
            serve.delete(name)
    local.state_file().unlink(missing_ok=True)
    return 0


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

    ray.init(address=args.address or (state.address if state else cluster.address if cluster else "auto"),
             logging_level="ERROR")
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
    inventory = args.inventory or (cluster.inventory if cluster is not None else None)
    if inventory:
        running: dict[str, list[str]] = {}
        for app in (details.get("applications") or {}).values():
            for dep_name, dep in (app.get("deployments") or {}).items():
                for r in dep.get("replicas", []):
                    host = hosts.get(r.get("node_id"))
                    if host is not None and r.get("state") in ("RUNNING", "STARTING", "UPDATING"):
                        tag = "" if r.get("state") == "RUNNING" else f" ({r.get('state').lower()})"
                        running.setdefault(host, []).append(dep_name.removeprefix("model-") + tag)
        return fleet_cli.print_memory_plan(inventory, {h: n for n, h in hosts.items()}, running)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-serving", description="Serve MLX models across a fleet of Macs on Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local Ray head if needed, deploy a config, wait until ready")
    up.add_argument("--config", help=f"a Ray Serve config file (default: {serve_config.DEFAULT_CONFIG})")
    up.add_argument("--inventory", help="a fleet inventory: deploy its models pinned where `mlx-serving plan` puts them")
    up.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    up.add_argument("--host", help="HTTP bind address (default: the config's, else 127.0.0.1)")
    up.add_argument("--address", help="join this Ray cluster instead of using or starting a local one")
    up.add_argument("--dashboard", default=_DEFAULT_DASHBOARD, help="Ray dashboard URL of that cluster")
    up.add_argument("--ray-port", type=int, default=local.DEFAULT_GCS_PORT)
    up.add_argument("--dashboard-port", type=int, default=local.DEFAULT_DASHBOARD_PORT)
    up.add_argument("--num-cpus", type=int, help="CPUs the local Ray head offers (default: all)")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /ready")
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop what `up` started, and nothing else")
    down.set_defaults(func=_cmd_down)

    status = sub.add_parser("status", help="deployments, replicas and their hosts, readiness")
    status.add_argument("--dashboard", default=_DEFAULT_DASHBOARD)
    status.add_argument("--address")
    status.add_argument("--inventory", help="also show this fleet's memory plan per host beside what runs there")
    status.set_defaults(func=_cmd_status)

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

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    demo = msub.add_parser("make-demo", help="build an offline demo model (random weights, real architecture)")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    demo.add_argument("--vision", action="store_true", help="build the vision-language demo (qwen2_vl family)")
    demo.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    demo.set_defaults(func=_cmd_make_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    nodes.apply_client_env(fleet_cli.live_state())  # auth settings of a cluster `cluster up` started here
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
