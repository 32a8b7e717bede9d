"""Shared fixtures: demo models are built once per session, offline."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray replaces a 127.0.0.1 node address by the machine's LAN address while multi-node clusters are
# enabled (always on Linux): off, the session's nodes and everything they start stay on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    # Every /v1/chat/completions and /v1/completions answer a test reads, each SSE event included, must
    # validate against the openai package's own types (tests/openai_types.py): a violation fails the test.
    import openai_types

    openai_types.install()
    config.pluginmanager.register(openai_types, "openai-types")


@pytest.fixture(scope="session")
def vision_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo_vision import make_demo_vision_model

    return make_demo_vision_model(tmp_path_factory.mktemp("models") / "vision")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


def kill_processes_naming(path: Path) -> None:
    """SIGKILL every process (but this one) whose command line names ``path``: the Ray nodes a test
    started with that temp dir, whatever state the test left them in."""
    import signal
    import subprocess

    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        if str(path) in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One Ray cluster for the whole session: a head node labelled as host ``sim-1``.

    Fleet tests add labelled nodes to it; Serve's HTTP proxy runs on the head only (one port).
    """
    import ray
    from ray.cluster_utils import Cluster

    cache = tmp_path_factory.mktemp("mlx-serving-cache")
    os.environ["MLX_SERVING_CACHE"] = str(cache)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "labels": {"host": "sim-1"}, "resources": {"host:sim-1": 1000},
                        "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    ray.init(address=cluster.address, runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MLX_SERVING_CACHE": str(cache)}})
    yield cluster
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return port


MAX_BODY = 64 * 1024


@pytest.fixture(scope="session")
def app_url(serve_port: int, tiny_model_dir: Path, vision_model_dir: Path) -> str:
    """The shared Serve apps: ``main`` at / (auth off) and ``secure`` at /secure (auth on)."""
    from ray import serve

    from deployments.app import build_app
    from deployments.http.auth import hash_key

    tiny = str(tiny_model_dir)
    main = {
        "models": [
            {"name": "demo", "source": tiny, "num_cpus": 0},
            {"name": "victim", "source": tiny, "num_cpus": 0},
            {"name": "narrow", "source": tiny, "num_cpus": 0, "engine": {"max_batch_size": 1, "max_waiting": 0}},
            {"name": "vision", "source": str(vision_model_dir), "num_cpus": 0},
        ],
        "limits": {"max_body_bytes": MAX_BODY},
    }
    # Auth on; and a deadline so short that every generation passes it (the 504 path).
    secure = {
        "models": [{"name": "guarded", "source": tiny, "num_cpus": 0}],
        "auth": {"api_keys": [hash_key("sk-test-key")]},
        "limits": {"request_timeout_s": 1e-6},
    }
    serve.run(build_app(main), name="main", route_prefix="/")
    serve.run(build_app(secure), name="secure", route_prefix="/secure")
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="session")
def client(app_url: str):
    import openai

    return openai.OpenAI(base_url=app_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def token_id(app_url: str, text: str, model: str = "demo") -> int:
    import httpx

    toks = httpx.post(app_url + "/tokenize", json={"model": model, "prompt": text}).json()["tokens"]
    assert len(toks) == 1, (text, toks)
    return toks[0]


def no_eos(app_url: str, model: str = "demo") -> dict[str, float]:
    """A logit_bias that keeps the random demo model from ending early."""
    return {str(token_id(app_url, "<|im_end|>", model)): -100.0}


def wait_app_ready(url: str, timeout_s: float = 120.0) -> None:
    """Until the app at ``url`` answers ``/ready`` with 200 (its replicas loaded)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while httpx.get(url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "app never became ready"
        time.sleep(0.5)


def wait_for(condition: Any, timeout: float = 60.0, every: float = 0.2) -> Any:
    """``condition()``'s first truthy value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def add_host(cluster: Any, name: str) -> Any:
    """A Ray node of the session cluster on 127.0.0.1, labelled as host ``name`` (a simulated Mac)."""
    return cluster.add_node(num_cpus=1, labels={"host": name}, resources={f"host:{name}": 1000},
                            node_ip_address="127.0.0.1")


def replica_info(app: str, deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).info.remote().result()


def ray_log_lines(needle: str) -> list[dict]:
    """The JSON log lines holding ``needle`` that this session's Ray workers wrote (ingress, replicas)."""
    import json

    import ray

    logs_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    out = []
    for f in list(logs_dir.glob("worker-*.err")) + list(logs_dir.glob("worker-*.out")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if needle not in text:
            continue
        for line in text.splitlines():
            if needle in line and line.lstrip().startswith("{"):
                try:
                    out.append(json.loads(line[line.index("{"):]))
                except ValueError:
                    pass
    return out
