"""Bringing a fleet's Ray nodes up and down: the head here, the other Macs by ssh or by hand.

Every node joins with the label ``host=<name>`` (what replicas are pinned by) and a custom resource
``host:<name>`` (for tools and older Rays that select by resource). Nodes this machine starts run as
``ray start --block`` in their own process group, and ``cluster-state.json`` records their process
ids, so ``mlx-serving cluster down`` stops exactly those nodes and never another Ray on the machine
(no ``ray stop``, which stops every Ray of the user). ``--simulate N`` starts N such nodes here, each
labelled as its own host and addressed as 127.0.0.1, so the whole fleet path runs on one machine.

Token authentication (Ray >= 2.59): ``ray start --head`` turns it on when ``RAY_AUTH_MODE=token``,
or on its own when a token already exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or
``RAY_AUTH_TOKEN``). Worker nodes never turn it on by themselves: each needs ``RAY_AUTH_MODE=token``
and the same token. So the tooling sets ``RAY_AUTH_MODE`` explicitly on every node and copies the
head's token to every Mac; clients connecting with an explicit address need ``RAY_AUTH_MODE=token``
too (``ray.init(address="auto")`` on a machine holding the token finds it by itself). Every node the
tooling starts uses token auth.

Loopback clusters (`up`'s own head, simulated hosts). With a LAN node address Ray binds the GCS, the
raylet, the agents and every worker to every interface or to that address; with 127.0.0.1 it binds
them all to 127.0.0.1 (measured, Ray 2.60; each Serve replica's gRPC server stays on ``[::]``). But
whenever multi-node clusters are enabled (always on Linux; on macOS with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``) Ray replaces a loopback ``--node-ip-address`` or
``--address`` by the machine's LAN address (``services.resolve_ip_for_localhost``). So every process
of a loopback cluster, and its clients, run with that variable at 0, and a worker node, which ``ray
start`` refuses to start then, is started through this module (``loopback_node_argv``).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from engine.sources import cache_dir

from .inventory import GB, Fleet, Host

OSX_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {OSX_CLUSTER_ENV: "0"}  # Ray keeps a loopback node address (see the module docstring)
# Ray starts every worker process at nice 15 (its ``worker_niceness``), below any normal process.
# On a serving node the workers are the work: beside two busy normal-priority processes a replica at
# 15 decoded 33 tokens/s, at 0 533 (2 cores, docs/bench/niceness_cpu.json). Ray Jobs set 0 for their
# drivers the same way; a value already in the environment is kept.
NICENESS_ENV = "RAY_worker_niceness"
HOST_RESOURCE_UNITS = 1000  # `host:<name>` units per node: room for many fractional requests
REMOTE_LOG = "~/.mlx-serving/ray-node.log"

AuthMode = Literal["token", "disabled"]


class NodeRecord(BaseModel):
    """One Ray node that ``cluster up`` started."""

    host: str
    head: bool = False
    pid: int | None = None  # local: the `ray start --block` process, leader of its own process group
    log: str | None = None
    argv: list[str] = Field(default_factory=list)  # to restart a simulated host after a drill
    ssh: str | None = None  # remote: user@address it was started over
    remote_pid: int | None = None


class ClusterState(BaseModel):
    mode: Literal["local", "simulate", "inventory"]  # local: the head `mlx-serving up` started
    address: str  # GCS address, host:port
    dashboard_url: str
    auth_mode: AuthMode
    token_path: str | None = None  # where this machine's clients read the token (None: Ray's default lookup)
    temp_dir: str | None = None
    inventory: str | None = None
    nodes: list[NodeRecord]
    started: float = Field(default_factory=time.time)

    @property
    def loopback(self) -> bool:
        """Whether every node of the cluster is this machine, on 127.0.0.1."""
        return self.address.rpartition(":")[0] == LOOPBACK

    def client_env(self) -> dict[str, str]:
        """Environment a client of this cluster (driver, `ray status`, `serve deploy`) needs."""
        env = {AUTH_MODE_ENV: self.auth_mode, **(LOOPBACK_ENV if self.loopback else {})}
        if self.auth_mode == "token" and self.token_path and Path(self.token_path) != default_token_path():
            env[TOKEN_PATH_ENV] = self.token_path
        return env

    def node(self, host: str) -> NodeRecord:
        for n in self.nodes:
            if n.host == host:
                return n
        raise KeyError(f"no node for host {host!r} in the cluster state (hosts: {', '.join(n.host for n in self.nodes)})")


def state_file() -> Path:
    return cache_dir() / "cluster-state.json"


def read_state() -> ClusterState | None:
    try:
        return ClusterState.model_validate_json(state_file().read_text())
    except (OSError, ValueError):
        return None


def write_state(state: ClusterState) -> None:
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(state.model_dump_json(indent=2))


def apply_client_env(state: ClusterState | None) -> None:
    """Point this process's Ray client at the recorded cluster's auth settings (before ray is used)."""
    if state is None:
        return
    os.environ.update(state.client_env())
    refresh_ray_auth()


# -- auth token -------------------------------------------------------------------------------------

def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_path() -> Path:
    """Where Ray on this machine reads the token from (``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)."""
    return Path(os.environ[TOKEN_PATH_ENV]).expanduser() if os.environ.get(TOKEN_PATH_ENV) else default_token_path()


def ensure_token() -> str | None:
    """The file holding Ray's auth token, generating one (mode 0600) if none exists.

    Returns None when the token is given in ``RAY_AUTH_TOKEN`` (nothing on disk to copy).
    """
    if os.environ.get(TOKEN_ENV):
        return None
    path = token_path()
    if not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
    refresh_ray_auth()
    return str(path)


def refresh_ray_auth() -> None:
    """Make an already imported ray re-read ``RAY_AUTH_MODE`` and the token (both are cached)."""
    if "ray" not in sys.modules:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # noqa: BLE001 - best effort; a fresh process reads the environment anyway
        pass


# -- commands ---------------------------------------------------------------------------------------

def host_labels(host: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    return {"host": host, **(labels or {})}


def ray_start_argv(
    *, host: str, labels: dict[str, str] | None = None, head: bool, address: str | None = None,
    port: int | None = None, dashboard_port: int | None = None, dashboard_host: str = "127.0.0.1",
    client_port: int | None = None, node_ip: str | None = None, memory_bytes: int | None = None,
    num_cpus: int | None = None, temp_dir: str | None = None, block: bool = False, ray: str = "ray",
    same_machine: bool = False,
) -> list[str]:
    """``ray start`` for one host: its ``host`` label, its ``host:<name>`` resource, its memory."""
    lab = host_labels(host, labels)
    argv = [ray, "start"]
    if head:
        argv += ["--head", f"--port={port}", f"--dashboard-host={dashboard_host}"]
        if dashboard_port is not None:
            argv.append(f"--dashboard-port={dashboard_port}")
        if client_port is not None:
            argv.append(f"--ray-client-server-port={client_port}")
    else:
        argv.append(f"--address={address}")
    if node_ip:
        argv.append(f"--node-ip-address={node_ip}")
    argv += ["--labels=" + ",".join(f"{k}={v}" for k, v in lab.items()),
             "--resources=" + json.dumps({f"host:{host}": HOST_RESOURCE_UNITS}, separators=(",", ":"))]
    if memory_bytes is not None:
        argv.append(f"--memory={memory_bytes}")
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if temp_dir:
        argv.append(f"--temp-dir={temp_dir}")
    if same_machine:  # several nodes on one machine: no fixed per-node ports to collide on
        argv += ["--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0"]
        if not head:  # they share the head's session directory: its log monitor reads every node's logs
            argv.append("--include-log-monitor=False")
    argv.append("--disable-usage-stats")
    if block:
        argv.append("--block")
    return argv


def node_env(auth_mode: AuthMode, loopback: bool = False) -> dict[str, str]:
    """What every fleet node needs in its environment: multi-node on macOS, an explicit auth mode,
    workers at normal priority; for a node of a loopback cluster, Ray's multi-node switch off, so it
    keeps 127.0.0.1."""
    return {**({OSX_CLUSTER_ENV: "1"} if not loopback else LOOPBACK_ENV), AUTH_MODE_ENV: auth_mode, **niceness_env()}


def niceness_env() -> dict[str, str]:
    """Ray's workers at normal priority, unless this environment already says otherwise."""
    return {NICENESS_ENV: os.environ.get(NICENESS_ENV, "0")}


