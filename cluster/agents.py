"""launchd LaunchAgents that keep each worker Mac's Ray node running, across crashes and reboots.

Each worker Mac gets one agent, ``io.mlx-serving.ray.<host>``, that runs the same ``ray start
--address=<head> --labels=host=<name>,... --block`` as ``cluster up`` prints for it. launchd starts it
when the user's session loads it (``RunAtLoad``: at login, so after a reboot with automatic login) and
starts it again whenever it exits with a failure (``KeepAlive: {SuccessfulExit: false}``). Every way a
``ray start --block`` ends is a failure exit: SIGTERM makes it exit 1 after draining, and a Ray child
dying (a raylet that lost the head, a crash) makes it kill the rest and exit 1. A worker whose head is
away therefore retries every ``ThrottleInterval`` seconds until the head is back, then rejoins with its
labels, and the host-loss path moves its replicas back. ``launchctl bootout`` (``cluster
uninstall-agents``) is the one way to stop it for good: ``ray stop`` alone only looks like one.

The head gets no agent on purpose: it is the cluster. Its GCS, the Serve controller and the
deployed applications do not survive its restart, so a rebooted head needs ``cluster up`` (which
records the head, so that ``cluster down`` can stop it; launchd would start it again) and ``mlx-serving
up`` to deploy again. The workers' agents wait for it meanwhile.

The agent reads the token from ``~/.ray/auth_token`` on the Mac (``RAY_AUTH_TOKEN_PATH``), where
``install-agents`` copies it: the plist holds no secret. launchd expands no ``~`` and runs no shell, so
every path in the plist is absolute, under the Mac user's home (``/Users/<ssh_user>`` unless told).
A LaunchAgent runs in that user's login session (``gui/<uid>``): a Mac that must rejoin after a reboot
needs automatic login for that user. Unchecked, for want of a Mac: macOS 15's Local Network Privacy
exempts launchd daemons but not agents, and agents' connections to hosts on their own subnet are
reported to fail with EHOSTUNREACH (docs/fleet.md, "Nodes that survive a reboot").
"""

from __future__ import annotations

import getpass
import os
import plistlib
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict

from . import local, nodes
from .inventory import Fleet, Host

LABEL_PREFIX = "io.mlx-serving.ray."
AGENTS_DIR = "Library/LaunchAgents"
LOG_DIR = "Library/Logs/mlx-serving"
DOMAIN = "gui/$(id -u)"  # launchd's domain of the user's login session, where ~/Library/LaunchAgents load
DEFAULT_HOME = "/Users/{user}"  # macOS's home of a user; --remote-home overrides it
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"  # launchd's own PATH for jobs
THROTTLE_S = 30  # seconds between restarts while the head is away (launchd's default is 10)
# SIGTERM to SIGKILL: `ray start --block` drains for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) first.
EXIT_TIMEOUT_S = 60
BOOTOUT_WAIT_S = 90  # a bootout returns before the job is gone; bootstrap meanwhile fails with error 5
TOKEN_REMOTE = "mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token"  # as nodes.token_copy_line


class AgentError(ValueError):
    """Agents cannot be made as asked (e.g. a ``ray`` path launchd cannot run)."""


class Agent(BaseModel):
    """One Mac's LaunchAgent: what it runs, with which environment, logging where."""

    model_config = ConfigDict(frozen=True)

    host: str
    ssh: str  # user@address
    home: str  # the Mac user's home directory, absolute
    argv: list[str]
    env: dict[str, str]

    @property
    def label(self) -> str:
        return label(self.host)

    @property
    def plist_name(self) -> str:
        return f"{self.label}.plist"

    @property
    def plist_path(self) -> str:
        return str(PurePosixPath(self.home, AGENTS_DIR, self.plist_name))

    @property
    def log_path(self) -> str:
        return str(PurePosixPath(self.home, LOG_DIR, "ray-node.log"))

    def plist(self) -> dict[str, Any]:
        return {
            "Label": self.label,
            "ProgramArguments": self.argv,
            "EnvironmentVariables": self.env,
            "WorkingDirectory": self.home,
            "RunAtLoad": True,  # at load: at login, so after a reboot with automatic login
            "KeepAlive": {"SuccessfulExit": False},  # again after every failure exit (all of ray's, above)
            "ThrottleInterval": THROTTLE_S,
            "ExitTimeOut": EXIT_TIMEOUT_S,
            # Unset, launchd throttles the job's CPU and I/O ("light resource limits"); a model server
            # is the Mac's job.
            "ProcessType": "Interactive",
            "StandardOutPath": self.log_path,
            "StandardErrorPath": self.log_path,
        }

    def plist_bytes(self) -> bytes:
        return plistlib.dumps(self.plist(), fmt=plistlib.FMT_XML, sort_keys=False)


