"""Prefix-aware replica routing against Serve's default routing, on a multi-turn chat workload.

One Ray Serve app with the same model twice, each with two replicas: ``chat-load`` routed by
Serve's power of two choices, ``chat-prefix`` with ``routing: prefix``
(deployments/routing/prefix_affinity.py). ``--users`` simulated users each hold a conversation: a
system prompt of their own, then ``--turns`` turns; each turn sends the whole conversation so far
(streamed, greedy, ``--max-tokens`` tokens, EOS banned) and appends the answer. Users start
``--stagger-s`` apart and pause ``--think-s`` between an answer and their next turn, as people in a
chat do. A replica that served a user's earlier turn holds that prefix in its prompt cache; on the
other replica the whole conversation is prefilled again. Each phase also reports the share of its
prompt tokens that came from the prompt cache (``usage.prompt_tokens_details.cached_tokens``).

Each repetition runs one phase per path in alternating order (A B, then B A), every phase with new
users (new system prompts: no phase finds another's prefix in any cache), after one warm-up phase
per path. TTFT is measured per request to the first content chunk; p50 and p99 are over every turn
of the phase. A phase with a failed request is void. The result,
``ratios.prefix_routing_ttft_p50_speedup``, is the median over repetitions of default TTFT p50 over
prefix-aware TTFT p50 (goal on this CPU, where prefill dominates: >= 2).

    python loadtests/bench_prefix_routing.py --json docs/bench/prefix_routing_cpu.json
    python loadtests/bench_prefix_routing.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``loadtests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    corpus_sentences, ensure_model, machine_info, percentile, print_spread, reexec_with_openblas, spread,
    start_local_serve, stop_local_serve, write_json,
)

PATHS = {"load": "chat-load", "prefix": "chat-prefix"}
GOAL = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found")
    p.add_argument("--users", type=int, help="concurrent conversations per phase (default 4; --quick 2)")
    p.add_argument("--turns", type=int, help="turns per conversation (default 4; --quick 3)")
    p.add_argument("--system-sentences", type=int, default=40, help="length of each user's system prompt")
    p.add_argument("--max-tokens", type=int, help="tokens per answer (default 16; --quick 4)")
    p.add_argument("--think-s", type=float,
                   help="a user's pause between an answer and their next turn (default 2; --quick 0.1)")
    p.add_argument("--stagger-s", type=float,
                   help="user u starts u times this after the phase begins (default 2; --quick 0.1)")
    p.add_argument("--prompt-cache-gb", type=float,
                   help="each replica's prompt cache size (engine.prompt_cache_gb; default: EngineConfig's)")
    p.add_argument("--prompt-cache-entries", type=int,
                   help="sequences each replica's prompt cache keeps, one per conversation "
                        "(engine.prompt_cache_entries; default: EngineConfig's)")
    p.add_argument("--repeats", type=int, help="repetitions (default 5; --quick 1)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 users, 3 turns, 1 repetition: a smoke run")
    p.add_argument("--no-openblas", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.preset = "tiny" if q else "bench"
    a.users = a.users or (2 if q else 4)
    a.turns = a.turns or (3 if q else 4)
    a.think_s = (0.1 if q else 2.0) if a.think_s is None else a.think_s
    a.stagger_s = (0.1 if q else 2.0) if a.stagger_s is None else a.stagger_s
    a.max_tokens = a.max_tokens or (4 if q else 16)
    a.repeats = a.repeats or (1 if q else 5)
    return a


class Conversations:
    """Users with system prompts nobody had before: every phase takes new ones."""

    def __init__(self, sentences: int) -> None:
        self.corpus = corpus_sentences()
        self.sentences = sentences
        self.next_user = 0

    def take(self, n: int) -> list[list[dict[str, str]]]:
        out = []
        for _ in range(n):
            u = self.next_user
            self.next_user += 1
            text = " ".join(self.corpus[(u * 7 + i) % len(self.corpus)] for i in range(self.sentences))
            out.append([{"role": "system", "content": f"User {u}'s assistant. {text}"}])
        return out


async def converse(h: Any, model: str, user: int, history: list[dict[str, str]], args: argparse.Namespace,
                   bias: dict[str, float], recs: list[dict[str, Any]]) -> None:
    await asyncio.sleep(user * args.stagger_s)
    for turn in range(args.turns):
        if turn:
            await asyncio.sleep(args.think_s)
        history.append({"role": "user", "content": f"Question {turn}: what comes next in the story?"})
        body = {"model": model, "messages": history, "max_tokens": args.max_tokens, "temperature": 0.0,
                "logit_bias": bias, "stream": True, "stream_options": {"include_usage": True}}
        rec: dict[str, Any] = {"turn": turn, "ttft": None, "error": None, "prompt_tokens": 0, "cached_tokens": 0}
        start = time.perf_counter()
        answer = ""
        try:
            async with h.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            rec["error"] = line[:200]
                            break
                        if usage := chunk.get("usage"):
                            rec["prompt_tokens"] = usage["prompt_tokens"]
                            rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                        if piece:
                            rec["ttft"] = rec["ttft"] or time.perf_counter() - start
                            answer += piece
        except Exception as e:  # noqa: BLE001 - any failure voids the phase
            rec["error"] = f"{type(e).__name__}: {e}"
        recs.append(rec)
        if rec["error"]:
            return
        history.append({"role": "assistant", "content": answer})


async def phase(base: str, path: str, args: argparse.Namespace, users: list[list[dict[str, str]]],
                bias: dict[str, float]) -> dict[str, Any]:
    import httpx

    recs: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=len(users) + 2)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as h:
        await asyncio.gather(*(converse(h, PATHS[path], i, u, args, bias, recs) for i, u in enumerate(users)))
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in recs if r["error"]]
    ttfts = [r["ttft"] for r in recs if r["ttft"] is not None]
    later = [r["ttft"] for r in recs if r["ttft"] is not None and r["turn"] > 0]
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731

    def cached(rs: list[dict[str, Any]]) -> float:
        """The share of these requests' prompt tokens served from the prompt cache."""
        return round(sum(r["cached_tokens"] for r in rs) / max(1, sum(r["prompt_tokens"] for r in rs)), 3)

    return {"path": path, "void": bool(errors), "errors": len(errors), "first_error": errors[0] if errors else None,
            "requests": len(recs), "wall_s": round(wall, 2),
            "tokens_per_s": round(len(ttfts) * args.max_tokens / wall, 1),
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "ttft_p50_ms_after_first_turn": ms(percentile(later, 50)),
            "cached_prompt_fraction": cached(recs),
            "cached_prompt_fraction_after_first_turn": cached([r for r in recs if r["turn"] > 0])}


