"""The README's main command: `mlx-serving up` on a machine with no cluster of its own (and a stale Ray
address file), Ray's own `serve` CLI against it, then `down`.

Runs the real CLI in subprocesses. ``RAY_TMPDIR`` points Ray at a directory of this test's own, so
`up` finds no running cluster there and starts its head; the session's Ray cluster on the same
machine must survive `down` (it never runs `ray stop`). ``RAY_AUTH_TOKEN_PATH`` points at a file of
the test's own: `up` makes the token there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from openai import OpenAI

from cluster import exposure, nodes, serve_config
from deployments.http.auth import hash_key, new_key

MLX_SERVING = Path(sys.executable).with_name("mlx-serving")
SERVE = Path(sys.executable).with_name("serve")  # Ray Serve's own CLI


def _env(tmp_path: Path, rt: Path, **extra: str) -> dict[str, str]:
    """This test's own cache, Ray temp dir and token file; no Ray address, auth mode or key but ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLX_SERVING_API_KEYS", "MLX_SERVING_ADMIN_KEYS")}
    return {**env, "MLX_SERVING_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(rt),
            "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"), **extra}


def test_up_refuses_a_network_port_without_a_key_before_starting_anything(tmp_path: Path) -> None:
    rt = Path(tempfile.mkdtemp(prefix="mlxr-", dir="/tmp"))
    try:
        t0 = time.monotonic()
        res = subprocess.run([str(MLX_SERVING), "up", "--host", "0.0.0.0", "--port", "18123"], capture_output=True,
                             text=True, env=_env(tmp_path, rt), timeout=120)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "--allow-unauthenticated-network" in res.stderr
        assert "args.auth.allow_unauthenticated_network: true" in res.stderr
        assert "0.0.0.0:18123 is reachable from the network" in res.stderr
        assert "starting a Ray head" not in res.stdout and time.monotonic() - t0 < 60
        assert not (tmp_path / "token").exists() and not (tmp_path / "cache" / "cluster-state.json").exists()
        assert not any(rt.iterdir())  # no Ray session was made
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def _replicas(details: dict[str, Any], deployment: str) -> list[tuple[str, int]]:
    deps = details["applications"]["mlx-serving"]["deployments"]
    return sorted((r["replica_id"], r["pid"]) for r in deps[deployment]["replicas"] if r["state"] == "RUNNING")