def loopback_node_argv(argv: list[str]) -> list[str]:
    """``ray start ...`` of a node of a loopback cluster as it must run: a worker node goes through
    this module, which lets ``ray start`` join while multi-node stays off (the module docstring says why)."""
    if "--head" in argv:
        return argv
    return [sys.executable, "-m", "cluster.nodes", "ray", *argv[1:]]


def _ray_start_on_loopback(args: list[str]) -> None:
    """``ray start ARGS`` with Ray's multi-node switch on for ``ray start``'s own check only.

    The process keeps ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (so Ray keeps the loopback addresses, here
    and in every process it starts); ``ray start`` alone sees the switch on and lets a worker node join.
    """
    import types

    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    view = types.ModuleType(constants.__name__)
    view.__dict__.update(constants.__dict__)
    view.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = view  # type: ignore[attr-defined]
    sys.argv = ["ray", *args]
    scripts.main()


def shell_arg(arg: str) -> str:
    """``--opt='{"a": 1}'`` rather than ``'--opt={"a": 1}'``: the same word, easier to read."""
    if arg.startswith("--") and "=" in arg:
        opt, _, value = arg.partition("=")
        return f"{opt}={shlex.quote(value)}"
    return shlex.quote(arg)


def shell_line(env: dict[str, str], argv: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shell_arg, argv)])


