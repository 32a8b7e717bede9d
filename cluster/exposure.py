"""What this machine exposes to the network, and what guards it.

Ray has no flag to bind its GCS, raylet or agents to loopback: whatever ``--node-ip-address`` says,
some of them listen on every interface. What keeps the network out is Ray's token auth, and for the
Serve HTTP port our API keys. So ``up`` and ``status`` show both, and list the sockets Ray's
processes listen on, found per process (``Process.net_connections``), because macOS only lets root
list every socket of the machine at once.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

ALLOW_FLAG = "--allow-unauthenticated-network"
ALLOW_FIELD = "args.auth.allow_unauthenticated_network: true"
WILDCARDS = ("0.0.0.0", "::", "")
_ROLES = {  # what a Ray process is, by the name Ray gives it or the script it runs
    "gcs_server": "Ray GCS", "raylet": "Ray node manager", "ray::DashboardAgent": "Ray dashboard agent",
    "ray::RuntimeEnvAgent": "Ray runtime-env agent", "ray::ProxyActor": "Serve HTTP proxy",
    "dashboard.py": "Ray dashboard", "monitor.py": "Ray autoscaler monitor", "log_monitor.py": "Ray log monitor",
    "ray.util.client.server": "Ray client server",
}


# -- addresses --------------------------------------------------------------------------------------

def unmapped(host: str) -> str:
    """``::ffff:1.2.3.4`` (an IPv4 address on an IPv6 socket) as ``1.2.3.4``; other hosts as they are."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else host


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine (a name counts if all its addresses do).

    A wildcard (``0.0.0.0``, ``::``) or a name that does not resolve counts as reachable from the network.
    """
    host = host.strip("[]")
    if host in WILDCARDS:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(unmapped(host)).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(unmapped(i[4][0].split("%")[0])).is_loopback for i in infos)


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket of a process."""

    pid: int
    process: str
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# -- processes --------------------------------------------------------------------------------------

def process_label(name: str, cmdline: list[str]) -> str:
    """A readable name: Ray's own process title (``ray::ProxyActor``), else the script or module a
    Python process runs, with its role when known."""
    key = name
    if not (name.startswith("ray::") or name in _ROLES):
        args = cmdline[1:]
        if "-m" in args and args.index("-m") + 1 < len(args):
            key = args[args.index("-m") + 1]
        else:
            key = next((os.path.basename(a) for a in args if a.endswith(".py")), name)
    role = _ROLES.get(key)
    return f"{role} ({key})" if role else key


def looks_like_ray(name: str, cmdline: list[str]) -> bool:
    """A process that Ray started: its binaries, its titled workers, or Python running Ray's code."""
    if name in ("gcs_server", "raylet") or name.startswith(("ray::", "ray-dashboard")):
        return True
    return any(f"{os.sep}ray{os.sep}" in a or a.startswith("ray.") for a in cmdline[1:4])


def tree_pids(roots: Iterable[int]) -> list[int]:
    """The roots and every descendant, parents first (the node processes `cluster up` recorded)."""
    out: list[int] = []
    for pid in roots:
        try:
            root = psutil.Process(pid)
            out += [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            continue
    return list(dict.fromkeys(out))


def user_ray_pids() -> list[int]:
    """The Ray processes of this user on this machine, and their children (for a Ray that
    `ray start` started, whose processes no state file records)."""
    me = psutil.Process().username()
    roots = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "username"]):
        info = p.info
        if info.get("username") == me and p.pid != os.getpid() and looks_like_ray(info.get("name") or "",
                                                                                   info.get("cmdline") or []):
            roots.append(p.pid)
    return tree_pids(roots)


def listeners(pids: Iterable[int]) -> list[Listener]:
    """The listening TCP sockets of these processes; a socket a child inherited counts once, for the
    first process that holds it."""
    out: dict[tuple[str, int], Listener] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections(kind="tcp")
            label = process_label(proc.name(), proc.cmdline())
        except psutil.Error:  # gone, or not ours to inspect
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr:
                host = unmapped(c.laddr.ip)
                out.setdefault((host, c.laddr.port), Listener(pid, label, host, c.laddr.port))
    return list(out.values())


def split(found: Iterable[Listener]) -> tuple[list[Listener], list[Listener]]:
    """``(beyond loopback, loopback only)``."""
    found = list(found)
    return [x for x in found if not x.loopback], [x for x in found if x.loopback]


# -- API keys in a config ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AppAuth:
    """How many keys an application's ingress holds (never which)."""

    app: str
    api_keys: int
    admin_keys: int
    allow_unauthenticated_network: bool


def app_auth(app: dict[str, Any]) -> AppAuth:
    """From a deployed application (``for_deploy`` output, or Serve's ``deployed_app_config``)."""
    from .serve_config import api_key_count, ingress_auth

    auth = ingress_auth(app)
    return AppAuth(app=str(app.get("name", "default")), api_keys=api_key_count(auth),
                   admin_keys=len(auth.get("admin_keys") or []),
                   allow_unauthenticated_network=bool(auth.get("allow_unauthenticated_network")))


