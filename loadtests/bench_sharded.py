"""Sharded-replica benchmark (issue #14): one model across hosts against the same model on one host,
and against ``mlx_lm.server`` run under ``mlx.launch`` on as many ranks.

Three paths, all started once and kept up for the whole run:

  single          the model on one host: a normal replica, pinned to host ``sim-1``;
  sharded         the same weights as one replica across ``--ranks`` hosts (``sim-1`` .. ``sim-N``),
                  ``--mode pipeline`` (default) or ``tensor``: the ranks talk over MLX's ring backend;
  mlx_lm_launch   ``mlx.launch --hosts 127.0.0.1 -n N --backend ring -- python -m mlx_lm.server
                  --model DIR [--pipeline]``; rank 0 serves HTTP. When it cannot be launched here the
                  JSON says why and the run goes on without it.

``single`` and ``sharded`` are two models of one Serve app, reached over HTTP the same way. The hosts
are Ray nodes of a ``ray.cluster_utils.Cluster`` on 127.0.0.1, labelled ``host=sim-i`` with resource
``host:sim-i`` (as tests/test_sharded_serve.py builds them). On Linux each simulated host gets cores
of its own (the usable cores split evenly; ``--no-pin`` turns it off): node i's processes, and rank i
of mlx.launch, run on host i's cores, as ranks on separate Macs compute side by side. On Macs each
rank has a GPU of its own and the point of sharding is memory; the figure that matters is what
sharding costs per token, ``per_token_cost_ms_c1`` = 1000 x (1 / tokens/s sharded - 1 / tokens/s
single) at c=1.

Every request is ``POST /v1/completions``, streamed, greedy, with EOS biased by -100, so each yields
exactly ``--max-tokens`` tokens. Statistics as docs/benchmarks.md states them (issue #16): the same
warm-up for every path at every level; ``--repeats`` repetitions, each running every path at every
level (one phase at a time, the order of the paths rotating), each phase on prompts no other phase
had; closed-loop clients that stagger their connects and retry a refused one; each client sends
``--requests-per-client`` requests (and keeps on until the phase is ``--min-phase-s`` old: 20 s on a
GPU). A phase in which a request fails after connecting is void, kept with its errors, and its
repetition gives no ratio involving it. The JSON's ``ratios`` are medians over repetitions;
``spread`` has median, min, max and every value. No targets: the figures are reported as they are.

    python loadtests/bench_sharded.py --json docs/bench/sharded_cpu.json
    python loadtests/bench_sharded.py --mode tensor --json bench-out/sharded_tensor.json
    python loadtests/bench_sharded.py --quick          # tiny model, 2 repetitions: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``loadtests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    FreshPrompts, default_min_phase_s, ensure_model, machine_info, reexec_with_openblas, serving_priority, write_json,
)

PATHS = ("single", "sharded", "mlx_lm_launch")
APP = "bench-sharded"
LOG_TAIL = 2000  # characters of mlx.launch's output kept when it fails


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local mlx-lm model directory (default: the demo bench-qwen2 model)")
    p.add_argument("--model-dir", help="where the demo model is built/found")
    p.add_argument("--mode", choices=("pipeline", "tensor"), default="pipeline", help="how the sharded replica splits")
    p.add_argument("--ranks", type=int, default=2, help="hosts (ranks) of the sharded replica and of mlx.launch (2)")
    p.add_argument("--concurrency", default="1,8", help="levels (default 1,8)")
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 32; --quick 8)")
    p.add_argument("--requests-per-client", type=int, default=3,
                   help="fewest requests each client sends per phase (default 3)")
    p.add_argument("--min-phase-s", type=float, default=None,
                   help="fewest seconds per phase; clients stop at 3x this whatever happens "
                        "(default 20 on a GPU, 0 on the CPU and with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 5; --quick 2)")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="warm-up requests per client at every level, for every path (default 2; --quick 1)")
    p.add_argument("--stagger-ms", type=float, default=20.0, help="client k of a phase starts k x this later (20)")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--launch-timeout-s", type=float, default=300.0,
                   help="how long mlx.launch's server may take to answer /health (300)")
    p.add_argument("--note", action="append", default=[], help="a line for the JSON's notes (repeatable)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny-qwen2, 8 tokens, 2 repetitions: a smoke run")
    p.add_argument("--no-pin", action="store_true",
                   help="leave every process on every core (default on Linux: each simulated host gets cores of its own)")
    p.add_argument("--no-openblas", action="store_true")
    a = p.parse_args(argv)
    a.preset = "tiny-qwen2" if a.quick else "bench-qwen2"
    a.levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.max_tokens = a.max_tokens or (8 if a.quick else 32)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.warmup_requests = (1 if a.quick else 2) if a.warmup_requests is None else a.warmup_requests
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = [x for x in a.paths if x not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {PATHS}")
    if not a.levels or min(a.levels) < 1 or min(a.requests_per_client, a.repeats, a.max_tokens) < 1:
        p.error("levels, --requests-per-client, --repeats and --max-tokens must be positive")
    if not 2 <= a.ranks <= 8 or a.warmup_requests < 0:
        p.error("--ranks is 2 to 8, --warmup-requests >= 0")
    return a


def host_names(ranks: int) -> list[str]:
    return [f"sim-{i + 1}" for i in range(ranks)]


# -- simulated hosts get cores of their own ----------------------------------------------------------
def host_cpus(ranks: int, pin: bool) -> list[list[int]] | None:
    """Each simulated host's own cores: this process's usable cores split into ``ranks`` equal disjoint
    sets. Unpinned, the ranks of one path share every core: a rank spinning in the ring's receive
    (MLX's ring polls) then takes the core its peer computes on, which no pair of Macs does, and each
    rank's BLAS starts a thread per core of the machine. None when not pinning (``--no-pin``, no
    ``sched_setaffinity`` as on macOS, or fewer cores than ranks)."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    per = len(usable) // ranks
    return [usable[i * per:(i + 1) * per] for i in range(ranks)] if per else None