def gcs_address(fleet: Fleet, port: int) -> str:
    return f"{fleet.host(fleet.head).address}:{port}"


def _ip_of(address: str) -> str | None:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        return address
    except OSError:
        return None


def resolve(address: str) -> str:
    """An IP address for ``address`` (Ray's GCS client wants one); the name itself if it does not resolve."""
    if _ip_of(address):
        return address
    try:
        return socket.gethostbyname(address)
    except OSError:
        return address


def worker_argv(fleet: Fleet, host: Host, *, port: int, ray: str = "ray", block: bool = False) -> list[str]:
    return ray_start_argv(host=host.name, labels=host.labels, head=False, address=gcs_address(fleet, port),
                          memory_bytes=host.usable_bytes, ray=ray, block=block)


def head_argv(fleet: Fleet, *, port: int, dashboard_port: int, dashboard_host: str, ray: str = "ray",
              block: bool = False) -> list[str]:
    head = fleet.host(fleet.head)
    return ray_start_argv(host=head.name, labels=head.labels, head=True, port=port, dashboard_port=dashboard_port,
                          dashboard_host=dashboard_host, node_ip=_ip_of(head.address), memory_bytes=head.usable_bytes,
                          ray=ray, block=block)


def ssh_target(host: Host) -> str:
    return f"{host.ssh_user}@{host.address}" if host.ssh_user else host.address


def token_copy_line(host: Host, token_file: str | None) -> str:
    """A shell line that puts this machine's token into ``~/.ray/auth_token`` on ``host`` (mode 0600)."""
    remote = "mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token"
    src = f"< {shlex.quote(token_file)}" if token_file else ""
    pipe = f'printf %s "${TOKEN_ENV}" | ' if token_file is None else ""
    return f"{pipe}ssh {shlex.quote(ssh_target(host))} {shlex.quote(remote)} {src}".rstrip()


