"""``mlx-serving cluster install-agents`` / ``uninstall-agents`` and ``cluster up --write-agents``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from . import agents, fleet_cli, local, nodes


def _err(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 1


def write_agents_note(fleet: Any, args: argparse.Namespace, token: str | None) -> str:
    """``cluster up --write-agents DIR``: one LaunchAgent plist per worker Mac; returns what to tell the user."""
    made = agents.agents_for(fleet, port=args.port, ray=args.remote_ray, home=args.remote_home)
    paths = agents.write_agents(made, args.write_agents)
    lines = [f"LaunchAgents for {len(made)} Mac(s) (the head {fleet.head} gets none: `cluster up` starts it):"]
    lines += [f"  {a.host}: {path}  (its log on the Mac: {a.log_path})" for a, path in zip(made, paths)]
    if not made:
        return "\n".join(lines)
    port = f" --port {args.port}" if args.port != local.DEFAULT_GCS_PORT else ""
    home = f" --remote-home {shlex.quote(args.remote_home)}" if args.remote_home != agents.DEFAULT_HOME else ""
    lines += ["install them over ssh (copies the token too; `--dry-run` shows the commands):",
              f"  mlx-serving cluster install-agents --inventory {args.inventory} "
              f"--remote-ray {shlex.quote(args.remote_ray)}{port}{home}",
              "or by hand, from this machine:"]
    for a, path in zip(made, paths):
        target = shlex.quote(a.ssh)
        lines += [f"  {nodes.token_copy_line(fleet.host(a.host), token)}", f"  scp {shlex.quote(str(path))} {target}:",
                  f"  ssh {target} {shlex.quote(agents.by_hand(a))}"]
    return "\n".join(lines)


def _agent_fleet(args: argparse.Namespace) -> Any:
    from .inventory import load_fleet

    return load_fleet(args.inventory)


def cmd_install_agents(args: argparse.Namespace) -> int:
    try:
        fleet = _agent_fleet(args)
        made = agents.agents_for(fleet, port=args.port, ray=args.remote_ray, home=args.remote_home, only=args.host)
    except (*fleet_cli.plan_errors(), agents.AgentError) as e:
        return _err(str(e))
    if not made:
        print("the inventory has no Mac besides the head: no agent to install")
        return 0
    token = None if os.environ.get(nodes.TOKEN_ENV) else str(nodes.token_path())
    if token and not args.dry_run and not Path(token).is_file():
        return _err(f"no Ray token at {token}: run this on the head after `mlx-serving cluster up` made one "
                    "(every Mac needs the head's token)")
    if args.dry_run:
        print("\n".join(agents.install_commands(fleet, made, token)))
        return 0
    return _report(agents.install(fleet, made, token_file=token))


def cmd_uninstall_agents(args: argparse.Namespace) -> int:
    try:
        fleet = _agent_fleet(args)
        hosts = agents.worker_hosts(fleet, args.host)
    except (*fleet_cli.plan_errors(), agents.AgentError) as e:
        return _err(str(e))
    if args.dry_run:
        print("\n".join(agents.uninstall_commands(hosts)))
        return 0
    return _report(agents.uninstall(hosts))


def _report(outcomes: list[Any]) -> int:
    for o in outcomes:
        print(f"{o.host}: {'ok' if o.ok else 'FAILED'}: {o.detail}", file=sys.stdout if o.ok else sys.stderr)
    failed = [o.host for o in outcomes if not o.ok]
    if failed:
        return _err(f"{len(failed)} of {len(outcomes)} Mac(s) failed: {', '.join(failed)}")
    return 0


def add_parsers(csub: Any) -> None:
    inst = csub.add_parser("install-agents", help="over ssh: a launchd LaunchAgent on each worker Mac that keeps its "
                           "Ray node running, across crashes and reboots")
    inst.add_argument("--inventory", required=True, help="fleet inventory")
    inst.add_argument("--remote-ray", default="ray", help="absolute path of `ray` on the Macs (`~/` allowed)")
    inst.add_argument("--remote-home", default=agents.DEFAULT_HOME,
                      help="home directory of the ssh user on the Macs (default /Users/{user})")
    inst.add_argument("--port", type=int, default=local.DEFAULT_GCS_PORT, help="Ray GCS port of the head")
    inst.add_argument("--host", action="append", metavar="NAME", help="only this Mac (repeatable)")
    inst.add_argument("--dry-run", action="store_true", help="print the ssh commands; run nothing")
    inst.set_defaults(func=cmd_install_agents)

    uninst = csub.add_parser("uninstall-agents", help="over ssh: unload and delete the LaunchAgents (their Ray "
                             "nodes stop)")
    uninst.add_argument("--inventory", required=True, help="fleet inventory")
    uninst.add_argument("--host", action="append", metavar="NAME", help="only this Mac (repeatable)")
    uninst.add_argument("--dry-run", action="store_true", help="print the ssh commands; run nothing")
    uninst.set_defaults(func=cmd_uninstall_agents)
