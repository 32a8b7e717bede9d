"""What routing costs on the HTTP token path: plain model vs routes vs a router in the token path.

One private Ray cluster, one tiny demo model replica, the real ingress; N concurrent streaming
``/v1/completions`` clients (closed loop, greedy, EOS banned so every request makes ``--max-tokens``
tokens) against each path in turn, rounds interleaved so that load from elsewhere hits every path:

  direct    ``model: demo``: the ingress streams from the model replica (no routing at all);
  route-1   a route with one variant (decided locally from the router's table, outcome batched back);
  route-2   a route with two variants (both on the same replica, so only routing differs);
  proxied   the design we did not take: every item streams through one more deployment (a router in
            the token path) before it reaches the ingress.

It also times one unary ``RouterDeployment.choose`` call (the cost of asking the router per request).
Run with ``--paths direct`` and ``PYTHONPATH`` pointing at an older checkout to compare the plain
model path before and after a change.

Statistics (docs/benchmarks.md): every path gets the same warm-up round; every round, warm-up
included, draws prompts no other round had; requests are bench_http.py's (client k connects k x 20 ms
after the first, a refused connect is retried), and a round in which a request fails after connecting
or comes back short is void and gives no ratio. Ratios per round against ``direct`` (``route_1_vs_direct``,
``route_2_vs_direct``, ``proxied_vs_direct``, tokens/s); the JSON's ``ratios`` are their medians and
``spread`` has median, min, max and every value.

    python loadtests/bench_routing.py                       # 32 streams, 64 tokens, 5 rounds
    python loadtests/bench_routing.py --json out.json
    python loadtests/bench_routing.py --quick               # 4 streams, 16 tokens, 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script; appended, so PYTHONPATH (an older checkout) wins
    sys.path.append(str(Path(__file__).resolve().parent.parent))

PATHS = ("direct", "route-1", "route-2", "proxied")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--concurrency", type=int, help="streaming clients (default 32; --quick 4)")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, help="tokens per request (default 64; --quick 16)")
    p.add_argument("--rounds", type=int, help="interleaved rounds, every path once each (default 5; --quick 2)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private Ray node")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 streams, 16 tokens, 2 rounds")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    a.concurrency = a.concurrency or (4 if a.quick else 32)
    a.max_tokens = a.max_tokens or (16 if a.quick else 64)
    a.rounds = a.rounds or (2 if a.quick else 5)
    return a


class Proxy:
    """A deployment that relays a model replica's stream item by item: one more hop per item."""

    def __init__(self, target: Any, model: str) -> None:
        self.target, self.model = target, model

    async def generate(self, request: dict[str, Any]):
        async for item in self.target.options(stream=True).generate.remote({**request, "model": self.model}):
            yield item

    async def complete(self, request: dict[str, Any]) -> Any:
        return await self.target.complete.remote({**request, "model": self.model})


def build(model_dir: str, with_proxy: bool) -> tuple[Any, bool]:
    from ray import serve

    from deployments.config import AppConfig, ModelDeploymentConfig
    from deployments.ingress import Ingress
    from deployments.replica import replica_deployment

    m = ModelDeploymentConfig(name="demo", source=model_dir, num_cpus=0)
    # The ingress admits by its config's models (QoS): the proxy is one of them, served by `demo`'s weights.
    config = AppConfig(models=[m, m.model_copy(update={"name": "proxied"})] if with_proxy else [m])
    demo = replica_deployment(m).bind(m.model_dump(mode="json"))
    models = {"demo": demo}
    if with_proxy:
        models["proxied"] = serve.deployment(Proxy).options(
            name="proxy", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0}).bind(demo, "demo")
    ingress = serve.deployment(Ingress).options(name="ingress", max_ongoing_requests=4096,
                                                ray_actor_options={"num_cpus": 0})
    try:
        from deployments.router import router_deployment
    except ImportError:  # an older checkout without routing: the plain model path only
        return ingress.bind(config.model_dump(mode="json"), models), False
    routes = {"routes": [
        {"name": "route-1", "variants": [{"name": "only", "deployment": "demo"}]},
        {"name": "route-2", "variants": [{"name": "a", "deployment": "demo", "weight": 50},
                                         {"name": "b", "deployment": "demo", "weight": 50}]},
    ]}
    router = router_deployment().options(user_config=routes).bind(["demo"])
    return ingress.bind(config.model_dump(mode="json", exclude={"routes"}), models, router), True