class HostOutcome(BaseModel):
    host: str
    ok: bool
    detail: str


def label(host: str) -> str:
    return LABEL_PREFIX + host


def remote_user(host: Host) -> str:
    """The account the agent runs as: the inventory's ssh user, else ssh's default (this user)."""
    return host.ssh_user or getpass.getuser()


def remote_ray(ray: str, home: str) -> str:
    """``ray`` as launchd can run it: an absolute path (``~/`` is the Mac user's home)."""
    if ray.startswith("~/"):
        ray = str(PurePosixPath(home, ray[2:]))
    if not PurePosixPath(ray).is_absolute():
        raise AgentError(
            f"--remote-ray {ray!r} is not an absolute path: launchd runs no shell and does not search your "
            f"PATH. Give the path of `ray` on the Macs, e.g. --remote-ray /Users/mlx/mlx-serving/.venv/bin/ray, or "
            f"'~/mlx-serving/.venv/bin/ray' in quotes for one under each Mac user's home (on this machine it is "
            f"{local.ray_bin()})")
    return ray


def worker_hosts(fleet: Fleet, only: list[str] | None = None) -> list[Host]:
    """The Macs that get an agent: every host but the head, or those of ``only``."""
    if only:
        unknown = [n for n in only if n not in {h.name for h in fleet.hosts}]
        if unknown:
            raise AgentError(f"unknown host(s) {', '.join(unknown)} (hosts are {', '.join(h.name for h in fleet.hosts)})")
        if fleet.head in only:
            raise AgentError(f"{fleet.head} runs the Ray head: it gets no agent (`cluster up` starts it)")
    return [h for h in fleet.hosts if h.name != fleet.head and (not only or h.name in only)]


def agent_for(fleet: Fleet, host: Host, *, port: int, ray: str, home: str = DEFAULT_HOME) -> Agent:
    """The agent of one worker Mac; ``home`` may hold ``{user}``."""
    if host.name == fleet.head:
        raise AgentError(f"{host.name} runs the Ray head: it gets no agent (`cluster up` starts it)")
    user = remote_user(host)
    home = home.format(user=user)
    if not PurePosixPath(home).is_absolute():
        raise AgentError(f"--remote-home {home!r} is not an absolute path")
    exe = remote_ray(ray, home)
    env = {
        **nodes.node_env("token"),
        nodes.TOKEN_PATH_ENV: str(PurePosixPath(home, ".ray", "auth_token")),
        "PATH": f"{PurePosixPath(exe).parent}:{SYSTEM_PATH}",  # as an activated venv would have it
    }
    return Agent(host=host.name, ssh=nodes.ssh_target(host), home=home,
                 argv=nodes.worker_argv(fleet, host, port=port, ray=exe, block=True), env=env)


def agents_for(fleet: Fleet, *, port: int, ray: str, home: str = DEFAULT_HOME,
               only: list[str] | None = None) -> list[Agent]:
    return [agent_for(fleet, h, port=port, ray=ray, home=home) for h in worker_hosts(fleet, only)]


def write_agents(agents: list[Agent], out_dir: str | Path) -> list[Path]:
    """One ``<label>.plist`` per agent in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for a in agents:
        path = out / a.plist_name
        path.write_bytes(a.plist_bytes())
        paths.append(path)
    return paths


# -- launchctl over ssh ------------------------------------------------------------------------------

def _unload(host: str) -> list[str]:
    """Unload the host's agent if it is loaded, and wait until launchd has let it go."""
    service = f"{DOMAIN}/{label(host)}"
    return [
        f"launchctl bootout {service} 2>/dev/null",
        f"i=0; while launchctl print {service} >/dev/null 2>&1 && [ $i -lt {BOOTOUT_WAIT_S} ]; do sleep 1; i=$((i+1)); done",
    ]


