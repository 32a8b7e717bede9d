"""``mlx-serving cluster ...``, ``plan --emit-config`` and the fleet parts of ``up`` and ``status``."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from engine.sources import cache_dir

from . import agents, agents_cli, exposure, local, nodes
from .nodes import ClusterState, NodeRecord


LOOPBACK = nodes.LOOPBACK


def _err(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 1


# -- plan -> Serve config ---------------------------------------------------------------------------

def load_plan(inventory: str | Path) -> tuple[Any, Any]:
    """``(fleet, plan)``; raises ``FleetError`` / ``PlacementError`` with the message to show."""
    from .inventory import load_fleet
    from .pins import weight_bytes
    from .placement import plan

    fleet = load_fleet(inventory)
    return fleet, plan(fleet, weight_bytes=weight_bytes)


def plan_errors() -> tuple[type[Exception], ...]:
    from .inventory import FleetError
    from .placement import FootprintError, PlacementError

    return FleetError, PlacementError, FootprintError


def config_from_inventory(inventory: str | Path, *, failover: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    from .pins import serve_config

    fleet, plan = load_plan(inventory)
    return fleet, plan, serve_config(fleet, plan, failover=failover)


def emit_config(inventory: str, out: str, *, failover: bool = True) -> int:
    from . import serve_config
    from .pins import header

    try:
        fleet, plan, config = config_from_inventory(inventory, failover=failover)
    except plan_errors() as e:
        return _err(str(e))
    found = serve_config.problems(config)
    if found:  # e.g. a bad `deployment:` field of a model: say where it came from
        return _err(f"the config made from {inventory} is not valid:\n" + "\n".join(f"  - {p}" for p in found))
    text = header(inventory, plan) + yaml.safe_dump(config, sort_keys=False, width=1000)
    if out == "-":
        sys.stdout.write(text)
    else:
        Path(out).write_text(text)
        print(plan.as_table())
        print(f"wrote {out}")
    return 0


def warn_missing_hosts(address: str, config: dict[str, Any]) -> None:
    """Say which pinned hosts have no Ray node: their replicas would wait for them."""
    from . import serve_config

    try:
        alive = nodes.alive_hosts(address)
    except Exception:  # noqa: BLE001 - only a warning
        return
    for a in serve_config.app_args(config):
        for m in a.get("models", []):
            pinned = list(m.get("hosts") or []) + list((m.get("shard") or {}).get("hosts") or [])
            missing = [h for h in pinned if h not in alive]
            if missing and m.get("shard"):
                print(f"warning: model {m.get('name')} (sharded across {', '.join(m['shard'].get('hosts') or [])}): "
                      f"host(s) {', '.join(missing)} have no Ray node; it waits for all of them; hosts up: "
                      f"{', '.join(sorted(alive)) or 'none'}", file=sys.stderr)
            elif missing:
                spare = [h for h in m.get("fallback_hosts") or [] if h in alive]
                then = f"they go to {', '.join(spare)} if there is room" if spare else "they wait for those hosts"
                print(f"warning: model {m.get('name')}: host(s) {', '.join(missing)} have no Ray node ({then}); "
                      f"hosts up: {', '.join(sorted(alive)) or 'none'}", file=sys.stderr)


# -- cluster up / down ------------------------------------------------------------------------------

def live_state() -> ClusterState | None:
    """The recorded cluster, if its head (started here) still runs."""
    state = nodes.read_state()
    if state is None:
        return None
    heads = [n for n in state.nodes if n.head]
    if heads and heads[0].pid is not None and nodes.alive(heads[0]):
        return state
    return None


def _node_env(auth: str, loopback: bool = False) -> dict[str, str]:
    """This environment plus what a fleet node needs (OpenBLAS on Linux, multi-node macOS, auth mode)."""
    return local.child_env(nodes.node_env(auth, loopback))  # type: ignore[arg-type]


def _logs_dir() -> Path:
    return cache_dir() / "cluster"


def _start_and_wait(records: list[NodeRecord], env: dict[str, str], address: str, timeout: float,
                    on_started: Any = None, retries: int = 1) -> None:
    """Start the nodes, record them (``on_started``: `cluster down` can stop them from then on), wait.

    A node that exits while starting is started again ``retries`` times: on a busy machine a raylet
    can miss the 30 s Ray gives it to register.
    """
    procs = {}
    left = {r.host: retries for r in records}

    def start(r: NodeRecord) -> None:
        procs[r.host] = nodes.start_local(r.argv, env, Path(r.log or _logs_dir() / f"{r.host}.log"))
        r.pid = procs[r.host].pid

    for r in records:
        start(r)
    if on_started is not None:
        on_started()

    def failed() -> str | None:
        for r in records:
            if procs[r.host].poll() is None:  # our child: poll() is exact, no pid guessing
                continue
            if left[r.host] > 0 and not r.head:
                left[r.host] -= 1
                print(f"{r.host}: the Ray node exited while starting; starting it again", file=sys.stderr, flush=True)
                start(r)
                if on_started is not None:
                    on_started()
                continue
            return f"the Ray node of {r.host} exited; its log ({r.log}) ends with:\n{nodes.log_tail(r.log)}"
        return None

    nodes.wait_for_hosts(address, [r.host for r in records], timeout, failed)


def _check_ports(*ports: int) -> str | None:
    busy = [p for p in ports if not nodes.port_free(p)]
    if busy:
        return f"port(s) {', '.join(map(str, busy))} are in use on this machine (another Ray?); choose others with --port / --dashboard-port"
    return None


def _ensure_auth(dry_run: bool = False) -> str | None:
    """The token file (made if missing; None when the token is in ``RAY_AUTH_TOKEN``); turns token
    auth on for this process, which talks to the GCS next. Every node we start uses token auth: Ray's
    GCS listens on every interface whatever address it is given."""
    if dry_run:
        return None if os.environ.get(nodes.TOKEN_ENV) else str(nodes.token_path())
    os.environ[nodes.AUTH_MODE_ENV] = "token"
    nodes.refresh_ray_auth()
    return nodes.ensure_token()


def cmd_up(args: argparse.Namespace) -> int:
    if (args.simulate is None) == (args.inventory is None):
        return _err("give --inventory FILE (a fleet of Macs) or --simulate N (N hosts on this machine)")
    if args.auth != "token":  # a fleet head is reachable from the LAN by design
        return _err(exposure.ray_auth_refusal(
            "start a fleet's Ray nodes", "A fleet's head is reachable from the LAN by design (the other Macs join "
            "through it): `cluster up` always uses token auth; leave out --auth disabled."))
    if live_state() is not None:
        state = nodes.read_state()
        assert state is not None
        by = "mlx-serving up" if state.mode == "local" else "mlx-serving cluster up"
        return _err(f"a cluster started by `{by}` is running ({state.address}, hosts "
                    f"{', '.join(n.host for n in state.nodes)}); stop it first with `mlx-serving cluster down`")
    if args.simulate is not None:
        return _up_simulate(args)
    return _up_inventory(args)


def _up_simulate(args: argparse.Namespace) -> int:
    n = args.simulate
    if n < 1:
        return _err("--simulate needs at least 1 host")
    if args.dry_run:
        for i in range(1, n + 1):
            print(nodes.shell_line(nodes.node_env("token", loopback=True),
                                   _sim_argv(args, i, f"{LOOPBACK}:{args.port}", nodes.free_port())))
        return 0
    problem = _check_ports(args.port, args.dashboard_port)
    if problem:
        return _err(problem)
    token = _ensure_auth()
    env = _node_env("token", loopback=True)  # every simulated host is this machine: all of Ray on 127.0.0.1
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")  # a simulated host drains for 5 s, not 30
    address = f"{LOOPBACK}:{args.port}"
    client_port = nodes.free_port()
    logs = _logs_dir()
    records = [NodeRecord(host=f"sim-{i}", head=i == 1, argv=_sim_argv(args, i, address, client_port),
                          log=str(logs / f"sim-{i}.log")) for i in range(1, n + 1)]
    for r in records:
        Path(r.log or "").unlink(missing_ok=True)
    state = ClusterState(mode="simulate", address=address, dashboard_url=f"http://127.0.0.1:{args.dashboard_port}",
                         auth_mode="token", token_path=token, temp_dir=args.temp_dir, nodes=records)
    t0 = time.monotonic()
    print(f"starting {n} simulated host(s) on this machine: {', '.join(r.host for r in records)} ...", flush=True)
    try:
        # One at a time: raylets starting together in one session directory can race for the same
        # socket name (one then dies with "bind: Address already in use").
        for r in records:
            _start_and_wait([r], env, address, args.timeout, on_started=lambda: nodes.write_state(state))
    except (RuntimeError, TimeoutError, KeyboardInterrupt) as e:
        print(f"cluster up failed: {e}", file=sys.stderr)
        _stop_records(records)
        nodes.state_file().unlink(missing_ok=True)
        return 1
    nodes.write_state(state)
    print(f"up in {time.monotonic() - t0:.0f}s: {n} Ray node(s), each labelled host=sim-<i> with resource host:sim-<i>")
    _print_next_steps(state)
    return 0


def _sim_argv(args: argparse.Namespace, i: int, address: str, client_port: int) -> list[str]:
    return nodes.loopback_node_argv(nodes.ray_start_argv(
        host=f"sim-{i}", head=i == 1, address=address, port=args.port, dashboard_port=args.dashboard_port,
        client_port=client_port, node_ip=LOOPBACK, num_cpus=args.num_cpus, temp_dir=args.temp_dir, block=True,
        ray=local.ray_bin(), same_machine=True))


def _print_next_steps(state: ClusterState) -> None:
    env = " ".join(f"{k}={v}" for k, v in state.client_env().items())
    print(f"  Ray address:   {state.address}\n  Ray dashboard: {state.dashboard_url}\n"
          f"  state file:    {nodes.state_file()}\n"
          f"next:\n  mlx-serving up --inventory FLEET.yaml     # or --config SERVE.yaml; uses this cluster\n"
          f"  mlx-serving status\n  mlx-serving cluster down                  # stops these nodes and nothing else\n"
          f"other Ray tools need: {env} ray status --address {state.address}")


def _up_inventory(args: argparse.Namespace) -> int:
    from .inventory import load_fleet

    try:
        fleet = load_fleet(args.inventory)
    except plan_errors() as e:
        return _err(str(e))
    head = fleet.host(fleet.head)
    here = args.this_host or (head.name if nodes.is_local_address(head.address) else None)
    if here is not None and here != head.name:
        return _err(f"this machine is {here!r} but the inventory's head is {head.name!r}: run "
                    f"`mlx-serving cluster up` on {head.name} ({head.address})")
    if here is None and not args.dry_run:
        return _err(f"this machine is not the inventory's head {head.name!r} ({head.address}); run this on it, or "
                    "pass --this-host if its address is reached through a name this machine does not know")
    address = nodes.gcs_address(fleet, args.port)  # as the other Macs reach it
    local_address = f"{nodes.resolve(head.address)}:{args.port}"  # as this machine's clients do
    token = _ensure_auth(args.dry_run)
    ray = local.ray_bin()
    workers = [h for h in fleet.hosts if h.name != head.name]
    agents_note = ""
    if args.write_agents:  # written before anything starts: a bad --remote-ray stops the command here
        try:
            agents_note = agents_cli.write_agents_note(fleet, args, token)
        except (agents.AgentError, OSError) as e:
            return _err(f"--write-agents: {e}")

    launcher = Path(args.launcher_yaml or (_logs_dir() / "ray-up.yaml"))
    if not args.dry_run:
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text(nodes.launcher_yaml(fleet, port=args.port, dashboard_port=args.dashboard_port,
                                                auth_mode="token", ray=args.remote_ray))

    head_line = nodes.shell_line(nodes.node_env("token"), nodes.head_argv(
        fleet, port=args.port, dashboard_port=args.dashboard_port, dashboard_host=args.dashboard_host, ray="ray"))
    print(f"fleet {args.inventory}: head {head.name} at {address}; usable memory: {nodes.memory_summary(fleet)}")
    print(f"token authentication on: the token is {token or '$' + nodes.TOKEN_ENV} (keep it secret); "
          "every Mac needs a copy")
    record = NodeRecord(host=head.name, head=True, log=str(_logs_dir() / f"{head.name}.log"), argv=nodes.head_argv(
        fleet, port=args.port, dashboard_port=args.dashboard_port, dashboard_host=args.dashboard_host, ray=ray,
        block=True))
    state = ClusterState(mode="inventory", address=local_address, dashboard_url=f"http://127.0.0.1:{args.dashboard_port}",
                         auth_mode="token", token_path=token, inventory=str(Path(args.inventory).resolve()),
                         nodes=[record])
    if args.dry_run:
        print(f"\non {head.name} (this command would start it):\n  {head_line}")
    else:
        problem = _check_ports(args.port, args.dashboard_port)
        if problem:
            return _err(problem)
        print(f"starting the Ray head ({head.name}) ...", flush=True)
        try:
            _start_and_wait([record], _node_env("token"), local_address, args.timeout,
                            on_started=lambda: nodes.write_state(state))
        except (RuntimeError, TimeoutError, KeyboardInterrupt) as e:
            _stop_records([record])
            nodes.state_file().unlink(missing_ok=True)
            return _err(f"the Ray head did not start: {e}")
        nodes.write_state(state)
        print(f"head up: {address}, dashboard {state.dashboard_url}")

    if agents_note:
        print(f"\n{agents_note}")
    if workers and args.ssh:
        started = _ssh_start(fleet, workers, args, token, dry_run=args.dry_run)
        if not args.dry_run:
            state.nodes.extend(started)
            nodes.write_state(state)
            try:
                nodes.wait_for_hosts(local_address, [h.name for h in fleet.hosts], args.timeout)
                print(f"all {len(fleet.hosts)} hosts joined")
            except TimeoutError as e:
                print(f"not every host joined: {e}; see {nodes.REMOTE_LOG} on them", file=sys.stderr)
                return 1
    elif workers and not agents_note:  # with agents, the note below says how to start the Macs
        print("\nstart the other Macs (each line as it is; `ray` from the same mlx-serving install):")
        for h in workers:
            print(f"\n# {h.name} ({h.chip}, {h.usable_gb:.1f} GB usable)")
            print(f"{nodes.token_copy_line(h, token)}     # from this machine: copies the token")
            line = nodes.shell_line(nodes.node_env("token"), nodes.worker_argv(fleet, h, port=args.port, ray=args.remote_ray))
            print(f"ssh {shlex.quote(nodes.ssh_target(h))}  # then, on {h.name}:\n{line}")
        print("\n(`mlx-serving cluster up --inventory FILE --ssh` runs these for you; stop a Mac started by hand "
              "with `ray stop` on it.)")
    if not args.dry_run:
        print(f"\nRay cluster launcher config (for `ray up`): {launcher}")
        _print_next_steps(state)
    return 0


def _ssh_start(fleet: Any, workers: list[Any], args: argparse.Namespace, token: str | None,
               *, dry_run: bool) -> list[NodeRecord]:
    out = []
    for h in workers:
        remote = nodes.remote_start_command(fleet, h, port=args.port, auth_mode="token", ray=args.remote_ray)
        if dry_run:
            print(nodes.token_copy_line(h, token))
            print(shlex.join(nodes.ssh_argv(h, remote)))
            continue
        try:
            secret = Path(token).read_bytes() if token else os.environ[nodes.TOKEN_ENV].encode()
            res = subprocess.run(nodes.ssh_argv(h, "mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token"),
                                 input=secret, capture_output=True, timeout=60)
            if res.returncode != 0:
                print(f"{h.name}: copying the token failed: {res.stderr.decode(errors='replace').strip()}",
                      file=sys.stderr)
                continue
            res = subprocess.run(nodes.ssh_argv(h, remote), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=60)
        except subprocess.TimeoutExpired:
            print(f"{h.name}: ssh did not return within a minute; start it by hand (`--dry-run` prints how)",
                  file=sys.stderr)
            continue
        pid = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        if res.returncode != 0 or not pid.isdigit():
            print(f"{h.name}: starting Ray over ssh failed: {res.stderr.strip() or res.stdout.strip()}", file=sys.stderr)
            continue
        print(f"{h.name}: ray start running over ssh as pid {pid} (log {nodes.REMOTE_LOG} there)")
        out.append(NodeRecord(host=h.name, ssh=nodes.ssh_target(h), remote_pid=int(pid)))
    return out


def _stop_records(records: list[NodeRecord], *, hard: bool = False, timeout: float = 30.0) -> None:
    """Stop nodes we started: the workers first (local ones together: SIGTERM, SIGKILL after
    ``timeout``; remote ones over ssh, SIGTERM to the ``ray start --block`` we launched there), then
    the head, so that every worker can still drain through it."""
    def stop(r: NodeRecord) -> None:
        if r.pid is not None:
            nodes.stop_local(r, hard=hard, timeout=timeout)
        elif r.ssh and r.remote_pid:
            subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", r.ssh,
                            f"kill -TERM {r.remote_pid}"], capture_output=True, timeout=60)

    workers = [r for r in records if not r.head]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
        list(pool.map(stop, workers))
    for r in records:
        if r.head:
            stop(r)


def cmd_down(args: argparse.Namespace) -> int:
    state = nodes.read_state()
    if state is None:
        print("nothing to stop: `mlx-serving cluster up` has not started anything here")
        return 0
    return stop_cluster(state)


def stop_cluster(state: ClusterState) -> int:
    """Stop the recorded nodes and nothing else, then forget them (and what `up` deployed on them)."""
    names = ", ".join(n.host for n in state.nodes)
    print(f"stopping the Ray node(s) started here: {names} ...", flush=True)
    _stop_records(state.nodes)
    still = [r.host for r in state.nodes if r.pid is not None and nodes.alive(r)]
    if still:
        return _err(f"still running: {', '.join(still)}")
    nodes.state_file().unlink(missing_ok=True)
    up = local.read_state()
    if up is not None and up.address == state.address:  # `mlx-serving up` deployed onto it: nothing left of that
        local.state_file().unlink(missing_ok=True)
    print("stopped")
    return 0


def start_local_head(*, port: int, dashboard_port: int, num_cpus: int | None, timeout: float) -> ClusterState:
    """The one-machine cluster of `mlx-serving up`: a head labelled with this machine's name, run as
    `ray start --block` in its own process group and recorded, so `down` stops it and no other Ray.

    Every Ray process of it listens on 127.0.0.1 only (``nodes.LOOPBACK_ENV`` says how), and it runs
    with token auth too (a token is made if missing): ``RAY_AUTH_MODE=disabled`` in this environment
    is refused.
    """
    if os.environ.get(nodes.AUTH_MODE_ENV, "token") != "token":
        raise RuntimeError(exposure.ray_auth_refusal(
            f"start a Ray head ({nodes.AUTH_MODE_ENV}={os.environ[nodes.AUTH_MODE_ENV]} in this environment)",
            f"Unset {nodes.AUTH_MODE_ENV} (or set it to token): `mlx-serving up` then starts the head with token auth, "
            f"making a token in {nodes.token_path()} if there is none."))
    problem = _check_ports(port, dashboard_port)
    if problem:
        raise RuntimeError(problem)
    token = _ensure_auth()
    host = local.host_label()
    address = f"{LOOPBACK}:{port}"
    record = NodeRecord(host=host, head=True, log=str(_logs_dir() / "head.log"), argv=nodes.ray_start_argv(
        host=host, head=True, port=port, dashboard_port=dashboard_port, dashboard_host=LOOPBACK,
        client_port=nodes.free_port(), node_ip=LOOPBACK, num_cpus=num_cpus, block=True, ray=local.ray_bin(),
        same_machine=True))  # no fixed agent/worker ports: another Ray may run here
    Path(record.log or "").unlink(missing_ok=True)
    state = ClusterState(mode="local", address=address, dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
                         auth_mode="token", token_path=token, nodes=[record])
    try:
        _start_and_wait([record], _node_env("token", loopback=True), address, timeout,
                        on_started=lambda: nodes.write_state(state))
    except (RuntimeError, TimeoutError, KeyboardInterrupt):
        _stop_records([record])
        nodes.state_file().unlink(missing_ok=True)
        raise
    nodes.write_state(state)
    return state


def cmd_stop_host(args: argparse.Namespace) -> int:
    state = nodes.read_state()
    if state is None or state.mode != "simulate":
        return _err("stop-host works on simulated hosts (`mlx-serving cluster up --simulate N`); on a real fleet, "
                    "unplug the Mac or run `ray stop` on it")
    try:
        record = state.node(args.host)
    except KeyError as e:
        return _err(str(e.args[0]))
    if record.head:
        return _err(f"{args.host} runs the Ray head: stopping it stops the whole cluster (use `cluster down`)")
    if not nodes.alive(record):
        print(f"{args.host} is not running")
        return 0
    nodes.stop_local(record, hard=not args.graceful)
    how = "stopped (drained)" if args.graceful else "killed (every process of the node, at once)"
    print(f"{args.host} {how}; `mlx-serving cluster start-host {args.host}` brings it back")
    return 0


def cmd_start_host(args: argparse.Namespace) -> int:
    state = nodes.read_state()
    if state is None or state.mode != "simulate":
        return _err("start-host works on simulated hosts (`mlx-serving cluster up --simulate N`)")
    try:
        record = state.node(args.host)
    except KeyError as e:
        return _err(str(e.args[0]))
    if nodes.alive(record):
        print(f"{args.host} is already running")
        return 0
    nodes.apply_client_env(state)
    print(f"starting {args.host} ...", flush=True)
    try:
        env = _node_env(state.auth_mode, loopback=state.loopback)
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")
        _start_and_wait([record], env, state.address, args.timeout)
    except (RuntimeError, TimeoutError) as e:
        nodes.write_state(state)
        return _err(f"{args.host} did not come back: {e}")
    nodes.write_state(state)
    print(f"{args.host} is back")
    return 0


# -- status -----------------------------------------------------------------------------------------

def print_memory_plan(inventory: str, alive: dict[str, str], replicas: dict[str, list[str]]) -> int:
    """The inventory's plan per host beside what runs there now.

    ``alive``: host -> node id of the alive nodes; ``replicas``: host -> ``model#state`` running there.
    """
    try:
        fleet, plan = load_plan(inventory)
    except plan_errors() as e:
        return _err(str(e))
    head = ["HOST", "NODE", "USABLE GB", "PLANNED GB", "FREE GB", "PLANNED", "RUNNING NOW"]
    rows = []
    for u in plan.hosts:
        rows.append([u.host + (" (head)" if u.host == plan.head else ""), "up" if u.host in alive else "DOWN",
                     f"{u.usable_gb:.1f}", f"{u.used_gb:.1f}", f"{u.free_gb:.1f}", ", ".join(u.replicas) or "-",
                     ", ".join(replicas.get(u.host, [])) or "-"])
    extra = sorted(set(alive) - {h.name for h in fleet.hosts})
    for h in extra:
        rows.append([h, "up", "-", "-", "-", "(not in the inventory)", ", ".join(replicas.get(h, [])) or "-"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"memory plan ({inventory}):")
    for r in [head, *rows]:
        print("  " + "  ".join(c.rjust(w) if i in (2, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    for line in plan.shard_lines():
        print(f"  {line}")
    down = [u.host for u in plan.hosts if u.host not in alive and u.replicas]
    if down:
        print(f"  hosts down with planned replicas: {', '.join(down)} (their replicas run elsewhere if their "
              "fallback_hosts have room, else they wait for the host)")
    return 0


# -- parsers ----------------------------------------------------------------------------------------

def add_parsers(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="bring a fleet's Ray nodes up and down (or simulate one here)")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)

    up = csub.add_parser("up", help="start the Ray head here and join the other Macs (or --simulate N hosts here)")
    up.add_argument("--inventory", help="fleet inventory (config/fleet.example.yaml): hosts, head, labels, memory")
    up.add_argument("--simulate", type=int, metavar="N", help="start N Ray nodes on this machine, hosts sim-1..sim-N")
    up.add_argument("--ssh", action="store_true", help="start the other Macs over ssh (user@address from the inventory)")
    up.add_argument("--dry-run", action="store_true",
                    help="print the commands; start nothing, write nothing but --write-agents")
    up.add_argument("--port", type=int, default=local.DEFAULT_GCS_PORT, help="Ray GCS port of the head")
    up.add_argument("--dashboard-port", type=int, default=local.DEFAULT_DASHBOARD_PORT)
    up.add_argument("--dashboard-host", default="127.0.0.1", help="bind address of the dashboard (fleet head)")
    up.add_argument("--auth", choices=["token", "disabled"], default="token",
                    help=argparse.SUPPRESS)  # always token; `disabled` is refused with the reason
    up.add_argument("--num-cpus", type=int, default=2, help="logical CPUs per simulated host (default 2)")
    up.add_argument("--temp-dir", help="Ray temp dir of simulated hosts (default Ray's, /tmp/ray)")
    up.add_argument("--this-host", help="the inventory name of this machine, if address matching fails")
    up.add_argument("--remote-ray", default="ray", help="the `ray` executable on the other Macs (e.g. a venv path)")
    up.add_argument("--launcher-yaml", help="where to write the `ray up` config (default: in the cache dir)")
    up.add_argument("--write-agents", metavar="DIR", help="also write a launchd LaunchAgent per worker Mac into DIR "
                    "(written with --dry-run too; needs an absolute --remote-ray)")
    up.add_argument("--remote-home", default=agents.DEFAULT_HOME,
                    help="home directory of the ssh user on the Macs, for the agents' paths (default /Users/{user})")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for nodes to join")
    up.set_defaults(func=cmd_up)

    down = csub.add_parser("down", help="stop the Ray nodes `cluster up` started, and nothing else")
    down.set_defaults(func=cmd_down)

    stop = csub.add_parser("stop-host", help="a host-loss drill: kill a simulated host's Ray node")
    stop.add_argument("host")
    stop.add_argument("--graceful", action="store_true", help="drain it (SIGTERM) instead of killing it at once")
    stop.set_defaults(func=cmd_stop_host)

    start = csub.add_parser("start-host", help="bring a simulated host back after stop-host")
    start.add_argument("host")
    start.add_argument("--timeout", type=float, default=180.0)
    start.set_defaults(func=cmd_start_host)

    agents_cli.add_parsers(csub)
