"""The README's main command: `mlx-serving up` on a machine with no cluster of its own, then `down`.

Runs the real CLI in subprocesses. ``RAY_TMPDIR`` points Ray at a directory of this test's own, so
`up` finds no running cluster there and starts its head; the session's Ray cluster on the same
machine must survive `down` (it never runs `ray stop`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from openai import OpenAI

from cluster import nodes

MLX_SERVING = Path(sys.executable).with_name("mlx-serving")


def test_up_serves_the_demo_and_down_stops_only_its_own_head(ray_cluster: Any, tmp_path: Path) -> None:
    from conftest import free_port, kill_processes_naming

    cache = tmp_path / "cache"
    rt = Path(tempfile.mkdtemp(prefix="mlxu-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "MLX_SERVING_CACHE": str(cache), "RAY_TMPDIR": str(rt),
           "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token")}
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(k, None)
    port, gcs, dash = free_port(), free_port(), free_port()

    def cli(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
        return subprocess.run([str(MLX_SERVING), *args], capture_output=True, text=True, env=env, timeout=timeout)

    try:
        up = cli("up", "--port", str(port), "--ray-port", str(gcs), "--dashboard-port", str(dash),
                 "--num-cpus", "2", "--timeout", "300")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "starting a Ray head" in up.stdout
        base = re.search(r"OpenAI API: (\S+)", up.stdout)
        assert base is not None, up.stdout
        state = nodes.ClusterState.model_validate_json((cache / "cluster-state.json").read_text())
        assert state.mode == "local" and state.auth_mode == "disabled" and nodes.alive(state.nodes[0])

        client = OpenAI(base_url=base.group(1), api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 1

        again = cli("up", "--port", str(port), "--ray-port", str(gcs), "--dashboard-port", str(dash), "--timeout", "300")
        assert again.returncode == 0 and "using the Ray cluster started by `mlx-serving up`" in again.stdout, again.stdout

        status = cli("status", timeout=180)
        assert status.returncode == 0 and "model demo: ready" in status.stdout, status.stdout + status.stderr

        down = cli("down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        head = state.nodes[0]
        assert head.pid is not None and not nodes._group_alive(head.pid)
        assert not (cache / "cluster-state.json").exists() and not (cache / "up-state.json").exists()
        import ray  # the session's own cluster, on the same machine, is untouched

        assert any(n["Alive"] for n in ray.nodes())
        assert "nothing to stop" in cli("down").stdout
    finally:  # whatever failed: no Ray process of this test outlives it (they all name its temp dir)
        kill_processes_naming(rt)
        shutil.rmtree(rt, ignore_errors=True)