def remote_start_command(fleet: Fleet, host: Host, *, port: int, auth_mode: AuthMode, ray: str = "ray") -> str:
    """What ``--ssh`` runs on a Mac: ``ray start --block`` in the background, printing its pid."""
    line = shell_line(node_env(auth_mode), worker_argv(fleet, host, port=port, ray=ray, block=True))
    # `;` not `&&`: `a && b &` would background a subshell that keeps ssh's output open (ssh never
    # returns) and whose pid is not ray's. nohup execs env execs ray: `$!` is ray start's pid.
    return f"mkdir -p ~/.mlx-serving; nohup env {line} > {REMOTE_LOG} 2>&1 < /dev/null & echo $!"


def ssh_argv(host: Host, remote_command: str) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", ssh_target(host), remote_command]


# -- launcher YAML (`ray up`) -----------------------------------------------------------------------

def launcher_config(fleet: Fleet, *, port: int, dashboard_port: int, auth_mode: AuthMode,
                    cluster_name: str = "mlx-fleet", ray: str = "ray") -> dict[str, Any]:
    """A Ray cluster-launcher config (``provider: type: local``) that applies the same labels.

    The local provider runs one ``worker_start_ray_commands`` on every worker, so the command picks
    the host's own line by matching the inventory address against the machine's IP addresses and
    host names.
    """
    head = fleet.host(fleet.head)
    workers = [h for h in fleet.hosts if h.name != head.name]
    users = {h.ssh_user for h in fleet.hosts if h.ssh_user}
    env = node_env(auth_mode)
    cases = []
    for h in workers:
        argv = ray_start_argv(host=h.name, labels=h.labels, head=False, address="$RAY_HEAD_IP:" + str(port),
                              memory_bytes=h.usable_bytes, ray=ray)
        line = " ".join(shell_arg(a) if "$RAY_HEAD_IP" not in a else f'"{a}"' for a in argv)
        env_line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        cases.append(f"    {shlex.quote(h.address.lower())}) exec env {env_line} {line} ;;")
    select = "\n".join([
        # every IPv4 address of the machine (macOS ifconfig, Linux ip) and its host names, lower case
        "for me in $( { ifconfig; ip -o addr; } 2>/dev/null | grep -oE '([0-9]{1,3}[.]){3}[0-9]{1,3}')"
        " $(hostname) $(hostname -s) $(hostname -s).local; do",
        '  case "$(printf %s "$me" | tr A-Z a-z)" in',
        *cases,
        "  esac",
        "done",
        'echo "mlx-serving: this machine matches no worker address of the inventory" >&2; exit 1',
    ])
    head_line = shell_line(env, ray_start_argv(
        host=head.name, labels=head.labels, head=True, port=port, dashboard_port=dashboard_port,
        node_ip=_ip_of(head.address), memory_bytes=head.usable_bytes, ray=ray))
    head_line += " --autoscaling-config=~/ray_bootstrap_config.yaml"  # unquoted: the shell expands ~
    cfg: dict[str, Any] = {
        "cluster_name": cluster_name,
        "provider": {"type": "local", "head_ip": head.address, "worker_ips": [h.address for h in workers]},
        "auth": {"ssh_user": users.pop() if len(users) == 1 else "<ssh user>"},
        "max_workers": len(workers),  # the local provider keeps every worker_ip in the cluster
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "file_mounts": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [f"{ray} stop", head_line],
        "worker_start_ray_commands": [f"{ray} stop", select],
    }
    if auth_mode == "token":
        token = str(token_path()) if not os.environ.get(TOKEN_ENV) else None
        if token:  # copied to the same place on every node, where Ray looks by default
            cfg["file_mounts"] = {"~/.ray/auth_token": token}
    return cfg


def launcher_yaml(fleet: Fleet, **kw: Any) -> str:
    header = (
        "# Ray cluster launcher config for this fleet, written by `mlx-serving cluster up`.\n"
        "# Start with `ray up THIS_FILE` (from a machine that can ssh to every Mac); stop with `ray down THIS_FILE`.\n"
        "# Each Mac joins with label host=<name> and resource host:<name>, like `mlx-serving cluster up`.\n"
    )
    return header + yaml.safe_dump(launcher_config(fleet, **kw), sort_keys=False, width=1000)


