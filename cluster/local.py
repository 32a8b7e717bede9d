"""Bringing up and tearing down what ``mlx-serving up`` owns on this machine.

``up`` writes a small state file saying what it started (the Ray head, the Serve app), so ``down``
stops exactly that and nothing else: a Ray cluster the user started stays up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Collection

from pydantic import BaseModel, Field

from deployments.http.auth import ADMIN_KEYS_ENV, API_KEYS_ENV
from engine import blas
from engine.sources import cache_dir

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_GCS_PORT = 6379


class UpState(BaseModel):
    started_head: bool
    address: str
    dashboard_url: str
    app_names: list[str]
    http_url: str
    client_env: dict[str, str] = Field(default_factory=dict)  # what reached the cluster (auth mode, token path)


def state_file() -> Path:
    return cache_dir() / "up-state.json"


def read_state() -> UpState | None:
    try:
        return UpState.model_validate_json(state_file().read_text())
    except (OSError, ValueError):
        return None


def write_state(state: UpState) -> None:
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(state.model_dump_json(indent=2))


def host_label(name: str | None = None) -> str:
    """This machine's name as a Ray label value (letters, digits, '-', '_', '.'; at most 63)."""
    raw = (name or socket.gethostname()).split(".")[0]
    return (re.sub(r"[^A-Za-z0-9_.-]", "-", raw).strip("-_.") or "localhost")[:63]


def ray_bin() -> str:
    """The `ray` beside this Python (its venv's), else the one on PATH: a Python whose packages were
    installed without console scripts (an unpacked site tree) has none beside it."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or str(beside))


GCS_CONNECT_TIMEOUT_S = 1.0  # a GCS on this machine or the LAN accepts a TCP connection at once
RAY_STATUS_TIMEOUT_S = 20.0  # `ray status` of a live cluster takes 1-3 s; of a dead one, 40 s of retries


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``host:port``, ``[v6]:port``, ``ray://host:port``); None if it has no port."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def gcs_listening(address: str, timeout: float = GCS_CONNECT_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections at the address's port: the check that costs
    milliseconds, before `ray status`, which spends 40 s retrying an address where nothing listens."""
    where = host_port(address)
    if where is None:
        return True  # not host:port: let `ray status` judge it
    try:
        with socket.create_connection(where, timeout=timeout):
            return True
    except OSError:
        return False


def cluster_running(address: str, env: dict[str, str] | None = None, timeout: float | None = None) -> bool | None:
    """Whether a Ray cluster answers at ``address`` (`ray status`): True, False (it refused, e.g. for
    want of the token: that is quick), or None when it did not answer within ``timeout``."""
    try:
        res = subprocess.run([ray_bin(), "status", "--address", address], capture_output=True, text=True,
                             timeout=RAY_STATUS_TIMEOUT_S if timeout is None else timeout,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return None
    return res.returncode == 0


def _quiet(_: str) -> None:
    pass


def existing_cluster(say: Callable[[str], None] = _quiet) -> tuple[str, dict[str, str]] | None:
    """The cluster to deploy onto instead of starting one: ``RAY_ADDRESS``, else the one `ray start`
    last started here (Ray's address file), if it answers; with the client settings that reached it.

    An address file outlives its cluster (a reboot, a killed head), so nothing listening at its port
    dismisses it at once; only a port that answers gets a `ray status`, bounded by a timeout. A
    loopback address is probed with Ray's multi-node switch off, or Ray would try the LAN address
    instead (``nodes.LOOPBACK_ENV``). ``say`` hears each step. A Ray that some other process
    started with ``ray.init()`` (a notebook, a test) is not taken.
    """
    from ray._common.utils import get_ray_address_file
    from ray._private.utils import read_ray_address

    from .nodes import AUTH_MODE_ENV, LOOPBACK, LOOPBACK_ENV

    env_address = os.environ.get("RAY_ADDRESS", "auto")
    address = env_address if env_address != "auto" else read_ray_address()
    if not address:
        return None
    source = "RAY_ADDRESS" if env_address != "auto" else f"Ray's address file {get_ray_address_file(None)}"
    say(f"checking the Ray cluster at {address} (from {source}) ...")
    if not gcs_listening(address):
        say(f"  nothing listens at {address}: the address is stale; ignoring it")
        return None
    where = host_port(address)
    base = dict(LOOPBACK_ENV) if where is not None and where[0] in (LOOPBACK, "localhost") else {}
    tries: list[dict[str, str]] = [base]
    if AUTH_MODE_ENV not in os.environ:  # a head holding a token turns auth on by itself
        tries.append({**base, AUTH_MODE_ENV: "token"})
    for env in tries:
        answer = cluster_running(address, env)
        if answer:
            return address, env
        if answer is None:  # a refusal (no token) is quick; silence means no Ray GCS listens there
            say(f"  {address} did not answer as a Ray cluster within {RAY_STATUS_TIMEOUT_S:.0f} s; ignoring it")
            return None
    say(f"  the Ray cluster at {address} refused this machine's settings (token?); ignoring it")
    return None


# Plain API keys stay in the `up` process: it deploys their hashes. A Ray head that inherited them would
# hand them to every worker, and an ingress reading them there would keep old keys valid after a rotation.
SECRET_ENV = (API_KEYS_ENV, ADMIN_KEYS_ENV)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes we start: OpenBLAS on Linux, multi-node on macOS, no API keys."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.update(blas.preload_env())
    if sys.platform == "darwin":
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    env.update(extra or {})
    return env


def deploy(dashboard_url: str, serve_config: dict[str, Any]) -> None:
    """What `serve deploy FILE` does: a declarative update, so re-running changes things in place."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(dashboard_url).deploy_applications(serve_config)


def delete_apps(dashboard_url: str) -> None:
    """Shut Serve down (every application): returns once the replicas have stopped, each after its
    in-flight requests finished or its ``graceful_shutdown_timeout_s`` ran out."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(dashboard_url).delete_applications()


def drain_bound_s(details: dict[str, Any], apps: Collection[str] | None = None) -> float | None:
    """The longest ``graceful_shutdown_timeout_s`` of the applications' deployments (all when
    ``apps`` is None): how long deleting them may wait for requests in flight; None if unknown."""
    bounds = [float(t) for name, app in (details.get("applications") or {}).items() if apps is None or name in apps
              for dep in (app.get("deployments") or {}).values()
              if (t := (dep.get("deployment_config") or {}).get("graceful_shutdown_timeout_s")) is not None]
    return max(bounds, default=None)


def serve_details(dashboard_url: str) -> dict[str, Any]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url).get_serve_details()