@contextmanager
def pinned(cpus: list[int] | None) -> Iterator[None]:
    """This thread on ``cpus`` meanwhile: processes it starts inherit them (and their children too)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_process(pid: int, cpus: list[int]) -> None:
    """Every thread of a running process onto ``cpus`` (threads it starts later inherit them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended meanwhile
            pass


def free_port(span: int = 1) -> int:
    """A loopback port free now, with the ``span - 1`` ports after it free too (the ring's ranks)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span > 65535:
            continue
        try:
            for extra in range(1, span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {span} consecutive free loopback ports")


def cpu_cores_used(pids: list[int], seconds: float = 3.0) -> float | None:
    """CPU cores the processes ``pids`` keep busy over ``seconds`` (idle servers should keep none)."""
    import psutil

    def used() -> float:
        total = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    if not pids:
        return None
    before = used()
    time.sleep(seconds)
    return round((used() - before) / seconds, 2)


# -- the Serve side: simulated hosts, one app with both models ---------------------------------------
def app_args(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    hosts = host_names(args.ranks)
    common = {"source": str(model_dir), "num_cpus": 0, "max_ongoing_requests": 256,
              "engine": {"max_batch_size": max(32, *args.levels)}}
    return {"models": [
        {"name": "single", **common, "hosts": hosts[:1]},
        {"name": "sharded", **common, "shard": {"hosts": hosts, "mode": args.mode}},
    ]}


class SimulatedHosts:
    """A local Ray cluster of ``ranks`` nodes on 127.0.0.1, node i labelled ``host=sim-i`` and its
    processes on the cores ``cpus[i]``, with the Serve app on a free loopback port. ``stop`` takes
    everything down (also after a failed start)."""

    def __init__(self, ranks: int, cpus: list[list[int]] | None) -> None:
        self.ranks, self.cpus = ranks, cpus
        self.cluster: Any = None
        self.port = free_port()

    def start(self, model_dir: Path, args: argparse.Namespace, timeout_s: float = 600) -> str:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from deployments.app import build_app
        from loadtests.bench_http import wait_http

        hosts = host_names(self.ranks)
        def node_args(name: str) -> dict[str, Any]:
            return {"num_cpus": 2, "labels": {"host": name}, "resources": {f"host:{name}": 1000},
                    "node_ip_address": "127.0.0.1"}

        serving_priority()
        with pinned(self.cpus and self.cpus[0]):  # a node's processes and every worker it starts inherit them
            self.cluster = Cluster(initialize_head=True,
                                   head_node_args={**node_args(hosts[0]), "include_dashboard": False})
        for i, name in enumerate(hosts[1:], 1):
            with pinned(self.cpus and self.cpus[i]):
                self.cluster.add_node(**node_args(name))
        env = {k: v for k, v in os.environ.items() if k in ("LD_PRELOAD", "HF_HUB_OFFLINE", "MLX_SERVING_CACHE")}
        ray.init(address=self.cluster.address, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {**env, "MLX_SERVING_LOG_LEVEL": "WARNING"}})
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, proxy_location="HeadOnly",
                    logging_config={"log_level": "WARNING"})
        serve.run(build_app(app_args(model_dir, args)), name=APP, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{self.port}"
        wait_http(base + "/ready", timeout_s)
        return base

    def replicas(self) -> dict[str, Any]:
        """Where each model's replica runs, and the sharded one's ranks (evidence for the JSON)."""
        from ray import serve

        out = {}
        for name in ("single", "sharded"):
            info = serve.get_deployment_handle(f"model-{name}", app_name=APP).info.remote().result(timeout_s=60)
            out[name] = {"host": info.host, "pid": info.pid, "shard": info.models[0].shard,
                         "bytes_on_rank0": info.models[0].nbytes,
                         "ranks": [r.model_dump(mode="json") for r in info.ranks]}
        return out

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()


# -- mlx_lm.server under mlx.launch ------------------------------------------------------------------
class LaunchFailed(RuntimeError):
    pass


class MlxLaunch:
    """``mlx_lm.server`` on ``ranks`` ring ranks on 127.0.0.1, started by ``mlx.launch``.

    It starts on host 0's cores (rank r is moved to host r's once up) in a session of its own, so
    ``pause``, ``resume`` and ``stop`` reach mlx.launch and every rank it started (one process group)
    and nothing else. Idle, the group is not idle (``Bystanders``): it is frozen outside its phases.
    mlx.launch gets a stdin pipe that stays open, as a terminal would be: at end of file its main loop
    would spin on it."""

    def __init__(self, model_dir: Path, ranks: int, mode: str, cpus: list[list[int]] | None) -> None:
        self.model_dir, self.ranks, self.mode, self.cpus = model_dir, ranks, mode, cpus
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="mlx-launch-", suffix=".log")[1])
        self.port = free_port()
        self.ring_port = free_port(ranks)
        launcher = Path(sys.executable).with_name("mlx.launch")
        self.launcher = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
        self.command = [self.launcher or "mlx.launch", "--hosts", "127.0.0.1", "-n", str(ranks), "--backend", "ring",
                        "--starting-port", str(self.ring_port), "--", sys.executable, "-m", "mlx_lm.server",
                        "--model", str(model_dir), *(["--pipeline"] if mode == "pipeline" else []),
                        "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING"]
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> str:
        """The server's base URL once rank 0 answers ``/health``; ``LaunchFailed`` with the reason."""
        import httpx
        import mlx.core as mx

        if self.launcher is None:
            raise LaunchFailed("mlx.launch is not installed next to this Python or on PATH")
        if not mx.distributed.is_available("ring"):
            raise LaunchFailed("MLX's ring backend is not available on this machine")
        with open(self.log_path, "wb") as log, pinned(self.cpus and self.cpus[0]):  # run from host 0, as on Macs
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchFailed(f"mlx.launch exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    self._pin_ranks()
                    return self.base
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LaunchFailed(f"rank 0 did not answer /health within {timeout_s:g}s: {self.log_tail()}")

    def _pin_ranks(self) -> None:
        """Rank r (``MLX_RANK`` in its environment) onto host r's cores; all started on host 0's."""
        if self.cpus is None or self.proc is None:
            return
        import psutil

        for child in psutil.Process(self.proc.pid).children():
            try:
                rank = int(child.environ().get("MLX_RANK", "0"))
            except (psutil.Error, ValueError):
                continue
            if 0 < rank < len(self.cpus):
                pin_process(child.pid, self.cpus[rank])

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """mlx.launch and the ranks it started."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid) if self.proc is not None else None
            return [root.pid, *(c.pid for c in root.children(recursive=True))] if root else []
        except psutil.Error:
            return []

    def _signal(self, sig: int) -> bool:
        """Send ``sig`` to the launcher's process group; False when no process of it is left."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the group (resumed, so it can act on it), SIGKILL to what is left after ``grace_s``."""
        if self.proc is None:
            return
        self.resume()
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._signal(0):
            if self.proc.poll() is None:
                try:
                    self.proc.wait(0.5)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        self._signal(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.log_path.unlink(missing_ok=True)


# -- phases ------------------------------------------------------------------------------------------
class Bystanders:
    """Keeps the mlx.launch group off the cores of the path being measured. Idle, it is not idle:
    MLX's ring polls while a rank waits in a collective, so its ranks above 0 keep a core busy, and
    mlx.launch's output threads poll too. Outside its own phases it is frozen (SIGSTOP). The sharded
    replica needs no such help: idle, its ranks wait outside the ring (engine.shard's bell), which
    ``replicas.sharded.idle_cpu_cores_of_other_ranks`` records. ``release`` wakes the group, before
    shutdown."""

    def __init__(self, launch: MlxLaunch | None) -> None:
        self.launch = launch

    def measure(self, path: str) -> None:
        """``path``'s phase starts."""
        if self.launch is not None and path == "mlx_lm_launch":
            self.launch.resume()
        elif self.launch is not None:
            self.launch.pause()

    def release(self) -> None:
        if self.launch is not None:
            self.launch.resume()


async def run_all(args: argparse.Namespace, bases: dict[str, tuple[str, str]], bias: dict[str, float],
                  min_s: float, bystanders: Bystanders) -> dict[str, Any]:
    """Warm-up, then the interleaved repetitions, against paths that stay up throughout."""
    import httpx

    from loadtests.bench_http import http_request, phase as run_phase

    async def phase(path: str, level: int, prompts: FreshPrompts, per_client: int, phase_s: float) -> dict[str, Any]:
        """One phase on new connections (a keep-alive connection idle while other paths ran may be
        closed under the next request), the other paths' servers kept off its cores."""
        base, model = bases[path]
        bystanders.measure(path)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=level + 4)) as h:
            return await run_phase(path, level, lambda prompt: http_request(h, model, prompt, args.max_tokens, bias),
                                   prompts, per_client, phase_s, args.stagger_ms)

    paths = [p for p in args.paths if p in bases]
    prompts = FreshPrompts()
    warmup: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = []
    for path in paths:  # the same warm-up for every path: every level, fresh prompts
        for level in args.levels:
            if args.warmup_requests:
                w = await phase(path, level, prompts, args.warmup_requests, 0.0)
                warmup.append(w)
                print(f"warm-up {path:<14} c={level:<3} {w['requests']} requests, void {w['void']}"
                      + (f": {w['error_list'][0]}" if w["void"] else ""), flush=True)
    for rep in range(args.repeats):
        order = paths[rep % len(paths):] + paths[:rep % len(paths)]
        for level in args.levels:
            for path in order:
                s = await phase(path, level, prompts, args.requests_per_client, min_s)
                s["repetition"] = rep
                phases.append(s)
                print(f"rep {rep} {path:<14} c={level:<3} {s['tokens_per_s']:8.1f} tok/s  {s['requests']} requests "
                      f"{s['wall_s']:6.1f}s  TTFT p50 {s['ttft_p50_ms']:7.1f} ms  retries {s['connect_retries']}"
                      + (f"  VOID: {s['error_list'][0]}" if s["void"] else ""), flush=True)
    return {"warmup": warmup, "phases": phases}


