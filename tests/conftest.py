"""Shared fixtures: demo models are built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


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
                        "include_dashboard": False},
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