def get_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


def wait_ready(url: str, timeout_s: float, progress: Callable[[Any], None] | None = None,
               models: Collection[str] = ()) -> dict[str, Any]:
    """Poll ``/ready`` until every model is ready, ``models`` among them (a redeploy's previous ingress
    answers ready for the models it had until the new one takes over); raises TimeoutError with the
    last answer. ``timeout_s`` counts from the last progress (a replica more running, a download
    further along), so a large download does not trip it; ``progress`` sees every answer."""
    last: Any = "no answer"
    seen, since = None, time.monotonic()
    while time.monotonic() - since < timeout_s:
        try:
            status, body = get_json(url.rstrip("/") + "/ready")
            serving = {m.get("name") for m in body.get("models", [])} if isinstance(body, dict) else set()
            if status == 200 and set(models) <= serving:
                return body
            last = body
        except (OSError, ValueError) as e:
            last = str(e)
        if progress_of(last) != seen:
            seen, since = progress_of(last), time.monotonic()
        if progress:
            progress(last)
        time.sleep(1.0)
    raise TimeoutError(f"no progress for {timeout_s:.0f}s: {last}")


def progress_of(body: Any) -> Any:
    """What counts as progress in a ``/ready`` answer: replicas running, and each starting replica's phase and bytes."""
    if not isinstance(body, dict):
        return None
    return [(m.get("name"), m.get("replicas_healthy"), [(r.get("replica"), r.get("phase"), r.get("done_bytes"))
                                                        for r in m.get("loading", [])])
            for m in body.get("models", [])]


class ReadyPrinter:
    """What ``up`` shows while it waits: each model's running replicas when the count changes, a bar
    per replica downloading its weights, and when a replica moves on to loading them."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}
        self.bars: dict[str, Any] = {}
        self.loading: set[str] = set()

    def __call__(self, body: Any) -> None:
        from tqdm.auto import tqdm

        for m in body.get("models", []) if isinstance(body, dict) else []:
            count = (m.get("replicas_healthy"), m.get("replicas_target"))
            if count != self.counts.get(m["name"]) and count[1] is not None:
                self.counts[m["name"]] = count
                print(f"  {m['name']}: {count[0] or 0} of {count[1]} replicas running", flush=True)
            for r in m.get("loading", []):
                key = r["replica"]
                if r["phase"] == "downloading":
                    bar = self.bars.get(key) or self.bars.setdefault(
                        key, tqdm(desc=f"  {m['name']} {key[:8]} downloading", unit="B", unit_scale=True, leave=True))
                    bar.total = r.get("total_bytes") or None
                    bar.update(int(r.get("done_bytes", 0)) - bar.n)
                elif key not in self.loading:
                    self.loading.add(key)
                    if key in self.bars:
                        self.bars.pop(key).close()
                    print(f"  {m['name']}: replica {key[:8]} loading its weights", flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