def per_repetition(phases: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, float | None]]:
    """Each repetition's ratios and per-token cost; None where a phase it needs is void or was not run."""
    out = []
    for rep in range(args.repeats):
        by = {(p["path"], p["concurrency"]): p for p in phases if p["repetition"] == rep}

        def get(path: str, level: int, key: str) -> float | None:
            p = by.get((path, level))
            return None if p is None or p["void"] or not p[key] else p[key]

        def div(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        r: dict[str, float | None] = {}
        for level in args.levels:
            sh, one = get("sharded", level, "tokens_per_s"), get("single", level, "tokens_per_s")
            r[f"sharded_vs_single_tokens_per_s_c{level}"] = div(sh, one)
            r[f"sharded_vs_single_ttft_p50_c{level}"] = div(get("sharded", level, "ttft_p50_ms"),
                                                            get("single", level, "ttft_p50_ms"))
            r[f"sharded_vs_mlx_lm_launch_tokens_per_s_c{level}"] = div(sh, get("mlx_lm_launch", level, "tokens_per_s"))
            r[f"per_token_cost_ms_c{level}"] = None if sh is None or one is None else 1000 * (1 / sh - 1 / one)
        out.append(r)
    return out


def notes(args: argparse.Namespace, info: dict[str, Any], cpus: list[list[int]] | None) -> list[str]:
    hosts = host_names(args.ranks)
    where = (f"each pinned to cores of its own ({'; '.join(f'{h}: {c}' for h, c in zip(hosts, cpus))}; the "
             "benchmark's clients on every core)" if cpus else "all sharing every core (not pinned)")
    return [
        f"The {args.ranks} hosts are Ray nodes on this one machine (127.0.0.1, {info['usable_cores']} usable cores), "
        f"{where}. `single` computes on sim-1's cores; `sharded` and mlx_lm_launch on every host's. sim-1 is the Ray "
        "head: its cores also run Ray's head services and Serve's controller and HTTP proxy. mlx.launch runs "
        "from sim-1, as it would from the first Mac. On Macs each rank has a GPU of its own and what sharding buys "
        "is memory: the figure that matters is the cost per token.",
        "per_token_cost_ms_c1 = 1000 x (1 / tokens/s sharded - 1 / tokens/s single) at one client, per repetition "
        "(median in the top-level key, spread under spread); tokens/s is generated tokens over the phase's wall "
        "time, prefill included.",
        "MLX's ring polls while a rank waits in a collective: mlx_lm.server's ranks above 0 keep a core busy "
        "between requests (mlx_lm_launch.idle_cpu_cores, measured right after start-up), and mlx.launch's per-rank "
        "output threads poll select() on the ranks' always-writable stdin pipes, so the mlx.launch group is frozen "
        "(SIGSTOP) outside its own phases. The sharded replica's ranks above 0 wait outside the ring when idle "
        "(replicas.sharded.idle_cpu_cores_of_other_ranks) and stay up, like the single replica.",
        *args.note,
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray swaps 127.0.0.1 for the LAN address while multi-node clusters are enabled (read when Ray is
    # imported): off, every node and the rings between the ranks stay on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still takes its servers down
    model_dir = ensure_model(args.model, args.model_dir, args.preset)
    from engine.shard import supported_modes
    from loadtests.bench_http import eos_bias, phase_settings, report

    modes = supported_modes(str(model_dir))
    if args.mode not in modes:
        raise SystemExit(f"{model_dir.name}: its architecture offers shard mode(s) {sorted(modes) or 'none'}, "
                         f"not {args.mode!r}")
    min_s = default_min_phase_s(args.quick) if args.min_phase_s is None else args.min_phase_s
    bias = eos_bias(model_dir)
    cpus = host_cpus(args.ranks, not args.no_pin)
    print("simulated hosts' cores: " + (", ".join(f"{h} {c}" for h, c in zip(host_names(args.ranks), cpus))
                                        if cpus else "not pinned (every process on every core)"), flush=True)
    bases: dict[str, tuple[str, str]] = {}
    launch_record: dict[str, Any] | None = None
    hosts: SimulatedHosts | None = None
    launch: MlxLaunch | None = None
    replicas: dict[str, Any] = {}
    bystanders: Bystanders | None = None
    t_start = time.monotonic()
    try:  # every path starts once and stays up; only the phases interleave
        if {"single", "sharded"} & set(args.paths):
            hosts = SimulatedHosts(args.ranks, cpus)
            t = time.monotonic()
            base = hosts.start(model_dir, args)
            replicas = hosts.replicas()
            from engine.shard import IDLE_AFTER_S

            time.sleep(IDLE_AFTER_S + 1.0)  # idle, rank 0 sends its other ranks to wait outside the ring
            replicas["sharded"]["idle_cpu_cores_of_other_ranks"] = cpu_cores_used(
                [r["pid"] for r in replicas["sharded"]["ranks"] if r["rank"] > 0])
            print(f"Serve app up in {time.monotonic() - t:.0f}s; sharded ranks on "
                  f"{[r['host'] for r in replicas['sharded']['ranks']]}", flush=True)
            bases.update({p: (base, p) for p in ("single", "sharded") if p in args.paths})
        if "mlx_lm_launch" in args.paths:
            launch = MlxLaunch(model_dir, args.ranks, args.mode, cpus)
            launch_record = {"command": launch.command, "launched": False, "reason": None}
            t = time.monotonic()
            try:
                bases["mlx_lm_launch"] = (launch.start(args.launch_timeout_s), str(model_dir))
                launch_record.update(launched=True, idle_cpu_cores=cpu_cores_used(launch.pids()))
                launch.pause()
                print(f"mlx_lm.server under mlx.launch up in {time.monotonic() - t:.0f}s ({args.ranks} ranks); idle, it "
                      f"keeps {launch_record['idle_cpu_cores']} cores busy", flush=True)
            except LaunchFailed as e:
                launch_record["reason"] = str(e)
                print(f"mlx_lm.server under mlx.launch could not be launched; going on without it: {e}", flush=True)
                launch.stop()
                launch = None
        bystanders = Bystanders(launch)
        out = asyncio.run(run_all(args, bases, bias, min_s, bystanders))
    finally:
        if bystanders is not None:
            bystanders.release()
        if launch is not None:
            launch.stop()
        if hosts is not None:
            hosts.stop()

    phases = out["phases"]
    per_rep = per_repetition(phases, args)
    results, void, summary = report(phases, per_rep)
    cost = summary.get("per_token_cost_ms_c1", {}).get("median")
    print(f"per_token_cost_ms_c1: {cost if cost is None else round(cost, 2)} ms per token "
          f"({args.mode}, {args.ranks} ranks; median over repetitions)")
    if args.json:
        info = machine_info()
        write_json(args.json, {
            "benchmark": "bench_sharded", "machine": info, "model": str(model_dir),
            "settings": {"mode": args.mode, "ranks": args.ranks, "hosts": host_names(args.ranks),
                         "host_cpus": dict(zip(host_names(args.ranks), cpus)) if cpus else None,
                         **phase_settings(args, min_s)},
            "notes": notes(args, info, cpus), "replicas": replicas, "mlx_lm_launch": launch_record,
            "results": results, "ratios": {k: v["median"] for k, v in summary.items() if not k.startswith("per_token")},
            "per_token_cost_ms_c1": cost, "spread": summary, "ratios_per_repetition": per_rep,
            "void_phases": len(void), "phases": phases, "warmup": out["warmup"],
            "wall_s": round(time.monotonic() - t_start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