def start_server(model_dir: Path, engine: dict[str, Any]) -> str:
    from ray import serve

    from deployments.app import build_app
    from loadtests.bench_http import free_port, wait_http

    port = free_port()
    start_local_serve(port)
    models = [{"name": name, "source": str(model_dir), "num_cpus": 0, "num_replicas": 2, "routing": routing,
               "engine": engine} for routing, name in PATHS.items()]
    serve.run(build_app({"models": models}), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/ready", 600)
    return base


async def run_all(base: str, args: argparse.Namespace, bias: dict[str, float]) -> dict[str, Any]:
    convs = Conversations(args.system_sentences)
    for path in PATHS:  # the same warm-up for both paths
        w = await phase(base, path, args, convs.take(args.users), bias)
        print(f"warm-up {path}: {w['requests']} requests, errors {w['errors']}"
              + (f" (first: {w['first_error']})" if w["errors"] else ""), flush=True)
    reps = []
    for i in range(args.repeats):
        order = list(PATHS) if i % 2 == 0 else list(PATHS)[::-1]
        rep = {}
        for path in order:
            p = rep[path] = await phase(base, path, args, convs.take(args.users), bias)
            print(f"rep {i} {path:<7} ttft p50 {p['ttft_p50_ms']} ms p99 {p['ttft_p99_ms']} ms  "
                  f"{p['tokens_per_s']} tok/s  cached {p['cached_prompt_fraction_after_first_turn']}  "
                  f"errors {p['errors']}" + (f" (first: {p['first_error']})" if p["errors"] else ""), flush=True)
        reps.append(rep)

    def ratio(rep: dict[str, Any], key: str, invert: bool = False) -> float | None:
        a, b = rep["load"], rep["prefix"]
        if a["void"] or b["void"] or not a[key] or not b[key]:
            return None
        return b[key] / a[key] if invert else a[key] / b[key]

    per_rep = [{"prefix_routing_ttft_p50_speedup": ratio(r, "ttft_p50_ms"),
                "prefix_routing_ttft_p99_speedup": ratio(r, "ttft_p99_ms"),
                "prefix_routing_tokens_per_s_ratio": ratio(r, "tokens_per_s", invert=True)} for r in reps]
    summary = {k: spread([r[k] for r in per_rep]) for k in per_rep[0]}
    return {"repetitions": reps, "ratios_per_repetition": per_rep, "ratios_summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = ensure_model(args.model, args.model_dir, args.preset)
    from loadtests.bench_http import eos_bias

    engine = {k: v for k in ("prompt_cache_gb", "prompt_cache_entries") if (v := getattr(args, k)) is not None}
    base = start_server(model_dir, engine)
    try:
        out = asyncio.run(run_all(base, args, eos_bias(model_dir)))
    finally:
        stop_local_serve()
    s = out["ratios_summary"]
    print_spread(s)
    speedup = s["prefix_routing_ttft_p50_speedup"]["median"]
    met = speedup is not None and speedup >= GOAL
    print(f"prefix_routing_ttft_p50_speedup: {speedup if speedup is None else round(speedup, 2)} "
          f"(goal >= {GOAL}: {'met' if met else 'NOT met'})")
    if args.json:
        write_json(args.json, {
            "benchmark": "bench_prefix_routing", "machine": machine_info(), "model": str(model_dir),
            "settings": {k: getattr(args, k) for k in ("users", "turns", "system_sentences", "max_tokens", "think_s",
                                                       "stagger_s", "prompt_cache_gb", "prompt_cache_entries",
                                                       "repeats")},
            "ratios": {k: v["median"] for k, v in s.items()}, "goal": {"prefix_routing_ttft_p50_speedup": f">= {GOAL}"},
            **out})
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