async def one_round(base: str, model: str, args: argparse.Namespace, bias: dict[str, float],
                    prompts: Any) -> dict[str, Any]:
    """Every client's requests on prompts no other round had (``prompts``: a ``FreshPrompts``), sent
    and judged as bench_http.py's phases are: staggered connects, refused ones retried, and the round
    void when a request fails after connecting or comes back short."""
    import httpx

    from loadtests.bench_http import http_request, summarize
    from loadtests.common import stagger

    recs: list[dict[str, Any]] = []
    prompts.phase()

    async def client(c: httpx.AsyncClient, i: int) -> None:
        await stagger(i, 20.0)
        for _ in range(args.requests_per_client):
            recs.append(await http_request(c, model, prompts.take(), args.max_tokens, bias, {"user": f"user-{i}"}))

    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, i) for i in range(args.concurrency)])
        wall = time.perf_counter() - t0
    s = summarize(model, args.concurrency, wall, recs)
    items = sum(r.get("chunks", 0) for r in recs)
    return {**s, "items": items, "items_per_s": items / wall, "prompts": prompts.used(),
            "ttft_p50_s": s["ttft_p50_ms"] / 1000 if any(r["ttft"] is not None for r in recs) else None}


def ratios_per_round(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[float | None]]:
    """Each path's tokens/s over ``direct``'s in the same round; None where either round is void."""
    out: dict[str, list[float | None]] = {}
    for p, rs in runs.items():
        if p == "direct" or "direct" not in runs:
            continue
        out[f"{p.replace('-', '_')}_vs_direct"] = [
            None if a["void"] or d["void"] or not d["tokens_per_s"] else a["tokens_per_s"] / d["tokens_per_s"]
            for a, d in zip(rs, runs["direct"])]
    return out


def _medians(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """A path's medians over its valid rounds (None when every round was void)."""
    def med(key: str) -> float | None:
        xs = [x[key] for x in rounds if x[key] is not None]
        return statistics.median(xs) if xs else None

    return {"median_tokens_per_s": med("tokens_per_s"), "median_items_per_s": med("items_per_s"),
            "median_ttft_p50_s": med("ttft_p50_s")}


def time_choose(n: int = 200) -> dict[str, float]:
    """Sequential round trips of one unary router call from this driver (the per-request cost of asking)."""
    from ray import serve

    h = serve.get_deployment_handle("router", app_name="bench")
    h.choose.remote("route-2", "warm").result()
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        h.choose.remote("route-2", f"user-{i}").result()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"choose_p50_ms": 1000 * lat[n // 2], "choose_p90_ms": 1000 * lat[int(n * 0.9)]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from engine import blas
    from engine.demo import make_demo_model
    from loadtests.common import FreshPrompts, print_spread, serving_priority, spread

    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    model_dir = str(make_demo_model(tmp / "tiny", "tiny"))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **blas.preload_env()}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    serving_priority()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.num_cpus, "include_dashboard": False})
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    results: dict[str, Any] = {}
    try:
        app, has_routes = build(model_dir, "proxied" in paths)
        serve.run(app, name="bench", route_prefix="/")
        if not has_routes:
            paths = [p for p in paths if p in ("direct", "proxied")]
        base = f"http://127.0.0.1:{port}"
        eos = httpx.post(base + "/tokenize", json={"model": "demo", "prompt": "<|im_end|>"}).json()["tokens"][0]
        bias = {str(eos): -100.0}
        prompts = FreshPrompts()
        warm = argparse.Namespace(**{**vars(args), "requests_per_client": 2})
        warmup = {p: asyncio.run(one_round(base, "demo" if p == "direct" else p, warm, bias, prompts)) for p in paths}
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        for r in range(args.rounds):
            for p in paths[r % len(paths):] + paths[:r % len(paths)]:  # rotate the order every round
                model = "demo" if p == "direct" else p
                res = asyncio.run(one_round(base, model, args, bias, prompts))
                runs[p].append(res)
                ttft = "-" if res["ttft_p50_s"] is None else f"{res['ttft_p50_s']:.3f}s"
                print(f"round {r} {p:<8} {res['tokens_per_s']:7.1f} tok/s {res['items_per_s']:7.1f} items/s "
                      f"ttft p50 {ttft} errors {res['errors']}" + ("  VOID" if res["void"] else ""), flush=True)
        summary = {k: spread(v) for k, v in ratios_per_round(runs).items()}
        print_spread(summary, digits=3)
        results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus,
                               "driver_blas": blas.describe() if hasattr(blas, "describe") else None,
                               "replica_LD_PRELOAD": env.get("LD_PRELOAD"),
                               "loadavg_at_end": os.getloadavg()},
                   "settings": {k: v for k, v in vars(args).items() if k != "json"},
                   "paths": {p: {**_medians([x for x in rs if not x["void"]]), "rounds": rs} for p, rs in runs.items()},
                   "warmup": warmup, "void_rounds": sum(x["void"] for rs in runs.values() for x in rs),
                   "ratios": {k: v["median"] for k, v in summary.items()}, "spread": summary}
        if has_routes:
            results["unary_choose"] = time_choose()
        print(json.dumps({p: {k: None if v is None else round(v, 3) for k, v in d.items() if k != "rounds"}
                          for p, d in results["paths"].items()}, indent=1))
        if "unary_choose" in results:
            print("unary RouterDeployment.choose round trip:", json.dumps(results["unary_choose"]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
