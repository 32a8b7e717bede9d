"""Priority benchmark: interactive requests beside batch clients that saturate one replica.

One model replica behind the Serve ingress (a local Ray cluster this script starts), with its batch
slots = ``max_ongoing_requests`` = ``--slots`` and the ingress's QoS defaults. Each repetition runs
these phases, in an order that rotates from one repetition to the next, each for ``--seconds``:

  idle         ``--interactive-clients`` streaming clients alone (``priority: interactive``), each
               pausing ``--interactive-think-s`` between an answer and its next request, as a user reads;
  alone        ``--batch-clients`` closed-loop non-streaming clients alone (``priority: batch``): more
               than the slots, so requests always wait at the ingress;
  loaded       both at once;
  loaded_fifo  both at once, the interactive clients sending ``priority: batch`` too: what they get
               with no priorities (every request waits its turn), for contrast.

Ratios per repetition: ``interactive_ttft_p50_loaded_vs_idle`` (interactive TTFT p50, loaded over
idle; target <= 1.5) and ``batch_tokens_loaded_vs_alone`` (batch completion tokens/s, loaded over
alone; target >= 0.8); the result is their median over the repetitions, with min and max. Every
request is greedy with EOS biased away, so it generates exactly its ``max_tokens``. Prompts are fresh
in every phase; warm-up phases (idle, alone, loaded) run first. A phase with a failed request is
void (its repetition gives no ratio). Batch tokens/s is time-weighted: at the phase's end batch
clients send nothing new and finish what they started, and each request counts its tokens in the
share of its duration that fell inside the phase. Counting only the requests that completed in the
phase would move in waves: the batch clients' requests start and end together, a few per phase.

    python loadtests/bench_priority.py --json docs/bench/priority_cpu.json
    python loadtests/bench_priority.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    corpus_sentences, ensure_model, machine_info, make_prompts, percentile, print_spread,
    reexec_with_openblas, spread, start_local_serve, stop_local_serve, write_json,
)

TARGETS = {"interactive_ttft_p50_loaded_vs_idle": ("<=", 1.5), "batch_tokens_loaded_vs_alone": (">=", 0.8)}
PHASES = ("idle", "alone", "loaded", "loaded_fifo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found")
    p.add_argument("--slots", type=int, default=16, help="the replica's batch slots (max_ongoing_requests)")
    p.add_argument("--batch-clients", type=int, help="default: slots + slots / 4")
    p.add_argument("--interactive-clients", type=int, default=2)
    p.add_argument("--interactive-think-s", type=float, default=0.5,
                   help="an interactive client's pause between its answer and its next request (a user reading)")
    p.add_argument("--batch-max-tokens", type=int, default=64)
    p.add_argument("--interactive-max-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int,
                   help="every prompt exactly this many tokens (default: mixed lengths, 1 to 10 sentences)")
    p.add_argument("--seconds", type=float, help="per phase (default 15; --quick 2)")
    p.add_argument("--repeats", type=int, help="repetitions (default 5; --quick 2)")
    p.add_argument("--warmup-s", type=float, help="per warm-up phase (idle, alone, loaded; default 5, --quick 1)")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--engine", action="store_true",
                   help="in-process engine instead of Ray Serve over HTTP: the engine's share of the loaded TTFT")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the replica (MLX's CUDA backend)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny model, short phases, 2 repetitions: a smoke run")
    p.add_argument("--no-openblas", action="store_true")
    a = p.parse_args(argv)
    a.preset = "tiny" if a.quick else "bench"
    a.batch_clients = a.batch_clients or a.slots + max(1, a.slots // 4)
    a.seconds = a.seconds or (2.0 if a.quick else 15.0)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.warmup_s = a.warmup_s if a.warmup_s is not None else (1.0 if a.quick else 5.0)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    return a


class Prompts:
    """Fresh prompts: every phase takes ones no earlier phase used. With ``tokens``, each is a token-id
    list of exactly that length: MLX's CUDA backend compiles kernels per shape, so equal lengths let
    the warm-up compile every prefill shape and the phases measure scheduling, not compilation."""

    def __init__(self, model_dir: Path | None = None, tokens: int | None = None) -> None:
        self.next = 0
        self.tokens = tokens
        self.tokenizer = None
        if tokens:
            from mlx_lm.utils import load_tokenizer

            self.tokenizer = load_tokenizer(model_dir)
            self.filler = " " + " ".join(corpus_sentences()[:40])

    def take(self, n: int) -> list[str] | list[list[int]]:
        out = make_prompts(n, self.next)
        self.next += n
        if self.tokenizer is None:
            return out
        ids = [list(self.tokenizer.encode(text + self.filler))[: self.tokens] for text in out]
        assert all(len(x) == self.tokens for x in ids), "the filler is too short for --prompt-tokens"
        return ids


async def interactive_client(h: Any, prompts: list[Any], args: argparse.Namespace, bias: dict[str, float],
                             priority: str, recs: list[dict[str, Any]]) -> None:
    while prompts:
        body = {"model": "bench", "prompt": prompts.pop(), "max_tokens": args.interactive_max_tokens,
                "temperature": 0.0, "logit_bias": bias, "stream": True, "priority": priority}
        rec: dict[str, Any] = {"ttft": None, "error": None}
        start = time.perf_counter()
        if isinstance(h, EngineClient):
            await h.first_token(body, rec, start)
            recs.append(rec)
            await asyncio.sleep(args.interactive_think_s)
            continue
        try:
            async with h.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                else:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"error"' in line[:20]:
                            rec["error"] = line[:200]
                        elif rec["ttft"] is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                            rec["ttft"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - any failure voids the phase
            rec["error"] = f"{type(e).__name__}: {e}"
        recs.append(rec)
        await asyncio.sleep(args.interactive_think_s)


class EngineClient:
    """``--engine``: the same requests straight into an in-process ``Engine`` (no Ray, no HTTP), to see
    how much of the loaded interactive TTFT the engine alone accounts for."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @staticmethod
    def _request(body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"]
        return {"model": body["model"], **({"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}),
                "priority": body["priority"], "sampling": {
                    "max_tokens": body["max_tokens"], "temperature": 0.0,
                    "logit_bias": {str(k): v for k, v in body["logit_bias"].items()}}}

    async def first_token(self, body: dict[str, Any], rec: dict[str, Any], start: float) -> None:
        try:
            async for chunk in self.engine.generate(self._request(body)):
                if rec["ttft"] is None and chunk.token_ids:
                    rec["ttft"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - any failure voids the phase
            rec["error"] = f"{type(e).__name__}: {e}"

    async def whole(self, body: dict[str, Any], rec: dict[str, Any]) -> None:
        try:
            rec["tokens"] = (await self.engine.complete(self._request(body))).usage.completion_tokens
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"


async def batch_client(h: Any, prompts: list[Any], args: argparse.Namespace, bias: dict[str, float],
                       recs: list[dict[str, Any]], stop: asyncio.Event) -> None:
    while prompts and not stop.is_set():
        body = {"model": "bench", "prompt": prompts.pop(), "max_tokens": args.batch_max_tokens, "temperature": 0.0,
                "logit_bias": bias, "priority": "batch"}
        rec: dict[str, Any] = {"tokens": 0, "error": None, "start": time.perf_counter(), "end": None}
        recs.append(rec)
        if isinstance(h, EngineClient):
            await h.whole(body, rec)
            rec["end"] = time.perf_counter()
            continue
        try:
            r = await h.post("/v1/completions", json=body)
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                rec["tokens"] = r.json()["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["end"] = time.perf_counter()


def tokens_within(recs: list[dict[str, Any]], t0: float, t1: float) -> float:
    """Batch tokens generated in [t0, t1]: each request's tokens times the share of its duration inside."""
    total = 0.0
    for r in recs:
        if r["end"] is None or r["end"] <= r["start"]:
            continue
        inside = max(0.0, min(r["end"], t1) - max(r["start"], t0))
        total += r["tokens"] * inside / (r["end"] - r["start"])
    return total


async def phase(base: str | EngineClient, name: str, args: argparse.Namespace, prompts: Prompts, bias: dict[str, float],
                seconds: float) -> dict[str, Any]:
    """One phase: its clients run for ``seconds``; what finished by then is counted."""
    interactive = name in ("idle", "loaded", "loaded_fifo")
    batch = name in ("alone", "loaded", "loaded_fifo")
    i_recs: list[dict[str, Any]] = []
    b_recs: list[dict[str, Any]] = []
    clients = args.batch_clients + args.interactive_clients + 4
    stop = asyncio.Event()
    async with _client(base, clients) as h:
        tasks, batch_tasks = [], []
        if interactive:
            priority = "batch" if name == "loaded_fifo" else "interactive"
            for _ in range(args.interactive_clients):
                tasks.append(asyncio.create_task(interactive_client(h, prompts.take(100), args, bias,
                                                                    priority, i_recs)))
        if batch:
            for _ in range(args.batch_clients):
                batch_tasks.append(asyncio.create_task(batch_client(h, prompts.take(100), args, bias, b_recs, stop)))
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        t1 = time.perf_counter()
        wall = t1 - t0
        stop.set()
        for t in tasks:  # interactive clients stop now; batch clients finish the request they are in
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*batch_tasks)
    errors = [r["error"] for r in i_recs + b_recs if r["error"]]
    ttfts = [r["ttft"] for r in i_recs if r["ttft"] is not None]
    tokens = tokens_within(b_recs, t0, t1)
    return {
        "phase": name, "wall_s": round(wall, 3), "void": bool(errors), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "interactive_requests": len(i_recs), "interactive_ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "interactive_ttft_p90_ms": _ms(percentile(ttfts, 90)),
        "batch_requests": len(b_recs), "batch_tokens": round(tokens, 1), "batch_tokens_per_s": tokens / wall if batch else None,
    }


@contextlib.asynccontextmanager
async def _client(base: str | EngineClient, connections: int) -> AsyncIterator[Any]:
    if isinstance(base, EngineClient):
        yield base
        return
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=connections)) as h:
        yield h


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def ratios_of(rep: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """One repetition's ratios; None where a phase it needs is void or missing."""

    def get(phase: str, key: str) -> float | None:
        p = rep.get(phase)
        return None if p is None or p["void"] else p[key]

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    idle = get("idle", "interactive_ttft_p50_ms")
    alone = get("alone", "batch_tokens_per_s")
    return {
        "interactive_ttft_p50_loaded_vs_idle": div(get("loaded", "interactive_ttft_p50_ms"), idle),
        "batch_tokens_loaded_vs_alone": div(get("loaded", "batch_tokens_per_s"), alone),
        "interactive_ttft_p50_fifo_vs_idle": div(get("loaded_fifo", "interactive_ttft_p50_ms"), idle),
        "batch_tokens_fifo_vs_alone": div(get("loaded_fifo", "batch_tokens_per_s"), alone),
    }


def start_server(model_dir: Path, args: argparse.Namespace) -> str:
    from ray import serve

    from deployments.app import build_app
    from loadtests.bench_http import free_port, wait_http

    port = free_port()
    start_local_serve(port)
    serve.run(build_app({"models": [{
        "name": "bench", "source": str(model_dir), "num_cpus": 0, "num_gpus": args.num_gpus,
        "max_ongoing_requests": args.slots, "engine": {"max_batch_size": args.slots}}]}), name="bench",
        route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/ready", 600)
    return base


def eos_bias(model_dir: Path) -> dict[str, float]:
    from loadtests.bench_http import eos_bias as bias

    return bias(model_dir)


async def run_all(base: str | EngineClient, args: argparse.Namespace, bias: dict[str, float], model_dir: Path) -> dict[str, Any]:
    prompts = Prompts(model_dir, args.prompt_tokens)
    for name in ("idle", "alone", "loaded"):  # one warm-up for every phase: both client kinds, every batch shape
        w = await phase(base, name, args, prompts, bias, args.warmup_s)
        print(f"warm-up {name}: {w['interactive_requests']} interactive, {w['batch_requests']} batch requests",
              flush=True)
    reps: list[dict[str, dict[str, Any]]] = []
    for i in range(args.repeats):
        order = args.phases[i % len(args.phases):] + args.phases[:i % len(args.phases)]
        rep = {}
        for name in order:
            rep[name] = await phase(base, name, args, prompts, bias, args.seconds)
            p = rep[name]
            print(f"rep {i} {name:<12} ttft p50 {p['interactive_ttft_p50_ms'] or 0:8.1f} ms  batch "
                  f"{p['batch_tokens_per_s'] or 0:8.1f} tok/s  errors {p['errors']}", flush=True)
        reps.append(rep)
    per_rep = [ratios_of(r) for r in reps]
    ratios = {k: spread([r[k] for r in per_rep]) for k in per_rep[0]}
    return {"repetitions": reps, "ratios_per_repetition": per_rep, "ratios_summary": ratios}


async def run_in_process(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--engine``: the phases against an in-process engine whose batch holds what the ingress's gate
    lets through (batch clients = slots less the interactive reserve), so the engine's share shows."""
    from deployments.qos.config import QosConfig
    from engine.config import EngineConfig
    from engine.engine import Engine

    args.batch_clients = args.slots - math.ceil(args.slots * QosConfig().interactive_reserve)
    engine = Engine(EngineConfig(max_batch_size=args.slots))
    await engine.load_model("bench", str(model_dir))
    try:
        return await run_all(EngineClient(engine), args, eos_bias(model_dir), model_dir)
    finally:
        await engine.shutdown(drain_timeout_s=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = ensure_model(args.model, args.model_dir, args.preset)
    if args.engine:
        out = asyncio.run(run_in_process(model_dir, args))
    else:
        base = start_server(model_dir, args)
        try:
            out = asyncio.run(run_all(base, args, eos_bias(model_dir), model_dir))
        finally:
            stop_local_serve()
    s = out["ratios_summary"]
    print_spread(s)
    ok = True
    for k, (op, target) in TARGETS.items():
        m = s[k]["median"]
        met = m is not None and (m <= target if op == "<=" else m >= target)
        ok &= met
        print(f"{k}: {m if m is None else round(m, 3)} (target {op} {target}: {'met' if met else 'NOT met'})")
    if args.json:
        write_json(args.json, {
            "machine": machine_info(), "model": str(model_dir),
            "settings": {k: getattr(args, k) for k in ("slots", "batch_clients", "interactive_clients", "interactive_think_s",
                                                       "batch_max_tokens", "interactive_max_tokens", "prompt_tokens", "seconds",
                                                       "repeats", "warmup_s", "phases", "num_gpus", "engine")},
            "ratios": {k: v["median"] for k, v in s.items()}, "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()},
            **out})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
