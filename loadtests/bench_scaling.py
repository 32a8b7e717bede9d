"""Replica scaling: aggregate tokens/s of two replicas on two hosts over one replica on one host.

Starts two Ray nodes on this machine with the product's own node tooling (``ray start --block`` in
process groups of their own, stopped at the end), each labelled ``host=node-<i>``. On a CUDA machine
node i sees only GPU i (``CUDA_VISIBLE_DEVICES``) and offers one GPU, so every "host" is one GPU.

Each host is served as the product serves a fleet: an HTTP proxy on every node (``proxy_location:
EveryNode``, as in ``config/*.yaml``) in front of its own ingress replica, with its own clients. Both
nodes share this machine's loopback address, so node-2's proxy binds a port of its own (Ray Serve's
``RAY_SERVE_WORKER_PROXY_HTTP_PORT``, set in that node's environment). Two apps stay up side by side
for the whole run: ``one`` (at ``/one``: one model replica, pinned to node-1) and ``two`` (at
``/two``: one replica on each node, ``max_replicas_per_node: 1``); on a GPU each replica takes half
its node's GPU, so node-1 holds both apps' replicas and the app not measured idles. A phase of
``one`` runs ``--clients`` closed-loop streaming clients against node-1's proxy; a phase of ``two``
runs as many again against node-2's proxy, in a second client process. The clients are those of
``bench_http.py`` (``POST /v1/completions``, greedy, EOS suppressed).

Statistics (docs/benchmarks.md): both apps get the same warm-up; then ``--repeats`` repetitions, each
running both apps once (their order rotating), each phase on prompts no other phase had and lasting
``--requests-per-client`` requests per client and at least ``--min-phase-s`` (20 s on a GPU). A phase
with a failed request is void. Ratio per repetition: ``two_replicas_vs_one``; the JSON's ``ratios``
holds its median, ``spread`` the median, min, max and every value. With ``--engine-control`` it also
runs the in-process engine on one GPU, then on both at once, for the machine's own ceiling
(``engines_two_vs_one``, a control run once each): both "hosts" share one CPU and memory here.

Through one proxy for both hosts (``--one-proxy``, this benchmark's first version), that proxy and
one client process carry every token of both replicas.

    python loadtests/bench_scaling.py --model /tmp/m1b --json out.json   # on nvidia-h200-x2
    python loadtests/bench_scaling.py --quick                             # tiny model on CPU: checks the path only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.bench_http import eos_bias, free_port, http_records, median_runs, summarize, wait_http  # noqa: E402
from loadtests.common import (  # noqa: E402
    default_min_phase_s, ensure_model, machine_info, print_spread, print_table, reexec_with_openblas, spread,
    warmup_per_client, write_json,
)

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"two_replicas_vs_one": 1.8}
APPS = {"one": 1, "two": 2}  # app name (and route prefix) -> model replicas
PROMPT_STRIDE = 100_000  # each client group of each phase draws prompts from its own range of this size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found")
    p.add_argument("--clients", type=int, help="streaming clients per replica (default 32; --quick 4)")
    p.add_argument("--requests-per-client", type=int, help="requests per client and phase (default 8; --quick 3)")
    p.add_argument("--max-tokens", type=int, help="generated tokens per request (default 128; --quick 16)")
    p.add_argument("--repeats", type=int, help="interleaved repetitions of both apps (default 5; --quick 2)")
    p.add_argument("--min-phase-s", type=float, help="a phase lasts at least this long (default 20 on a GPU, else 0)")
    p.add_argument("--warmup-requests", type=int, help="warm-up requests per client (default 2; on a GPU 64 in all)")
    p.add_argument("--stagger-ms", type=float, default=20.0, help="client k of a group starts k x this later (20)")
    p.add_argument("--ingress-replicas", type=int, default=2, help="ingress replicas (2: one per node)")
    p.add_argument("--one-proxy", action="store_true", help="all clients through node-1's proxy (HeadOnly)")
    p.add_argument("--engine-control", action="store_true",
                   help="also run the in-process engine (bench_engine.py) on one GPU, then on two at once: this "
                        "machine's own two-over-one ceiling, without Ray or HTTP")
    p.add_argument("--gpus", type=int, help="GPUs on this machine (default: what nvidia-smi lists); 0 runs on CPU")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-openblas", action="store_true")
    a = p.parse_args(argv)
    a.preset = "tiny" if a.quick else "bench"
    a.clients = a.clients or (4 if a.quick else 32)
    a.requests_per_client = a.requests_per_client or (3 if a.quick else 8)
    a.max_tokens = a.max_tokens or (16 if a.quick else 128)
    a.repeats = a.repeats or (2 if a.quick else 5)
    return a


def count_gpus() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU "))


class LocalNodes:
    """Two labelled Ray nodes on this machine, one GPU each when there are GPUs."""

    def __init__(self, gpus: int, http_ports: list[int]) -> None:
        from cluster import nodes

        self.nodes = nodes
        self.gpus = gpus
        self.http_ports = http_ports  # node i's HTTP proxy; the head's comes from serve.start's http_options
        # Ray's socket paths must stay short; under RAY_TMPDIR when set, so a caller can clean up after us
        self.temp = Path(tempfile.mkdtemp(prefix="mlxs-", dir=os.environ.get("RAY_TMPDIR", "/tmp")))
        self.address = f"127.0.0.1:{free_port()}"  # both "hosts" are this machine: all of Ray on loopback
        self.records: list[Any] = []
        self.hosts = ["node-1", "node-2"]

    def start(self, timeout: float = 180.0) -> None:
        from cluster.local import child_env, ray_bin
        from cluster.nodes import NodeRecord

        cpus = max(2, (os.cpu_count() or 4) // 2)
        env = child_env({"PYTHONPATH": str(REPO), **self.nodes.node_env("disabled", loopback=True)})
        for i, host in enumerate(self.hosts):
            argv = self.nodes.loopback_node_argv(self.nodes.ray_start_argv(
                host=host, head=i == 0, address=self.address, port=int(self.address.rsplit(":", 1)[1]),
                dashboard_port=None, node_ip="127.0.0.1", num_cpus=cpus, temp_dir=str(self.temp), block=True,
                ray=ray_bin(), same_machine=True))
            if i == 0:
                argv.insert(-1, "--include-dashboard=false")  # not needed here: one process less
            node_env = dict(env)
            if i > 0:
                node_env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(self.http_ports[i])
            if self.gpus:
                argv.insert(-1, "--num-gpus=1")
                node_env["CUDA_VISIBLE_DEVICES"] = str(i)
            record = NodeRecord(host=host, head=i == 0, argv=argv, log=str(self.temp / f"{host}.log"))
            proc = self.nodes.start_local(argv, node_env, Path(record.log or ""))
            record.pid = proc.pid
            self.records.append(record)

            def failed(proc=proc, record=record) -> str | None:
                if proc.poll() is None:
                    return None
                return f"the Ray node of {record.host} exited:\n{self.nodes.log_tail(record.log)}"

            self.nodes.wait_for_hosts(self.address, self.hosts[: i + 1], timeout, failed)

    def stop(self) -> None:
        for r in reversed(self.records):
            self.nodes.stop_local(r, timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


def app_args(model_dir: Path, replicas: int, args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    spread = {} if args.one_proxy else {"ingress_max_replicas_per_node": 1}  # each node's proxy has its own ingress
    return {"ingress_replicas": args.ingress_replicas, **spread, "models": [{
        "name": "bench", "source": str(model_dir), "num_replicas": replicas, "hosts": ["node-1", "node-2"][:replicas],
        # node-1 holds a replica of each app: half its GPU each (the app not measured idles)
        "max_replicas_per_node": 1, "num_cpus": 1, "num_gpus": 0.5 if gpus else 0,
        # A replica takes what its batch holds; more requests wait at the handle for whichever replica
        # frees a slot first, rather than in one replica's queue while the other has room.
        "max_ongoing_requests": args.clients, "engine": {"max_batch_size": args.clients}}]}


def ingress_hosts(cluster_hosts: dict[str, str]) -> list[str]:
    """The hosts the ingress replicas run on (each proxy prefers its own node's replicas).
    Read from the GCS actor table: the state API would need the dashboard, which these nodes skip."""
    from ray._private import state

    actors = state.actors().values()
    return sorted(cluster_hosts.get(a["Address"]["NodeID"], "?") for a in actors
                  if a["State"] == "ALIVE" and a["ActorClassName"].endswith(":ingress"))


def node_hosts() -> dict[str, str]:
    import ray

    return {n["NodeID"]: (n.get("Labels") or {}).get("host", "?") for n in ray.nodes() if n.get("Alive")}


def _client_group(base: str, first_prompt: int, clients: int, per_client: int, min_s: float, args: dict[str, Any],
                  bias: dict[str, float]) -> tuple[list[dict[str, Any]], float, float, list[int]]:
    return asyncio.run(http_records(base, "bench", first_prompt, clients, per_client, min_s,
                                    argparse.Namespace(**args), bias))


def load(bases: list[str], first_prompt: int, clients: int, per_client: int, min_s: float, args: argparse.Namespace,
         bias: dict[str, float], label: str) -> dict[str, Any]:
    """``clients`` closed-loop clients against each of ``bases``, one process per base (a single asyncio
    loop parsing every SSE event of two replicas would be the bottleneck), pooled into one phase. Group
    g draws fresh prompts from ``first_prompt + g * PROMPT_STRIDE`` on."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(bases), mp_context=multiprocessing.get_context("spawn")) as pool:
        groups = [pool.submit(_client_group, b, first_prompt + g * PROMPT_STRIDE, clients, per_client, min_s,
                              vars(args), bias) for g, b in enumerate(bases)]
        parts = [g.result() for g in groups]
    recs = [r for p in parts for r in p[0]]
    s = summarize(label, clients * len(bases), max(p[2] for p in parts) - min(p[1] for p in parts), recs)
    s["prompts"] = [p[3] for p in parts]
    return s


def engine_control(model_dir: Path, args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """``bench_engine.py``'s engine path at ``--clients`` on node 1's GPU alone, then one process per GPU
    at once. Both "hosts" share this machine's CPUs and memory, which two Macs would not: this is the
    scaling the machine itself allows, to read ``two_replicas_vs_one`` against."""
    cmd = [sys.executable, str(REPO / "loadtests" / "bench_engine.py"), "--model", str(model_dir), "--paths", "engine",
           "--concurrency", str(args.clients), "--max-tokens", str(args.max_tokens), "--waves", "4", "--no-openblas"]

    def run(devices: list[int]) -> list[float]:
        with tempfile.TemporaryDirectory() as d:
            procs = [subprocess.Popen([*cmd, "--json", f"{d}/{i}.json"], stdout=subprocess.DEVNULL,
                                      env={**os.environ, **({"CUDA_VISIBLE_DEVICES": str(i)} if gpus else {})})
                     for i in devices]
            if any([p.wait() for p in procs]):  # wait for every one, even after a failure
                raise RuntimeError("bench_engine.py failed in the engine control")
            return [json.loads(Path(f"{d}/{i}.json").read_text())["results"]["engine"][str(args.clients)]["tokens_per_s"] for i in devices]

    alone, pair = run([0]), run([0, 1])
    print(f"-- engine control: alone {alone[0]:.1f} tok/s; two at once {' + '.join(f'{t:.1f}' for t in pair)}", flush=True)
    return {"alone_tokens_per_s": alone[0], "pair_tokens_per_s": pair, "engines_two_vs_one": sum(pair) / alone[0]}


def replica_hosts(app: str, replicas: int) -> list[str]:
    """The hosts the model replicas of ``app`` run on, as each replica reports its node's label."""
    from ray import serve

    handle = serve.get_deployment_handle("model-bench", app_name=app)
    seen: set[tuple[str | None, int]] = set()
    for _ in range(20 * replicas):
        info = handle.info.remote().result()
        seen.add((info.host, info.pid))
        if len(seen) >= replicas:
            break
    return sorted(str(h) for h, _ in seen)


def serve_apps(model_dir: Path, args: argparse.Namespace, gpus: int,
               bases: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Both apps up and ready; per app, the base URLs its clients use and the hosts of its replicas."""
    from ray import serve

    from deployments.app import build_app

    used: dict[str, list[str]] = {}
    placements: dict[str, list[str]] = {}
    for app, replicas in APPS.items():
        t = time.perf_counter()
        serve.run(build_app(app_args(model_dir, replicas, args, gpus)), name=app, route_prefix=f"/{app}")
        used[app] = [f"{b}/{app}" for b in (bases[:1] if args.one_proxy else bases[:replicas])]
        for base in used[app]:
            wait_http(base + "/ready", 600)
        placements[app] = replica_hosts(app, replicas)
        print(f"-- app {app}: {replicas} replica(s) on {placements[app]}, clients via {used[app]} "
              f"(up in {time.perf_counter() - t:.0f}s)", flush=True)
    return used, placements


def run_phases(used: dict[str, list[str]], args: argparse.Namespace, bias: dict[str, float],
               min_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same warm-up for both apps, then the repetitions (both apps once each, order rotating); every
    phase on prompts of its own."""
    next_prompt = 0
    warmup_n = warmup_per_client(args.warmup_requests, args.clients, args.quick)

    def one_phase(app: str, per_client: int, phase_min_s: float) -> dict[str, Any]:
        nonlocal next_prompt
        clients = args.clients * APPS[app] // len(used[app])
        s = load(used[app], next_prompt, clients, per_client, phase_min_s, args, bias, app)
        next_prompt += PROMPT_STRIDE * len(used[app])
        return s

    warmup = [one_phase(app, warmup_n, 0.0) for app in APPS]
    for w in warmup:
        print(f"warm-up {w['path']}: {w['requests']} requests, void {w['void']}", flush=True)
    phases = []
    names = list(APPS)
    for rep in range(args.repeats):
        for app in names[rep % 2:] + names[:rep % 2]:
            s = one_phase(app, args.requests_per_client, min_s)
            s["repetition"] = rep
            phases.append(s)
            print(f"rep {rep} {app}: {s['concurrency']} clients, {s['tokens_per_s']:.1f} tok/s, {s['requests']} requests "
                  f"{s['wall_s']:.1f}s" + (f"  VOID: {s['error_list'][0]}" if s["void"] else ""), flush=True)
    return warmup, phases


def ratios_per_repetition(phases: list[dict[str, Any]], repeats: int) -> list[float | None]:
    """two / one per repetition; None where either phase is void."""
    out: list[float | None] = []
    for rep in range(repeats):
        by = {p["path"]: p for p in phases if p["repetition"] == rep}
        one, two = by.get("one"), by.get("two")
        ok = one is not None and two is not None and not one["void"] and not two["void"] and one["tokens_per_s"]
        out.append(two["tokens_per_s"] / one["tokens_per_s"] if ok else None)  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray swaps 127.0.0.1 for the LAN address while multi-node clusters are enabled (read when Ray is
    # imported): off, both nodes and this driver stay on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    gpus = count_gpus() if args.gpus is None else args.gpus
    if gpus == 1:
        print("one GPU: both hosts would share it; pass --gpus 0 to run on CPU", file=sys.stderr)
        return 1
    model_dir = ensure_model(args.model, args.model_dir, args.preset)
    min_s = default_min_phase_s(args.quick) if args.min_phase_s is None else args.min_phase_s
    bias = eos_bias(model_dir)

    import ray
    from ray import serve

    ports = [free_port(), free_port()]
    cluster = LocalNodes(gpus, ports)
    try:
        cluster.start()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        serve.start(proxy_location="HeadOnly" if args.one_proxy else "EveryNode",
                    http_options={"host": "127.0.0.1", "port": ports[0]}, logging_config={"log_level": "WARNING"})
        used, placements = serve_apps(model_dir, args, gpus, [f"http://127.0.0.1:{p}" for p in ports])
        ingress = ingress_hosts(node_hosts())
        warmup, phases = run_phases(used, args, bias, min_s)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.stop()

    rows = median_runs(phases)
    print_table(["app", "hosts", "clients", "tokens/s (median phase)", "TTFT p50 ms", "TTFT p99 ms", "void runs"],
                [(r["path"], ",".join(placements[r["path"]]), r["concurrency"], r["tokens_per_s"], r["ttft_p50_ms"],
                  r["ttft_p99_ms"], r["void_runs"]) for r in rows])
    per_rep = ratios_per_repetition(phases, args.repeats)
    summary = {"two_replicas_vs_one": spread(per_rep)}
    control = engine_control(model_dir, args, gpus) if args.engine_control else None
    if control is not None:
        summary["engines_two_vs_one"] = spread([control["engines_two_vs_one"]])
    print_spread(summary, digits=3)
    ratios = {k: v["median"] for k, v in summary.items()}
    targets = {k: {"target": t, "value": ratios[k], "met": ratios[k] is not None and ratios[k] >= t}
               for k, t in TARGETS.items()}
    for k, t in targets.items():
        print(f"{k}: median {t['value']} (target >= {t['target']}: {'met' if t['met'] else 'NOT met'})")
    if args.json:
        write_json(args.json, {
            "benchmark": "bench_scaling", "machine": machine_info(), "model": str(model_dir),
            "settings": {"gpus": gpus, "clients_per_replica": args.clients, "requests_per_client": args.requests_per_client,
                         "min_phase_s": min_s, "repeats": args.repeats, "warmup_requests_per_client":
                         warmup_per_client(args.warmup_requests, args.clients, args.quick),
                         "stagger_ms": args.stagger_ms, "max_tokens": args.max_tokens,
                         "ingress_replicas": args.ingress_replicas,
                         "proxies": "one (HeadOnly)" if args.one_proxy else "one per node, each with its own client process",
                         "apps": {app: {"replicas": n, "placements": placements[app], "proxies": used[app]}
                                  for app, n in APPS.items()},
                         "ingress_placements": ingress,
                         "order": "warm-up of both apps; then per repetition each app once, the order rotating",
                         "quick": args.quick},
            "results": rows, "phases": phases, "warmup": warmup, "void_phases": sum(p["void"] for p in phases),
            "ratios_per_repetition": [{"two_replicas_vs_one": r} for r in per_rep], "spread": summary,
            "engine_control": control, "ratios": ratios, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
