"""``mlx-serving up``, ``serve`` and ``down``: a local cluster (or the recorded one) serving a config."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from . import exposure, fleet_cli, local, nodes, serve_config


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


def print_security(deployed: dict[str, Any], dashboard: str, http: dict[str, Any], detail: bool) -> None:
    """Ray auth, API keys (counts) and the listening sockets of this machine's Ray processes."""
    cluster = fleet_cli.live_state()
    pids = exposure.tree_pids(n.pid for n in cluster.nodes if n.pid) if cluster else exposure.user_ray_pids()
    apps = [exposure.app_auth(a) for a in deployed.get("applications") or []
            if isinstance(a, dict) and a.get("import_path") == serve_config.BUILD_APP]
    mode = exposure.ray_auth_mode(dashboard) or (cluster.auth_mode if cluster else None)
    print(*exposure.report(ray_auth=mode, apps=apps, http_host=str(http.get("host", "127.0.0.1")),
                           http_port=int(http.get("port", 8000)), found=exposure.listeners(pids), detail=detail),
          sep="\n")


def cmd_serve(args: argparse.Namespace) -> int:
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
    return cmd_up(args, (label, config))


def cmd_up(args: argparse.Namespace, prepared: tuple[Path | str, dict[str, Any]] | None = None) -> int:
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
    print_security(deployed, dashboard, http, detail=False)
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


def cmd_down(args: argparse.Namespace) -> int:
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
