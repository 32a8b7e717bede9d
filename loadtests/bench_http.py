"""HTTP benchmark: mlx-serving over Ray Serve against the in-process engine and ``mlx_lm.server``.

Same run, same model, same prompts, one phase at a time (so the phases never compete for cores):

  engine          the in-process ``Engine`` (the ceiling for the HTTP path);
  http            ``POST /v1/completions`` with ``stream: true`` through the Serve ingress and a
                  model replica (a local Ray cluster started by this script);
  mlx_lm_server   ``mlx_lm.server`` started on the same model, same streaming requests.

Every request is greedy and generates exactly ``--max-tokens`` tokens (EOS gets a logit bias of
-100 in all three paths). Clients run closed loops: each sends its next request when the previous
stream ends. Aggregate tokens/s = generated tokens / wall time; TTFT is measured to the first
content chunk. Ratios: ``http_vs_engine_c1``, ``http_vs_engine_c32``, ``http_vs_mlx_lm_server_c32``.

    python loadtests/bench_http.py --json bench-out/http.json
    python loadtests/bench_http.py --quick          # tiny model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    ensure_model, machine_info, make_prompts, percentile, print_table, reexec_with_openblas, write_json,
)

TARGETS = {"http_vs_engine_c1": 0.9, "http_vs_engine_c32": 0.8, "http_vs_mlx_lm_server_c32": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found")
    p.add_argument("--concurrency", default=None, help="levels (default 1,32; --quick 1,4)")
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 128)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--paths", default="engine,http,mlx_lm_server")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-openblas", action="store_true")
    a = p.parse_args(argv)
    a.preset = "tiny" if a.quick else "bench"
    a.levels = [int(x) for x in (a.concurrency or ("1,4" if a.quick else "1,32")).split(",")]
    a.max_tokens = a.max_tokens or (16 if a.quick else 128)
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(path: str, level: int, wall: float, recs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in recs)
    ttfts = [r["ttft"] for r in recs if r["ttft"] is not None]
    return {
        "path": path, "concurrency": level, "requests": len(recs), "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": (percentile(ttfts, 50) or 0) * 1000, "ttft_p99_ms": (percentile(ttfts, 99) or 0) * 1000,
        "short_requests": sum(1 for r in recs if r["tokens"] != r["expected"]),
        "errors": sum(1 for r in recs if r.get("error")),
        "first_error": next((r["error"] for r in recs if r.get("error")), None),
    }


# -- the in-process engine ----------------------------------------------------------------------------
def engine_phase(model_dir: Path, prompts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    from engine.config import EngineConfig
    from engine.engine import Engine

    async def go() -> list[dict[str, Any]]:
        e = Engine(EngineConfig(max_batch_size=max(32, *args.levels)))
        await e.load_model("bench", str(model_dir))
        bias = {t: -100.0 for t in e._model("bench").eos_ids}
        out = []
        for level in [min(args.levels)] + args.levels:  # the first run warms up
            pending = deque(range(level * args.requests_per_client))
            recs: list[dict[str, Any]] = []

            async def client() -> None:
                while pending:
                    i = pending.popleft()
                    start = time.perf_counter()
                    rec = {"ttft": None, "tokens": 0, "expected": args.max_tokens}
                    body = {"model": "bench", "prompt": prompts[i % len(prompts)],
                            "sampling": {"max_tokens": args.max_tokens, "temperature": 0.0, "logit_bias": bias}}
                    async for chunk in e.generate(body):
                        if rec["ttft"] is None and chunk.token_ids:
                            rec["ttft"] = time.perf_counter() - start
                        rec["tokens"] += len(chunk.token_ids)
                    recs.append(rec)

            t0 = time.perf_counter()
            await asyncio.gather(*[client() for _ in range(level)])
            out.append(summarize("engine", level, time.perf_counter() - t0, recs))
        await e.shutdown(5)
        return out[1:]

    return asyncio.run(go())


# -- HTTP clients (ours and mlx_lm.server speak the same OpenAI streaming protocol) ---------------------
async def http_records(base: str, model: str, prompts: list[str], level: int, args: argparse.Namespace,
                       bias: dict[str, float]) -> tuple[list[dict[str, Any]], float, float]:
    """``level`` closed-loop streaming clients against ``base``: one record per request, and the
    wall-clock (``time.time``) start and end, so groups run in several processes can be pooled."""
    import httpx

    pending = deque(range(level * args.requests_per_client))
    recs: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=level + 4)) as h:

        async def client() -> None:
            while pending:
                i = pending.popleft()
                body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                        "temperature": 0.0, "logit_bias": bias, "stream": True,
                        "stream_options": {"include_usage": True}}
                rec: dict[str, Any] = {"ttft": None, "tokens": 0, "expected": args.max_tokens, "error": None}
                chunks = 0
                start = time.perf_counter()
                try:
                    async with h.stream("POST", "/v1/completions", json=body) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            data = json.loads(line[6:])
                            if data.get("usage"):
                                rec["tokens"] = data["usage"]["completion_tokens"]
                            for choice in data.get("choices") or []:
                                if choice.get("text"):
                                    chunks += 1
                                    if rec["ttft"] is None:
                                        rec["ttft"] = time.perf_counter() - start
                except httpx.HTTPError as e:  # counted, not fatal: the table says how many failed
                    rec["error"] = f"{type(e).__name__}: {e}"
                rec["tokens"] = rec["tokens"] or chunks
                recs.append(rec)

        t0 = time.time()
        await asyncio.gather(*[client() for _ in range(level)])
        return recs, t0, time.time()


async def http_level(base: str, model: str, prompts: list[str], level: int, args: argparse.Namespace,
                     bias: dict[str, float], label: str) -> dict[str, Any]:
    recs, t0, t1 = await http_records(base, model, prompts, level, args, bias)
    return summarize(label, level, t1 - t0, recs)


def run_levels(base: str, model: str, prompts: list[str], args: argparse.Namespace, bias: dict[str, float],
               label: str) -> list[dict[str, Any]]:
    asyncio.run(http_level(base, model, prompts, min(args.levels), args, bias, label))  # warm-up
    return [asyncio.run(http_level(base, model, prompts, lvl, args, bias, label)) for lvl in args.levels]


def eos_bias(model_dir: Path) -> dict[str, float]:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    return {str(t): -100.0 for t in tok.eos_token_ids}


def wait_http(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def http_phase(model_dir: Path, prompts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k in ("LD_PRELOAD", "HF_HUB_OFFLINE")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(build_app({"models": [{
            "name": "bench", "source": str(model_dir), "num_cpus": 0, "max_ongoing_requests": 256,
            "engine": {"max_batch_size": max(32, *args.levels)}}]}), name="bench", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/ready", 300)
        return run_levels(base, "bench", prompts, args, eos_bias(model_dir), "http")
    finally:
        serve.shutdown()
        ray.shutdown()


def mlx_lm_server_phase(model_dir: Path, prompts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port),
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 300)
        return run_levels(f"http://127.0.0.1:{port}", str(model_dir), prompts, args, eos_bias(model_dir), "mlx_lm_server")
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = ensure_model(args.model, args.model_dir, args.preset)
    prompts = make_prompts(64)
    results: list[dict[str, Any]] = []
    phases = {"engine": engine_phase, "http": http_phase, "mlx_lm_server": mlx_lm_server_phase}
    for name in args.paths:
        print(f"-- {name}", flush=True)
        results += phases[name](model_dir, prompts, args)
        for r in results[-len(args.levels):]:
            print(f"   c={r['concurrency']}: {r['tokens_per_s']:.1f} tok/s, errors {r.get('errors', 0)}", flush=True)
    print_table(["path", "clients", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "requests", "errors"],
                [(r["path"], r["concurrency"], r["tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["requests"],
                  r.get("errors", 0)) for r in results])
    for r in results:
        if r.get("first_error"):
            print(f"{r['path']} c={r['concurrency']}: {r['errors']} failed, e.g. {r['first_error']}")
    by = {(r["path"], r["concurrency"]): r["tokens_per_s"] for r in results}
    ratios: dict[str, float] = {}
    for lvl in args.levels:
        if ("http", lvl) in by and ("engine", lvl) in by:
            ratios[f"http_vs_engine_c{lvl}"] = by[("http", lvl)] / by[("engine", lvl)]
        if ("http", lvl) in by and ("mlx_lm_server", lvl) in by:
            ratios[f"http_vs_mlx_lm_server_c{lvl}"] = by[("http", lvl)] / by[("mlx_lm_server", lvl)]
    for k, v in ratios.items():
        target = TARGETS.get(k)
        print(f"{k}: {v:.2f}" + (f" (target >= {target}: {'met' if v >= target else 'NOT met'})" if target else ""))
    if args.json:
        write_json(args.json, {"machine": machine_info(), "model": str(model_dir),
                               "settings": {"levels": args.levels, "max_tokens": args.max_tokens,
                                            "requests_per_client": args.requests_per_client},
                               "results": results, "ratios": ratios,
                               "targets": {k: {"target": t, "met": ratios.get(k, 0) >= t} for k, t in TARGETS.items()
                                           if k in ratios}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