# -- local processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to a server
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def is_local_address(address: str) -> bool:
    """Whether ``address`` (IP or host name) names this machine."""
    names = {socket.gethostname().lower(), socket.gethostname().split(".")[0].lower()}
    if address.lower().rstrip(".") in names | {n + ".local" for n in names} | {"localhost"}:
        return True
    try:
        infos = socket.getaddrinfo(address, None)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((sockaddr[0], 0))  # only an address of one of this machine's interfaces binds
            return True
        except OSError:
            continue
    return False


def start_local(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``ray start --block ...`` detached, in a new session (its pid is its process group's id)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    res = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
    return res.stdout.strip()


def _is_ours(pid: int) -> bool:
    """The pid is still a `ray start --block` leading its own process group (not a reused pid)."""
    try:
        if os.getpgid(pid) != pid:
            return False
    except OSError:
        return False
    cmd = _cmdline(pid)
    return "ray" in cmd and " start" in cmd and "--block" in cmd


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def alive(record: NodeRecord) -> bool:
    return record.pid is not None and _is_ours(record.pid)


def stop_local(record: NodeRecord, *, timeout: float = 60.0, hard: bool = False) -> None:
    """Stop one node this machine started: SIGTERM lets Ray drain and clean up; SIGKILL the rest.

    ``hard`` skips the SIGTERM: the node vanishes at once, as a Mac losing power would.
    """
    pid = record.pid
    if pid is None:
        return
    if _is_ours(pid):
        if hard:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGTERM)
    elif not _group_alive(pid):
        return
    deadline = time.monotonic() + (0 if hard else timeout)
    while time.monotonic() < deadline and _group_alive(pid):
        _reap(pid)
        time.sleep(0.25)
    if _group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)  # the group is ours: start_local made it a new session
        except OSError:
            pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _group_alive(pid):  # SIGKILL is not instant: wait for the exit
        _reap(pid)
        time.sleep(0.1)


def _reap(pid: int) -> None:
    """Collect the exit status if the node is our child (else it is init's to reap)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the cluster's view -----------------------------------------------------------------------------

def alive_hosts(address: str, timeout: float = 10.0) -> dict[str, str]:
    """``{host label: node id}`` of the alive nodes, read from the GCS (no driver needed)."""
    import ray
    from ray.core.generated import gcs_pb2

    client = ray._raylet.GcsClient(address=address)
    out: dict[str, str] = {}
    for node_id, info in client.get_all_node_info(timeout=timeout).items():
        if info.state == gcs_pb2.GcsNodeInfo.ALIVE:
            host = dict(info.labels).get("host")
            if host:
                out[host] = node_id.hex()
    return out


def wait_for_hosts(address: str, hosts: list[str], timeout: float, failed: Callable[[], str | None] | None = None) -> None:
    """Wait until a node labelled with each host is alive; ``failed()`` names a node that died early."""
    deadline = time.monotonic() + timeout
    last: Any = "no answer"
    while time.monotonic() < deadline:
        if failed is not None:
            why = failed()
            if why:
                raise RuntimeError(why)
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()  # quietly wait for the GCS port
        except OSError as e:
            last = f"GCS at {address} not answering yet ({e})"
            time.sleep(1.0)
            continue
        try:
            seen = alive_hosts(address, timeout=5)
            missing = [h for h in hosts if h not in seen]
            if not missing:
                return
            last = f"waiting for {', '.join(missing)}"
        except Exception as e:  # noqa: BLE001 - the GCS is still starting
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
        time.sleep(1.0)
    raise TimeoutError(f"nodes not up after {timeout:.0f}s: {last}")


def memory_summary(fleet: Fleet) -> str:
    return ", ".join(f"{h.name} {h.usable_bytes / GB:.1f} GB" for h in fleet.hosts)


if __name__ == "__main__":  # `python -m cluster.nodes ray start ...`: see loopback_node_argv
    if sys.argv[1:2] != ["ray"]:
        sys.exit("usage: python -m cluster.nodes ray start ARGS...")
    _ray_start_on_loopback(sys.argv[2:])