def http_bind_problem(config: dict[str, Any], *, allowed_by_flag: bool, environ: dict[str, str] | None = None,
                      at_up: bool = True) -> str | None:
    """Why serving this config's HTTP port would open the models to the network, or None.

    A non-loopback bind needs an API key (in the config, or in ``MLX_SERVING_API_KEYS`` when
    ``at_up``) or an explicit opt-in: the flag or the config field.
    """
    from . import serve_config

    http = config.get("http_options") or {}
    host, port = str(http.get("host", "127.0.0.1")), http.get("port", 8000)
    if is_loopback(host) or allowed_by_flag or serve_config.allows_unauthenticated_network(config):
        return None
    if serve_config.api_keys_configured(config, environ if at_up else {}):
        return None
    where = "" if at_up else "http_options.host: "
    return (f"{where}HTTP on {host}:{port} is reachable from the network and no API key is configured, so anyone "
            f"who reaches it could use the models. Require a key (`mlx-serving keys new` makes one: put its hash in "
            f"args.auth.api_keys, or the key in MLX_SERVING_API_KEYS when running `mlx-serving up`), bind "
            f"127.0.0.1, or opt in explicitly with the flag {ALLOW_FLAG} (of `mlx-serving up`) or the config "
            f"field {ALLOW_FIELD}")


def allow_unauthenticated_network(config: dict[str, Any]) -> None:
    """Set the opt-in in every ``build_app`` application's ``args.auth`` (the ingress sees it there)."""
    from .serve_config import BUILD_APP

    for app in config.get("applications") or []:
        if isinstance(app, dict) and app.get("import_path") == BUILD_APP:
            args = app.setdefault("args", {})
            args.setdefault("auth", {})["allow_unauthenticated_network"] = True


def ray_auth_refusal(what: str, fix: str) -> str:
    """Why we never start a Ray node with auth disabled, and what to do instead."""
    return (f"refusing to {what} with Ray auth disabled: Ray's GCS listens on every network interface (Ray has no "
            "flag to bind it to loopback), so with auth disabled any host on the network could join the cluster "
            f"and run code on this machine. {fix}")


# -- report -----------------------------------------------------------------------------------------

def ray_auth_mode(dashboard_url: str) -> str | None:
    """``token`` or ``disabled``, as the cluster's dashboard says (a public endpoint); None if unknown."""
    from .local import get_json

    try:
        code, body = get_json(dashboard_url.rstrip("/") + "/api/authentication_mode", timeout=5)
    except (OSError, ValueError):
        return None
    return body.get("authentication_mode") if code == 200 and isinstance(body, dict) else None


def _ray_auth_line(mode: str | None) -> str:
    if mode == "token":
        return "Ray token auth: on (a client without the token is refused; Ray's metrics endpoints stay open, read-only)"
    if mode == "disabled":
        return ("Ray token auth: OFF: Ray's GCS listens on every interface, so any host that reaches this machine can "
                "run code on it; restart the cluster with RAY_AUTH_MODE=token")
    return "Ray token auth: unknown (the dashboard did not say)"


def _api_line(a: AppAuth, http: str, loopback: bool) -> str:
    counts = f"{a.api_keys} API key(s), {a.admin_keys} admin key(s) configured"
    if a.api_keys:
        return f"API of {a.app}: a key is required ({counts})"
    if loopback:
        return f"API of {a.app}: no key required; HTTP listens on loopback only ({counts})"
    opt = " (allow_unauthenticated_network)" if a.allow_unauthenticated_network else ""
    return f"API of {a.app}: NO key required: anyone who reaches {http} can use the models{opt} ({counts})"


def _by_process(found: list[Listener]) -> list[str]:
    procs: dict[tuple[str, int], list[str]] = {}
    for x in found:
        procs.setdefault((x.process, x.pid), []).append(str(x))
    return [f"    {name} (pid {pid}): {', '.join(socks)}" for (name, pid), socks in procs.items()]


def report(*, ray_auth: str | None, apps: list[AppAuth], http_host: str, http_port: int,
           found: list[Listener], detail: bool = True) -> list[str]:
    """The lines ``up`` and ``status`` print: auth on or off, key counts, what listens where (the
    loopback-only sockets one by one with ``detail``, else counted)."""
    http = f"[{http_host}]:{http_port}" if ":" in http_host else f"{http_host}:{http_port}"
    loopback = is_loopback(http_host)
    lines = ["security:", f"  {_ray_auth_line(ray_auth)}", *(f"  {_api_line(a, http, loopback)}" for a in apps),
             f"  Serve HTTP: {http} ({'loopback only' if loopback else 'reachable from the network'})"]
    beyond, local_only = split(found)
    if not found:
        return [*lines, "  no listening socket of a Ray process found on this machine"]
    lines.append("  listening beyond loopback (0.0.0.0 and [::] are every interface):" if beyond
                 else "  nothing listens beyond loopback")
    lines += _by_process(beyond)
    if local_only and detail:
        lines.append("  loopback only:")
        lines += _by_process(local_only)
    elif local_only:
        procs = len({x.pid for x in local_only})
        lines.append(f"  loopback only: {len(local_only)} more socket(s) of {procs} process(es) "
                     "(`mlx-serving status` lists them)")
    return lines
