"""The ``mlx-serving`` command line."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from engine.demo import PRESETS

from . import exposure, fleet_cli, local, models_cli, nodes, serve_config
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


def _check_file(path: str) -> tuple[str, list[str], list[str]]:
    """``(what the file is, problems, warnings)``: a fleet inventory (a top-level ``hosts:``) is
    checked as one (``mlx-serving plan`` reads those), anything else as a Serve config."""
    import yaml

    from .inventory import FleetError, parse_fleet

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        return "file", [str(e)], []
    if isinstance(data, dict) and "hosts" in data and "applications" not in data:
        try:
            fleet = parse_fleet(data, path)
        except FleetError as e:
            return "fleet inventory", [f"{loc or '<root>'}: {msg}" for loc, msg in e.problems], []
        return f"fleet inventory: {len(fleet.hosts)} host(s), {len(fleet.models)} model(s)", [], []
    if not isinstance(data, dict):
        return "file", [f"the top level must be a mapping: `applications:` (a Serve config) or `hosts:` "
                        f"(a fleet inventory), not {type(data).__name__}"], []
    # A warning, not an error: the key may come from MLX_SERVING_API_KEYS when `mlx-serving up` runs
    # (validate cannot see that environment), and `up` refuses the bind itself if it does not.
    try:
        warning = exposure.http_bind_problem(data, allowed_by_flag=False, at_up=False)
        return "Serve config", serve_config.problems(data), [warning] if warning else []
    except ValueError as e:
        return "Serve config", [str(e)], []


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        kind, found, warnings = _check_file(path)
        if found:
            bad += 1
            print(f"{path}: {len(found)} problem(s)")
        else:
            notes = [kind] if kind.startswith("fleet") else []
            notes += [f"{len(warnings)} warning(s)"] if warnings else []
            print(f"{path}: ok" + (f" ({'; '.join(notes)})" if notes else ""))
        for p in found:
            print(f"  - {p}")
        for w in warnings:
            print(f"  - warning: {w}")
    return 1 if bad else 0


def _load_up_config(args: argparse.Namespace) -> tuple[Path, dict[str, Any]] | None:
    """The config ``up`` deploys (from ``--config`` or a planned ``--inventory``); None after saying why not."""
    if args.inventory:  # a fleet inventory: plan it, pin every model's replicas to the planned hosts
        if args.config:
            print("give --config or --inventory, not both", file=sys.stderr)
            return None
        path = Path(args.inventory)
        try:
            _, fleet_plan, config = fleet_cli.config_from_inventory(path)
        except fleet_cli.plan_errors() as e:
            print(str(e), file=sys.stderr)
            return None
        print(fleet_plan.as_table())
    else:
        path = Path(args.config) if args.config else serve_config.DEFAULT_CONFIG
        config = serve_config.load(path)
    found = serve_config.problems(config)
    if found:
        print(f"{path} is not valid:", *(f"  - {p}" for p in found), sep="\n", file=sys.stderr)
        return None
    return path, config


def _http_options(args: argparse.Namespace, config: dict[str, Any], cluster: nodes.ClusterState | None) -> dict[str, Any]:
    """``http_options`` after the flags: loopback unless told otherwise."""
    http = config.setdefault("http_options", {})
    if args.port is not None:
        http["port"] = args.port
    if args.host is not None:
        http["host"] = args.host
    elif args.inventory and cluster is not None and cluster.mode == "simulate" and http.get("host") is not None \
            and not exposure.is_loopback(str(http["host"])):
        http["host"] = "127.0.0.1"  # every simulated host is this machine: no client elsewhere needs the port
        print("http_options.host: 127.0.0.1 (simulated hosts: this machine only; --host to change)")
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    return http


def _ray_cluster(args: argparse.Namespace, config: dict[str, Any], cluster: nodes.ClusterState | None
                 ) -> tuple[str, str, bool] | None:
    """``(address, dashboard, this machine's head started by up)``: the cluster to deploy onto, started if
    needed; None after saying why not."""
    if args.address:
        return args.address, args.dashboard, False
    if cluster is not None:  # nodes started by `cluster up` or an earlier `up`: its address, never "auto"
        started_head = cluster.mode == "local"
        print(f"using the Ray cluster started by `mlx-serving {'up' if started_head else 'cluster up'}` "
              f"({cluster.address}, hosts {', '.join(n.host for n in cluster.nodes)})")
        if cluster.mode == "simulate" and config.get("proxy_location") != "HeadOnly":
            config["proxy_location"] = "HeadOnly"  # simulated hosts share this machine's HTTP port
            print("proxy_location: HeadOnly (simulated hosts share this machine)")
        fleet_cli.warn_missing_hosts(cluster.address, config)
        return cluster.address, cluster.dashboard_url, started_head
    if (existing := local.existing_cluster(say=_say)) is not None:
        (address, auth_env), dashboard = existing, args.dashboard
        os.environ.update(auth_env)
        nodes.refresh_ray_auth()
        print(f"using the Ray cluster already running on this machine ({address})")
        return address, dashboard, False
    print(f"starting a Ray head on this machine (GCS 127.0.0.1:{args.ray_port}, dashboard "
          f"127.0.0.1:{args.dashboard_port}) ...", flush=True)
    t0 = time.monotonic()
    try:
        head = fleet_cli.start_local_head(port=args.ray_port, dashboard_port=args.dashboard_port,
                                          num_cpus=args.num_cpus, timeout=180.0)
    except (RuntimeError, TimeoutError) as e:
        print(f"could not start Ray: {e}", file=sys.stderr)
        return None
    print(f"Ray head up in {time.monotonic() - t0:.0f} s", flush=True)
    return head.address, head.dashboard_url, True


def _say(line: str) -> None:
    print(line, flush=True)


def _ray_client_env(dashboard: str, cluster: nodes.ClusterState | None) -> dict[str, str]:
    """What a shell needs for Ray's own CLI (`serve deploy FILE`, `serve status`, `ray status`) to
    reach the cluster ``up`` deployed onto (``cluster``: the one recorded here, if it is that one).
    Ray's CLI sends the token only with ``RAY_AUTH_MODE=token`` (Ray 2.60 has no other switch, and
    the dashboard accepts no request without it); and `serve` looks for the dashboard at
    localhost:8265 unless told."""
    env = cluster.client_env() if cluster is not None else {
        k: v for k, v in os.environ.items() if k in (nodes.AUTH_MODE_ENV, nodes.TOKEN_PATH_ENV, nodes.OSX_CLUSTER_ENV)}
    if exposure.ray_auth_mode(dashboard) == "token":
        env[nodes.AUTH_MODE_ENV] = "token"
    if dashboard.rstrip("/") not in (f"http://{h}:{local.DEFAULT_DASHBOARD_PORT}" for h in ("127.0.0.1", "localhost")):
        env["RAY_DASHBOARD_ADDRESS"] = dashboard.rstrip("/")
    return env


def _model_phases(config: dict[str, Any]) -> None:
    """Build the demo models here, before the replicas look for them (errors show now, not in a
    replica log), and say where every other model comes from."""
    from engine import sources

    seen: set[str] = set()
    for a in serve_config.app_args(config):
        for m in a.get("models", []):
            src = str(m.get("source", ""))
            if src in seen:
                continue
            seen.add(src)
            if sources.is_demo(src):
                print(f"demo model {src} at {sources.demo_dir(src)} (built offline if missing) ...", flush=True)
                sources.resolve(src)
            elif sources.is_hub_id(src):
                print(f"model {m.get('name')}: {src} loads from the Hugging Face cache of the host that runs each "
                      "replica, downloaded there first if missing (progress below)", flush=True)


def _print_security(deployed: dict[str, Any], dashboard: str, http: dict[str, Any], detail: bool) -> None:
    """Ray auth, API keys (counts) and the listening sockets of this machine's Ray processes."""
    cluster = fleet_cli.live_state()
    pids = exposure.tree_pids(n.pid for n in cluster.nodes if n.pid) if cluster else exposure.user_ray_pids()
    apps = [exposure.app_auth(a) for a in deployed.get("applications") or []
            if isinstance(a, dict) and a.get("import_path") == serve_config.BUILD_APP]
    mode = exposure.ray_auth_mode(dashboard) or (cluster.auth_mode if cluster else None)
    print(*exposure.report(ray_auth=mode, apps=apps, http_host=str(http.get("host", "127.0.0.1")),
                           http_port=int(http.get("port", 8000)), found=exposure.listeners(pids), detail=detail),
          sep="\n")


