"""``loadtests/bench_sharded.py --quick`` as a user runs it: its own process, its own Ray cluster of two
simulated hosts, ``mlx_lm.server`` under ``mlx.launch``, then everything taken down. The benchmark is
not part of the suite; this smoke run keeps it working, and its JSON saying what it measured.

Runs under the Ray lock (``flock /tmp/mlx-ray-tests.lock``). ``RAY_TMPDIR``, ``HOME`` and the model
cache are the test's own, so the run neither finds nor leaves anything of the session's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import kill_processes_naming

ROOT = Path(__file__).resolve().parent.parent


def _env(home: Path, ray_tmp: Path) -> dict[str, str]:
    drop = ("MLX_SERVING_CACHE", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTEST_CURRENT_TEST", "MLX_SERVING_BENCH_REEXEC")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", MLX_SERVING_CACHE=str(home / "cache"))
    return env


def test_the_quick_sharded_bench_measures_every_path_and_writes_its_ratios(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="mlxs-", dir="/tmp"))  # Ray's socket paths must stay short
    out = tmp_path / "sharded.json"
    try:
        done = subprocess.run([sys.executable, str(ROOT / "loadtests/bench_sharded.py"), "--quick", "--json", str(out)],
                              cwd=ROOT, env=_env(home, ray_tmp), capture_output=True, text=True, timeout=300)
    finally:  # whatever a failed run left: its Ray nodes, and mlx.launch's ranks (they name the model in home)
        kill_processes_naming(ray_tmp)
        kill_processes_naming(home)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "per_token_cost_ms_c1" in done.stdout and "sharded_vs_single_tokens_per_s_c8" in done.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "bench_sharded"
    assert data["settings"]["mode"] == "pipeline" and data["settings"]["ranks"] == 2 and data["settings"]["quick"]
    # the sharded replica really spans the two simulated hosts; the single one holds the whole model
    ranks = data["replicas"]["sharded"]["ranks"]
    assert [(r["rank"], r["host"]) for r in ranks] == [(0, "sim-1"), (1, "sim-2")]
    assert data["replicas"]["single"]["host"] == "sim-1"
    assert data["replicas"]["single"]["bytes_on_rank0"] > data["replicas"]["sharded"]["bytes_on_rank0"]
    assert data["mlx_lm_launch"]["launched"] is True, data["mlx_lm_launch"]["reason"]
    # idle, the follower waits outside MLX's ring (which would keep a core busy): engine.shard's bell
    assert data["replicas"]["sharded"]["idle_cpu_cores_of_other_ranks"] < 0.25

    phases = data["phases"]
    assert data["void_phases"] == 0 and not [p for p in phases + data["warmup"] if p["void"]]
    assert sorted({p["repetition"] for p in phases}) == [0, 1]
    assert sorted((p["repetition"], p["path"], p["concurrency"]) for p in phases) == sorted(
        (rep, path, level) for rep in (0, 1) for path in ("single", "sharded", "mlx_lm_launch") for level in (1, 8))
    for p in phases:  # every client sent 3 requests, each of exactly max_tokens tokens
        assert p["requests"] == 3 * p["concurrency"] and p["errors"] == 0 and p["short_requests"] == 0
        assert p["tokens"] == p["requests"] * data["settings"]["max_tokens"] > 0
        assert p["tokens_per_s"] > 0 and p["ttft_p50_ms"] > 0
    starts = [p["prompts"][0] for p in data["warmup"] + phases]
    assert len(set(starts)) == len(starts)  # every phase had prompts of its own

    ratios = data["ratios"]
    for key in ("sharded_vs_single_tokens_per_s_c1", "sharded_vs_single_tokens_per_s_c8",
                "sharded_vs_single_ttft_p50_c1", "sharded_vs_mlx_lm_launch_tokens_per_s_c8"):
        assert ratios[key] is not None and ratios[key] > 0, key
        assert data["spread"][key]["n"] == 2 and len(data["spread"][key]["values"]) == 2
    # the per-token cost is what the two paths' c=1 tokens/s say it is, repetition by repetition
    for rep, cost in enumerate(data["spread"]["per_token_cost_ms_c1"]["values"]):
        tps = {p["path"]: p["tokens_per_s"] for p in phases if p["repetition"] == rep and p["concurrency"] == 1}
        assert abs(cost - 1000 * (1 / tps["sharded"] - 1 / tps["single"])) < 1e-6
    assert data["per_token_cost_ms_c1"] == data["spread"]["per_token_cost_ms_c1"]["median"]
    assert data["machine"]["cores"] and data["notes"]