def test_up_serves_the_demo_with_keys_and_down_stops_only_its_own_head(ray_cluster: Any, tmp_path: Path) -> None:
    from conftest import free_port, kill_processes_naming

    cache = tmp_path / "cache"
    rt = Path(tempfile.mkdtemp(prefix="mlxu-", dir="/tmp"))  # Ray's socket paths must stay short
    key, rotated = new_key(), new_key()
    env = _env(tmp_path, rt, MLX_SERVING_API_KEYS=key)
    port, gcs, dash = free_port(), free_port(), free_port()

    def cli(*args: str, timeout: float = 420, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(MLX_SERVING), *args], capture_output=True, text=True, env={**env, **extra},
                              timeout=timeout)

    def dashboard_get(path: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"http://127.0.0.1:{dash}{path}", headers=headers, timeout=30)

    stale = free_port()  # an address file left by a Ray that is gone: nothing listens at its port
    (rt / "ray").mkdir()
    (rt / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{stale}")  # where Ray's address file is (RAY_TMPDIR)
    try:
        up = cli("up", "--port", str(port), "--ray-port", str(gcs), "--dashboard-port", str(dash),
                 "--num-cpus", "2", "--timeout", "300")
        assert up.returncode == 0, up.stdout + up.stderr
        # Every phase is said before it starts; the stale address is dismissed by the port probe, not after
        # 40 s of `ray status` retries (tests/test_cli_walkthrough.py counts the calls).
        address_file = rt / "ray" / "ray_current_cluster"
        phases = [f"checking the Ray cluster at 127.0.0.1:{stale} (from Ray's address file {address_file}) ...",
                  f"  nothing listens at 127.0.0.1:{stale}: the address is stale; ignoring it",
                  f"starting a Ray head on this machine (GCS 127.0.0.1:{gcs}, dashboard 127.0.0.1:{dash}) ...",
                  "Ray head up in ", f"demo model demo:tiny at {cache}/models/demo-tiny (built offline if missing) ...",
                  f"deploying {serve_config.DEFAULT_CONFIG} ...",
                  "waiting for the replicas of demo to load", "ready: demo"]
        at = [up.stdout.find(p) for p in phases]
        assert -1 not in at and at == sorted(at), list(zip(phases, at))
        base = re.search(r"OpenAI API: (\S+)", up.stdout)
        assert base is not None, up.stdout
        state = nodes.ClusterState.model_validate_json((cache / "cluster-state.json").read_text())
        assert state.mode == "local" and state.auth_mode == "token" and nodes.alive(state.nodes[0])
        assert state.address == f"127.0.0.1:{gcs}" and "--node-ip-address=127.0.0.1" in state.nodes[0].argv
        token_file = tmp_path / "token"
        assert state.token_path == str(token_file) and token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) == 64

        # What `up` says about exposure, and never a key.
        assert "Ray token auth: on" in up.stdout
        assert "API of mlx-serving: a key is required (1 API key(s), 0 admin key(s) configured)" in up.stdout
        assert f"Serve HTTP: 127.0.0.1:{port} (loopback only)" in up.stdout
        beyond_text, local_text = up.stdout.split("listening beyond loopback")[1].split("loopback only:")
        assert re.match(r" \d+ more socket\(s\) of \d+ process\(es\)", local_text), local_text
        # Beyond loopback: only Serve's inter-deployment gRPC server of each replica (Serve binds it to [::]).
        found = exposure.listeners(exposure.tree_pids([state.nodes[0].pid]))
        beyond = exposure.split(found)[0]
        assert len(found) > 10 and {x.process for x in beyond} == {
            "ray::ServeReplica:mlx-serving:model-demo", "ray::ServeReplica:mlx-serving:ingress"}, found
        assert all(x.host == "::" for x in beyond) and all(f"[::]:{x.port}" in beyond_text for x in beyond)
        for text in (up.stdout, up.stderr, *(p.read_text() for p in cache.glob("*.json"))):
            assert key not in text
        for x in beyond:  # ... and it needs the Ray token (calls over loopback; a wrong token is refused too)
            for metadata in [(), (("authorization", "Bearer " + "0" * 64),)]:
                with grpc.insecure_channel(f"127.0.0.1:{x.port}") as channel:
                    with pytest.raises(grpc.RpcError) as refused:
                        channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=30, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (x, refused.value)

        # The key reached the ingress (as a hash, through its user_config; the Ray head never saw it).
        r = httpx.post(base.group(1) + "/chat/completions", timeout=120,
                       json={"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
        assert r.status_code == 401, r.text
        client = OpenAI(base_url=base.group(1), api_key=key, max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 1
        for pid in exposure.tree_pids([state.nodes[0].pid]):
            try:
                assert key not in json.dumps(psutil.Process(pid).environ()), pid
            except psutil.NoSuchProcess:
                continue

        # What Serve holds (`serve config`, the dashboard): the hash, never the key; the dashboard needs the token.
        assert dashboard_get("/api/serve/applications/", None).status_code == 401
        details = dashboard_get("/api/serve/applications/", token)
        assert details.status_code == 200 and hash_key(key) in details.text and key not in details.text
        models_before = _replicas(details.json(), "model-demo")
        assert len(models_before) == 1

        # Rotation: the new key works, the old one no longer does, and no model replica restarted.
        again = cli("up", "--port", str(port), "--ray-port", str(gcs), "--dashboard-port", str(dash), "--timeout", "300",
                    MLX_SERVING_API_KEYS=rotated)
        assert again.returncode == 0 and "using the Ray cluster started by `mlx-serving up`" in again.stdout, again.stdout
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

        def answers(k: str) -> int:
            return httpx.post(base.group(1) + "/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {k}"}).status_code

        deadline = time.monotonic() + 60  # the ingress reconfigures right after the deploy returns
        while answers(key) != 401 and time.monotonic() < deadline:
            time.sleep(1)
        assert (answers(key), answers(rotated)) == (401, 200)
        details = dashboard_get("/api/serve/applications/", token).json()
        assert _replicas(details, "model-demo") == models_before

        status = cli("status", timeout=180, MLX_SERVING_API_KEYS=rotated)
        assert status.returncode == 0 and "model demo: ready" in status.stdout, status.stdout + status.stderr
        qos = status.stdout.split("qos (one ingress replica's view")[1]  # GET /qos, with the key
        assert re.search(r"model demo: \d+/64 in flight, 0 waiting, 0 expired in the queue", qos), qos
        assert "Ray token auth: on" in status.stdout and "a key is required (1 API key(s)" in status.stdout
        local_text = status.stdout.split("loopback only:")[1]  # status lists them one by one
        for what, where in [("Ray GCS (gcs_server)", gcs), ("Ray dashboard (dashboard.py)", dash),
                            ("Serve HTTP proxy (ray::ProxyActor)", port)]:
            assert re.search(rf"{re.escape(what)} \(pid \d+\): .*127\.0\.0\.1:{where}\b", local_text), what
        assert "ray::ServeReplica:mlx-serving:ingress" in status.stdout.split("listening beyond loopback")[1]
        assert key not in status.stdout and rotated not in status.stdout

        doctor = cli("doctor", timeout=120)
        assert doctor.returncode == 0 and "nothing to fix" in doctor.stdout, doctor.stdout + doctor.stderr
        assert "ok  ray auth: token auth on" in doctor.stdout and re.search(r"(ok  |    )blas: ", doctor.stdout)
        assert "only Serve's replica gRPC" in doctor.stdout, doctor.stdout

        # The one-liner: one model, a config built in memory (and written out), deployed into this cluster.
        emitted = tmp_path / "served.yaml"
        served = cli("serve", "demo:tiny", "--name", "tiny-2", "--port", str(port), "--emit-config", str(emitted),
                     "--timeout", "300", MLX_SERVING_API_KEYS=rotated)
        assert served.returncode == 0 and "ready: tiny-2" in served.stdout, served.stdout + served.stderr
        assert "using the Ray cluster started by `mlx-serving up`" in served.stdout
        written = serve_config.load(emitted)
        assert serve_config.problems(written) == [] and written["http_options"]["port"] == port
        assert written["applications"][0]["args"]["models"] == [
            {"name": "tiny-2", "source": "demo:tiny", "num_replicas": 1, "num_cpus": 0.5}]
        assert rotated not in emitted.read_text() and "sha256:" not in emitted.read_text()
        client = OpenAI(base_url=base.group(1), api_key=rotated, max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="tiny-2", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3)
        assert answer.model == "tiny-2" and answer.usage is not None and answer.usage.completion_tokens == 3

        # Ray Serve's own CLI against this cluster, from a new shell (no token path of this test's), after
        # the one line `up` printed: Ray's CLI sends the token only with RAY_AUTH_MODE=token.
        export = re.search(r"^  export (.+)$", up.stdout, re.M)
        assert export is not None, up.stdout
        ray_env = dict(kv.split("=", 1) for kv in shlex.split(export.group(1)))
        assert ray_env == {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                           "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{dash}"}
        shell = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "MLX_SERVING_API_KEYS")}

        def serve_cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(SERVE), *args], capture_output=True, text=True, env={**shell, **extra},
                                  timeout=120)

        denied = serve_cli("status", RAY_DASHBOARD_ADDRESS=ray_env["RAY_DASHBOARD_ADDRESS"])  # why the line is printed
        assert denied.returncode != 0 and "Missing authentication token" in denied.stdout + denied.stderr, denied

        def keyless() -> int:  # the API without a key: refused while the rotated key is deployed
            return httpx.post(base.group(1) + "/chat/completions", timeout=120, json={
                "model": "tiny-2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).status_code

        assert keyless() == 401
        deployed = serve_cli("deploy", str(emitted), **ray_env)  # the plain file: no key in it
        assert deployed.returncode == 0 and "Sent deploy request successfully" in deployed.stdout + deployed.stderr, (
            deployed.stdout + deployed.stderr)
        deadline = time.monotonic() + 60  # the ingress reconfigures once Serve applied the file
        while keyless() != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert keyless() == 200
        deadline = time.monotonic() + 60
        while not re.search(r"mlx-serving:\s+status: RUNNING", (listed := serve_cli("status", **ray_env)).stdout) \
                and time.monotonic() < deadline:
            time.sleep(1)
        assert listed.returncode == 0 and re.search(r"mlx-serving:\s+status: RUNNING", listed.stdout), listed
        ray_status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status"], capture_output=True,
                                    text=True, env={**shell, **ray_env}, timeout=120)  # the address file `up` left
        assert ray_status.returncode == 0, ray_status.stdout + ray_status.stderr

        down = cli("down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        steps = ["deleting the Serve application(s) mlx-serving: waiting up to 30 s for in-flight requests to "
                 "drain ...", "  deleted in ", f"stopping the local Ray head `mlx-serving up` started (127.0.0.1:{gcs}); "
                 "Serve is gone, so Ray's node drain has nothing to wait for", "stopping the Ray node(s) started here:",
                 "stopped"]
        at = [down.stdout.find(p) for p in steps]
        assert -1 not in at and at == sorted(at), down.stdout
        head = state.nodes[0]
        assert head.pid is not None and not nodes._group_alive(head.pid)
        assert not (cache / "cluster-state.json").exists() and not (cache / "up-state.json").exists()
        import ray  # the session's own cluster, on the same machine, is untouched

        assert any(n["Alive"] for n in ray.nodes())
        assert "nothing to stop" in cli("down").stdout
    finally:  # whatever failed: no Ray process of this test outlives it
        left = cache / "cluster-state.json"
        for n in nodes.ClusterState.model_validate_json(left.read_text()).nodes if left.exists() else []:
            nodes.stop_local(n, hard=True)
        kill_processes_naming(rt)
        shutil.rmtree(rt, ignore_errors=True)


def test_up_refuses_to_start_a_head_with_auth_disabled(tmp_path: Path) -> None:
    rt = Path(tempfile.mkdtemp(prefix="mlxd-", dir="/tmp"))
    try:
        res = subprocess.run([str(MLX_SERVING), "up", "--port", "18124"], capture_output=True, text=True, timeout=180,
                             env=_env(tmp_path, rt, RAY_AUTH_MODE="disabled"))
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Ray's GCS listens on every network interface" in res.stderr
        assert "any host on the network could join the cluster and run code on this machine" in res.stderr
        assert not (tmp_path / "cache" / "cluster-state.json").exists() and not (tmp_path / "token").exists()
    finally:
        shutil.rmtree(rt, ignore_errors=True)