def _cmd_serve(args: argparse.Namespace) -> int:
    """``up`` with a config built in memory for one model (``--emit-config`` writes it out)."""
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else None
    config = serve_config.one_model(args.model, name=args.name, replicas=args.replicas, hosts=hosts)
    for flag in ("port", "host"):  # in the config, so --emit-config writes what runs
        if getattr(args, flag) is not None:
            config["http_options"][flag] = getattr(args, flag)
    found = serve_config.problems(config)
    if found:
        print("cannot serve that:", *(f"  - {p}" for p in found), sep="\n", file=sys.stderr)
        return 1
    label = f"`mlx-serving serve {args.model}`"
    if args.emit_config:
        import yaml

        Path(args.emit_config).write_text(
            f"# written by {label}: `mlx-serving up --config {args.emit_config}` deploys it again\n"
            + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        print(f"wrote {args.emit_config}")
        label = args.emit_config
    return _cmd_up(args, (label, config))


def _cmd_up(args: argparse.Namespace, prepared: tuple[Path | str, dict[str, Any]] | None = None) -> int:
    loaded = prepared or _load_up_config(args)
    if loaded is None:
        return 1
    path, config = loaded
    cluster = None if args.address else fleet_cli.live_state()
    http = _http_options(args, config, cluster)
    problem = exposure.http_bind_problem(config, allowed_by_flag=args.allow_unauthenticated_network)
    if problem:  # before anything starts
        print(f"refusing to deploy: {problem}", file=sys.stderr)
        return 1
    if args.allow_unauthenticated_network:
        exposure.allow_unauthenticated_network(config)
    http_url = f"http://{'127.0.0.1' if http['host'] in ('0.0.0.0', '::') else http['host']}:{http['port']}"

    previous = None if cluster is not None else local.read_state()
    found = _ray_cluster(args, config, cluster)
    if found is None:
        return 1
    address, dashboard, started_head = found
    if previous is not None and not started_head:
        started_head = previous.started_head

    _model_phases(config)

    print(f"deploying {path} ...", flush=True)
    deployed = serve_config.for_deploy(config)  # routes and key hashes into user_configs: edits apply live
    local.deploy(dashboard, deployed)
    app_names = [a.get("name", "default") for a in config["applications"]]
    ray_env = _ray_client_env(dashboard, None if args.address else fleet_cli.live_state())
    auth_env = {k: v for k, v in ray_env.items() if k != "RAY_DASHBOARD_ADDRESS"}
    local.write_state(local.UpState(started_head=started_head, address=address, dashboard_url=dashboard,
                                    app_names=app_names, http_url=http_url, client_env=auth_env))
    prefix = config["applications"][0].get("route_prefix", "/").rstrip("/")
    base = http_url + prefix
    names = [m["name"] for a in serve_config.app_args(config)[:1] for m in a.get("models", [])]
    print(f"waiting for the replicas of {', '.join(names)} to load (a hub model downloads first) ...", flush=True)
    printer = local.ReadyPrinter()
    try:
        body = local.wait_ready(base, args.timeout, progress=printer, models=names)
    except TimeoutError as e:
        print(f"deployed, but {e}\nsee `mlx-serving status` and the Ray dashboard at {dashboard}", file=sys.stderr)
        return 1
    finally:
        printer.close()
    models = ", ".join(m["name"] for m in body.get("models", []))
    keyed = any(exposure.app_auth(a).api_keys for a in deployed["applications"])
    key = " -H 'Authorization: Bearer YOUR_KEY'" if keyed else ""
    print(f"ready: {models}\n  OpenAI API: {base}/v1\n  Ray dashboard: {dashboard}"
          + (f" (it asks for the Ray token: the contents of {nodes.token_path()})"
             if ray_env.get(nodes.AUTH_MODE_ENV) == "token" and not os.environ.get(nodes.TOKEN_ENV) else "")
          + f"\ntry:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{key} "
          f"-d '{{\"model\": \"{body['models'][0]['name']}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
    if ray_env:
        print("Ray's own CLI (serve deploy FILE, serve status, ray status) reaches this cluster once the shell has:\n"
              f"  export {' '.join(f'{k}={shlex.quote(v)}' for k, v in ray_env.items())}")
    _print_security(deployed, dashboard, http, detail=False)
    return 0


def _drain_serve(state: local.UpState) -> bool:
    """Delete every Serve application of the head `up` started, before the head stops; False when
    Serve did not answer.

    The replicas then stop as Serve stops them on a redeploy: each once its in-flight requests are
    done, or its ``graceful_shutdown_timeout_s`` has run out, so no request is cut short. What is left
    takes Ray's node drain no time: a SIGTERMed node waits up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
    (30 s) only for the actors still on it, and on a one-node cluster nothing would ever take them over.
    """
    try:
        details = local.serve_details(state.dashboard_url)
    except Exception as e:  # noqa: BLE001 - a dashboard gone: the head's own drain still bounds the stop
        print(f"Serve did not answer at {state.dashboard_url} ({str(e).splitlines()[0] if str(e) else e}); "
              "Ray drains the head for up to 30 s when it stops")
        return False
    apps = list(details.get("applications") or {})
    if not apps:
        return True
    bound = local.drain_bound_s(details)
    wait = f"up to {bound:.0f} s" if bound is not None else "their graceful_shutdown_timeout_s"
    print(f"deleting the Serve application(s) {', '.join(apps)}: waiting {wait} for in-flight requests to "
          "drain ...", flush=True)
    t0 = time.monotonic()
    try:
        local.delete_apps(state.dashboard_url)
    except Exception as e:  # noqa: BLE001 - the head stops anyway; its own drain bounds that
        print(f"  Serve did not delete them ({str(e).splitlines()[0] if str(e) else e}); Ray drains the head for "
              "up to 30 s when it stops", flush=True)
        return False
    print(f"  deleted in {time.monotonic() - t0:.0f} s", flush=True)
    return True


def _cmd_down(args: argparse.Namespace) -> int:
    state = local.read_state()
    if state is None:
        print("nothing to stop: `mlx-serving up` has not started anything here")
        return 0
    cluster = nodes.read_state()
    if state.started_head and cluster is not None and cluster.mode == "local":
        drained = _drain_serve(state)
        print(f"stopping the local Ray head `mlx-serving up` started ({cluster.address})"
              + ("; Serve is gone, so Ray's node drain has nothing to wait for" if drained else ""), flush=True)
        return fleet_cli.stop_cluster(cluster)
    if state.started_head:
        print("the Ray head `mlx-serving up` started is not running any more")
    else:  # someone else's cluster: delete our applications, leave the rest
        import ray
        from ray import serve

        os.environ.update(state.client_env)
        nodes.refresh_ray_auth()
        try:
            bound = local.drain_bound_s(local.serve_details(state.dashboard_url), state.app_names)
        except Exception:  # noqa: BLE001 - only for the message
            bound = None
        wait = f"up to {bound:.0f} s" if bound is not None else "its graceful_shutdown_timeout_s"
        print(f"connecting to the Ray cluster at {state.address} ...", flush=True)
        ray.init(address=state.address, logging_level="ERROR")
        for name in state.app_names:
            print(f"deleting Serve application {name!r}: waiting {wait} for in-flight requests to drain ...",
                  flush=True)
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
    _print_security({"applications": [a.get("deployed_app_config") or {} for a in
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
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="serve one model, like `mlx_lm.server --model X`: a Serve config built in "
                                         "memory, deployed like `up` does")
    serve.add_argument("model", help="a local model directory, a hub id, or demo:PRESET")
    serve.add_argument("--name", help="the model's name in the API (default: the last part of MODEL; demo for demo:*)")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--hosts", help="comma-separated host names to pin the replicas to (Ray node label `host`)")
    serve.add_argument("--emit-config", metavar="FILE", help="also write the config to FILE, for `up --config FILE`")
    _cluster_flags(serve)
    serve.set_defaults(func=_cmd_serve, config=None, inventory=None)

    down = sub.add_parser("down", help="stop what `up` started, and nothing else")
    down.set_defaults(func=_cmd_down)

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