def install_script(a: Agent) -> str:
    """The shell run on the Mac (the plist arrives on stdin): check, unload the old agent, write, load.

    Without a login session the plist is still written: launchd loads it at the next login.
    """
    plist = shlex.quote(a.plist_path)
    exe = shlex.quote(a.argv[0])
    return "\n".join([
        f'[ "$HOME" = {shlex.quote(a.home)} ] || {{ echo "the home of $(id -un) is $HOME, not {a.home}: '
        f'pass --remote-home" >&2; exit 2; }}',
        f'[ -x {exe} ] || {{ echo "no executable {a.argv[0]} on this Mac: pass --remote-ray" >&2; exit 2; }}',
        *_unload(a.host),
        'if pgrep -x raylet >/dev/null; then echo "a Ray node not started by this agent runs here: stop it first '
        '(mlx-serving cluster down on the head, or ray stop here)" >&2; exit 4; fi',
        f"mkdir -p ~/{AGENTS_DIR} ~/{LOG_DIR} || exit 5",
        f"cat > {plist}.tmp && mv {plist}.tmp {plist} || exit 5",
        f'launchctl print {DOMAIN} >/dev/null 2>&1 || {{ echo "$(id -un) has no login session on this Mac '
        f'(launchd domain {DOMAIN}): the agent is in place and starts at the next login; turn on automatic '
        f'login so that it starts after a reboot" >&2; exit 3; }}',
        f"launchctl enable {DOMAIN}/{a.label}",  # a `launchctl disable` outlives reboots: undo it
        f"launchctl bootstrap {DOMAIN} {plist}",
    ])


def uninstall_script(host: str) -> str:
    return "\n".join([*_unload(host), f"rm -f ~/{AGENTS_DIR}/{label(host)}.plist"])


Runner = Callable[..., subprocess.CompletedProcess]


def _ssh(host: Host, script: str, data: bytes, run: Runner | None, timeout: float) -> tuple[bool, str]:
    try:
        res = (run or subprocess.run)(nodes.ssh_argv(host, script), input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"ssh did not return within {timeout:.0f}s"
    if res.returncode != 0:
        err = (res.stderr or b"").decode(errors="replace").strip() or (res.stdout or b"").decode(errors="replace").strip()
        return False, f"exit {res.returncode}: {err or 'no output'}"
    return True, ""


def token_secret(token_file: str | None) -> bytes:
    """The token to copy: the file's content, or ``RAY_AUTH_TOKEN``'s when the token lives there."""
    return Path(token_file).read_bytes() if token_file else os.environ[nodes.TOKEN_ENV].encode()


def install(fleet: Fleet, agents: list[Agent], *, token_file: str | None,
            run: Runner | None = None) -> list[HostOutcome]:
    """Per Mac, over ssh: copy the token, then write and (re)load its agent."""
    secret = token_secret(token_file)
    out = []
    for a in agents:
        host = fleet.host(a.host)
        ok, why = _ssh(host, TOKEN_REMOTE, secret, run, timeout=60)
        if not ok:
            out.append(HostOutcome(host=a.host, ok=False, detail=f"copying the token failed: {why}"))
            continue
        ok, why = _ssh(host, install_script(a), a.plist_bytes(), run, timeout=BOOTOUT_WAIT_S + 90)
        detail = f"agent {a.label} loaded; log {a.log_path}" if ok else f"installing the agent failed: {why}"
        out.append(HostOutcome(host=a.host, ok=ok, detail=detail))
    return out


def uninstall(hosts: list[Host], *, run: Runner | None = None) -> list[HostOutcome]:
    """Per Mac, over ssh: unload the agent (its Ray node stops) and delete its plist."""
    out = []
    for h in hosts:
        ok, why = _ssh(h, uninstall_script(h.name), b"", run, timeout=BOOTOUT_WAIT_S + 30)
        detail = f"agent {label(h.name)} unloaded and removed" if ok else f"removing the agent failed: {why}"
        out.append(HostOutcome(host=h.name, ok=ok, detail=detail))
    return out


def install_commands(fleet: Fleet, agents: list[Agent], token_file: str | None) -> list[str]:
    """What ``install`` runs, as shell lines (``--dry-run``)."""
    lines = []
    for a in agents:
        host = fleet.host(a.host)
        lines += [f"# {a.host}: the token, then the agent (stdin: {a.plist_name}, as `cluster up --write-agents` writes it)",
                  nodes.token_copy_line(host, token_file),
                  f"{shlex.join(nodes.ssh_argv(host, install_script(a)))} < {a.plist_name}"]
    return lines


def uninstall_commands(hosts: list[Host]) -> list[str]:
    lines = []
    for h in hosts:
        lines += [f"# {h.name}", shlex.join(nodes.ssh_argv(h, uninstall_script(h.name)))]
    return lines


def by_hand(a: Agent) -> str:
    """Installing one written plist on its Mac without ``install-agents``, run there in the folder holding it."""
    return (f"mkdir -p ~/{AGENTS_DIR} ~/{LOG_DIR} && cp {a.plist_name} ~/{AGENTS_DIR}/ && "
            f"launchctl bootstrap {DOMAIN} ~/{AGENTS_DIR}/{a.plist_name}")
