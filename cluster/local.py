"""Bringing up and tearing down what ``mlx-serving up`` owns on this machine.

``up`` writes a small state file saying what it started (the Ray head, the Serve app), so ``down``
stops exactly that and nothing else: a Ray cluster the user started stays up.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Collection

from pydantic import BaseModel

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
    return str(Path(sys.executable).with_name("ray"))


def cluster_running(address: str, env: dict[str, str] | None = None) -> bool:
    """Whether a Ray cluster answers at ``address``."""
    res = subprocess.run([ray_bin(), "status", "--address", address], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    return res.returncode == 0


def existing_cluster() -> tuple[str, dict[str, str]] | None:
    """The cluster to deploy onto instead of starting one: ``RAY_ADDRESS``, else the one `ray start`
    last started here (Ray's bootstrap file), if it answers; with the auth settings that reached it.

    A Ray that some other process started with ``ray.init()`` (a notebook, a test) is not taken.
    """
    from ray._private.utils import read_ray_address

    address = os.environ.get("RAY_ADDRESS") or read_ray_address()
    if not address:
        return None
    tries: list[dict[str, str]] = [{}]
    if "RAY_AUTH_MODE" not in os.environ:  # a head holding a token turns auth on by itself
        tries.append({"RAY_AUTH_MODE": "token"})
    for env in tries:
        if cluster_running(address, env):
            return address, env
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
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(dashboard_url).delete_applications()


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
