"""Throughput benchmark of the in-process engine against its ceiling and against a naive server.

Same run, same model, same prompts, same per-request settings for three paths:

  engine      N concurrent ``Engine.generate`` consumers (asyncio, closed loop: each consumer sends
              its next request when the previous one finishes);
  batchgen    a bare loop over ``mlx_lm.generate.BatchGenerator`` on the main thread, keeping N
              sequences in flight the same way: the ceiling for our scheduler;
  sequential  ``mlx_lm.stream_generate`` over the prompts one after another (a naive server),
              measured once: it does not depend on concurrency.

Every request is greedy and generates exactly ``--max-tokens`` tokens: the EOS ids get a logit
bias of -100 (the same logits processor in all three paths), so no request stops early and every
path does the same amount of work. Aggregate tokens/s = generated tokens / wall time of the level.
TTFT is measured per request from its submission to its first generated token. The engine and the
bare BatchGenerator run back to back for each level (never at the same time: the other one is
idle), so a machine that others share slows both alike. Each of ``--repeat`` repetitions (default
5) measures every path once per level with prompts no earlier run used, the sequential path too;
each ratio is computed per repetition and reported as the median with its min and max, and the
table shows each path's median run.

On Linux, MLX's CPU wheel uses netlib's reference BLAS (batching gains nothing there); this script
re-executes itself with OpenBLAS preloaded when it is installed (``--no-openblas`` to skip) and says
which BLAS it used.

    python loadtests/bench_engine.py                      # bench model, concurrency 1,8,32
    python loadtests/bench_engine.py --quick              # tiny model, seconds
    python loadtests/bench_engine.py --json out.json --concurrency 1,8,32 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``loadtests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    blas_description, ensure_model, machine_info, make_prompts, model_description, percentile,
    print_table, reexec_with_openblas, spread, warmup_per_client, write_json,
)

PATHS = ("engine", "batchgen", "sequential")
# issue #16: the ratio keys each target applies to, at the levels they are set for
TARGETS = {"engine_vs_batchgenerator_c32": 0.95, "engine_vs_batchgenerator_c64": 0.95,
           "engine_c32_vs_sequential": 3.0, "engine_c1_vs_sequential": 0.95}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found "
                   "(default ~/.cache/mlx-serving/models/demo-bench, or demo-tiny with --quick)")
    p.add_argument("--concurrency", help="comma-separated levels (default 1,8,32; --quick: 1,4)")
    p.add_argument("--max-tokens", type=int, help="generated tokens per request (default 128; --quick: 16)")
    p.add_argument("--waves", type=int, default=2,
                   help="requests per level = max(waves * concurrency, --min-requests) (default 2)")
    p.add_argument("--min-requests", type=int, help="fewest requests per level (default 8; --quick: 4)")
    p.add_argument("--sequential-requests", type=int,
                   help="requests for the sequential path (default 8; --quick: 2)")
    p.add_argument("--repeat", type=int, default=5,
                   help="repetitions: each measures every path once per level (fresh prompts), in an order that "
                        "alternates; ratios are per repetition, reported as their median with min-max (default 5)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    p.add_argument("--max-batch-size", type=int, help="engine max_batch_size and BatchGenerator "
                   "completion_batch_size (default: EngineConfig's, at least the highest level)")
    p.add_argument("--prompt-cache-gb", type=float,
                   help="the engine's prompt (prefix) cache size; 0 turns it off (default: EngineConfig's)")
    p.add_argument("--admission-window-ms", type=float,
                   help="the engine's admission_window_ms; 0 admits new prompts at once (default: EngineConfig's)")
    p.add_argument("--engine-config", type=json.loads, default={},
                   help="JSON merged into the engine's config, e.g. '{\"switch_interval_ms\": 1}'")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, concurrency 1,4, 16 tokens")
    p.add_argument("--no-openblas", action="store_true", help="do not re-execute with OpenBLAS preloaded")
    a = p.parse_args(argv)
    q = a.quick
    a.preset = "tiny" if q else "bench"
    a.levels = [int(x) for x in (a.concurrency or ("1,4" if q else "1,8,32")).split(",") if x.strip()]
    if not a.levels or min(a.levels) < 1:
        p.error("--concurrency needs positive integers")
    a.max_tokens = a.max_tokens or (16 if q else 128)
    a.min_requests = a.min_requests or (4 if q else 8)
    a.sequential_requests = a.sequential_requests or (2 if q else 8)
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = [x for x in a.paths if x not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {PATHS}")
    return a


def requests_for(level: int, args: argparse.Namespace) -> int:
    return max(args.waves * level, args.min_requests)


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def summarize(path: str, level: int | None, wall: float, cpu: float, reqs: list[dict[str, Any]],
              load: tuple[float | None, float | None] = (None, None)) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in reqs)
    ttft = [r["ttft"] * 1e3 for r in reqs if r["ttft"] is not None]
    return {
        "path": path,
        "concurrency": level,
        "requests": len(reqs),
        "generated_tokens": tokens,
        "prompt_tokens": sum(r["prompt_tokens"] for r in reqs),
        "cached_prompt_tokens": sum(r.get("cached_tokens", 0) for r in reqs),
        "tokens_per_request": sorted({r["tokens"] for r in reqs}),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_token": round(cpu * 1e3 / tokens, 2) if tokens else None,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "load_1m": {"start": load[0], "end": load[1]},
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99),
                    "mean": sum(ttft) / len(ttft) if ttft else None, "max": max(ttft) if ttft else None},
    }


# -- (b) bare BatchGenerator --------------------------------------------------------------------------
class BareBatch:
    """mlx-lm's BatchGenerator driven directly from the main thread, with a stream made there."""

    def __init__(self, model, eos_ids: list[int], bias: dict[int, float], cfg) -> None:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        self.bias = bias
        self.gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in eos_ids] or None,
            completion_batch_size=cfg.max_batch_size,
            prefill_batch_size=min(cfg.prefill_batch_size, cfg.max_batch_size),
            prefill_step_size=cfg.prefill_step_size,
            stream=mx.new_stream(mx.default_device()),
        )

    def run(self, work: list[tuple[int, list[int]]], level: int, max_tokens: int):
        """Serve ``work`` ((prompt index, prompt tokens) in order), ``level`` sequences in flight."""
        from mlx_lm.sample_utils import make_logits_processors

        gen = self.gen
        pending = deque(work)
        live: dict[int, dict[str, Any]] = {}
        done: list[dict[str, Any]] = []

        def insert() -> None:
            i, prompt = pending.popleft()
            (uid,) = gen.insert([prompt], max_tokens=[max_tokens], samplers=[None],
                                logits_processors=[make_logits_processors(logit_bias=self.bias)])
            live[uid] = {"index": i, "start": time.perf_counter(), "ttft": None, "tokens": 0,
                         "prompt_tokens": len(prompt), "ids": [], "finish": None}

        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(min(level, len(work))):
            insert()
        while live:
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                rec = live.get(r.uid)
                if rec is None:
                    continue
                if rec["ttft"] is None:
                    rec["ttft"] = now - rec["start"]
                rec["tokens"] += 1
                rec["ids"].append(r.token)
                if r.finish_reason is not None:
                    rec["finish"] = r.finish_reason
                    done.append(live.pop(r.uid))
                    if pending:
                        insert()
        return time.perf_counter() - t0, time.process_time() - c0, done

    def close(self) -> None:
        self.gen.close()


# -- (c) sequential stream_generate ---------------------------------------------------------------
def run_sequential(model, tokenizer, work: list[tuple[int, list[int]]], max_tokens: int,
                   bias: dict[int, float]):
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    done = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, prompt in work:
        start = time.perf_counter()
        rec = {"index": i, "ttft": None, "tokens": 0, "prompt_tokens": len(prompt), "ids": [], "finish": None}
        for resp in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=max_tokens,
                                    logits_processors=make_logits_processors(logit_bias=bias)):
            if rec["ttft"] is None:
                rec["ttft"] = time.perf_counter() - start
            rec["tokens"] = resp.generation_tokens
            rec["ids"].append(resp.token)
            rec["finish"] = resp.finish_reason
        done.append(rec)
    return time.perf_counter() - t0, time.process_time() - c0, done


# -- (a) the Engine ---------------------------------------------------------------------------------
async def run_engine_level(engine, name: str, work: list[tuple[int, list[int]]], level: int,
                           max_tokens: int, bias: dict[int, float]):
    from engine.request import GenerationRequest, SamplingParams

    pending = deque(work)
    done: list[dict[str, Any]] = []

    async def consumer() -> None:
        while pending:
            i, prompt = pending.popleft()
            start = time.perf_counter()
            rec = {"index": i, "ttft": None, "tokens": 0, "prompt_tokens": len(prompt), "ids": [], "finish": None}
            req = GenerationRequest(
                model=name, prompt_token_ids=prompt,
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=bias),
            )
            async for chunk in engine.generate(req):
                if rec["ttft"] is None and chunk.token_ids:
                    rec["ttft"] = time.perf_counter() - start
                rec["tokens"] += len(chunk.token_ids)
                rec["ids"].extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    rec["finish"] = chunk.finish_reason
                    rec["cached_tokens"] = chunk.usage.cached_tokens if chunk.usage else 0
            done.append(rec)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(consumer() for _ in range(min(level, len(work)))))
    return time.perf_counter() - t0, time.process_time() - c0, done


class EngineRunner:
    """The Engine and an event loop of its own on the main thread. Between its measurements the
    engine's GPU thread is idle (blocked on its inbox), so it does not compete with the other paths."""

    name = "bench"

    def __init__(self, path: Path, cfg) -> None:
        from engine.engine import Engine

        self.loop = asyncio.new_event_loop()
        self.engine = Engine(cfg)
        t = time.perf_counter()
        self.loop.run_until_complete(self.engine.load_model(self.name, str(path)))
        self.load_s = time.perf_counter() - t

    def run(self, work: list[tuple[int, list[int]]], level: int, max_tokens: int, bias: dict[int, float]):
        return self.loop.run_until_complete(
            run_engine_level(self.engine, self.name, work, level, max_tokens, bias))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.shutdown(drain_timeout_s=5.0))
        self.loop.close()


# -- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(disabled=args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import mlx.core as mx
    import mlx_lm

    from engine.config import EngineConfig

    blas = blas_description()
    print(f"BLAS: {blas}", flush=True)
    path = ensure_model(args.model, args.model_dir, args.preset)
    cfg_kwargs: dict[str, Any] = {}
    if args.prompt_cache_gb is not None:
        cfg_kwargs["prompt_cache_gb"] = args.prompt_cache_gb
    if args.admission_window_ms is not None:
        cfg_kwargs["admission_window_ms"] = args.admission_window_ms
    if args.max_batch_size:
        cfg_kwargs["max_batch_size"] = args.max_batch_size
    elif EngineConfig().max_batch_size < max(args.levels):
        cfg_kwargs["max_batch_size"] = max(args.levels)
    cfg = EngineConfig(**{**cfg_kwargs, **args.engine_config})

    model, tokenizer = mlx_lm.load(str(path))
    model_info = model_description(model, path)
    eos_ids = sorted(tokenizer.eos_token_ids)
    bias = {int(t): -100.0 for t in eos_ids}
    # Every timed request of a path gets a prompt no earlier request of that path had (one block of
    # prompts per level and repetition), and engine and BatchGenerator get the same blocks; the
    # sequential path gets blocks of its own. So no path can reuse an earlier prompt.
    # The warm-up follows the rules (loadtests/README.md): every path, at every level, full-length
    # requests on prompts no timed phase has, ``warmup_per_client`` of them per client (on a GPU at
    # least 64 a level: each new prompt length is a new shape for MLX's CUDA kernels, and each path
    # decodes on its own stream); the sequential path as one client.
    warm_blocks: dict[int, tuple[int, int]] = {}
    nxt = 0
    for level in args.levels:
        warm_blocks[level] = (nxt, nxt + level * warmup_per_client(None, level, args.quick))
        nxt = warm_blocks[level][1]
    seq_warm = (nxt, nxt + warmup_per_client(None, 1, args.quick))
    nxt = seq_warm[1]
    blocks: dict[tuple[int, int], tuple[int, int]] = {}
    for level in args.levels:
        for rep in range(args.repeat):
            blocks[level, rep] = (nxt, nxt + requests_for(level, args))
            nxt += requests_for(level, args)
    seq_blocks = {rep: (nxt + rep * args.sequential_requests, nxt + (rep + 1) * args.sequential_requests)
                  for rep in range(args.repeat)}
    texts = make_prompts(nxt + args.repeat * args.sequential_requests)
    prompts = [list(tokenizer.encode(t)) for t in texts]
    plens = [len(p) for p in prompts]

    def work(block: tuple[int, int]) -> list[tuple[int, list[int]]]:
        return [(i, prompts[i]) for i in range(*block)]

    settings = {
        "max_tokens": args.max_tokens,
        "concurrency": args.levels,
        "requests_per_level": {str(level): requests_for(level, args) for level in args.levels},
        "sequential_requests": args.sequential_requests,
        "distinct_prompts": len(set(map(tuple, prompts))),
        "prompts": "corpus sentences (1-10 per prompt), each opened by its own number; a new block of "
                   "prompts per level and repetition, the same blocks for engine and BatchGenerator",
        "engine_prompt_cache_gb": cfg.prompt_cache_gb, "engine_config": args.engine_config,
        "prompt_tokens": {"min": min(plens), "max": max(plens), "mean": round(sum(plens) / len(plens), 1)},
        "sampling": "greedy (temperature 0)",
        "eos_suppression": f"logit_bias -100 on EOS ids {eos_ids}: every request generates exactly max_tokens",
        "stop_tokens": eos_ids,
        "max_batch_size": cfg.max_batch_size,
        "prefill_batch_size": cfg.prefill_batch_size,
        "prefill_step_size": cfg.prefill_step_size,
        "admission_window_ms": cfg.admission_window_ms,
        "closed_loop": "each of N consumers sends its next request when its previous one finishes",
        "warmup": "before timing, engine and BatchGenerator run the same fresh full-length requests at every "
                  "level, the sequential path its own as one client",
        "warmup_requests": {"sequential": seq_warm[1] - seq_warm[0],
                            **{str(level): b - a for level, (a, b) in warm_blocks.items()}},
        "repeat": args.repeat,
        "order": "per repetition: sequential, then per level BatchGenerator and engine back to back; in odd "
                 "repetitions the reverse (engine, BatchGenerator, then sequential); ratios per repetition, "
                 "median with min-max",
        "paths": args.paths,
        "quick": args.quick,
        "blas": blas,
    }
    print(f"model: {model_info['name']} ({model_info['params'] / 1e6:.1f}M params, {model_info['dtype']}) at {path}")
    print(f"{len(prompts)} distinct prompts of {min(plens)}-{max(plens)} tokens; {args.max_tokens} generated "
          f"tokens per request (greedy; EOS ids {eos_ids} biased by -100 so none stops early)", flush=True)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}  # path -> level -> one summary per repetition
    token_ids: dict[str, dict[int, list[int]]] = {}

    def measure(name: str, level: int | None, fn) -> dict[str, Any]:
        """Run one timed measurement; every repetition's is kept."""
        l0 = load1()
        wall, cpu, reqs = fn()
        s = summarize(name, level, wall, cpu, reqs, (l0, load1()))
        key = "all" if level is None else str(level)
        runs.setdefault(name, {}).setdefault(key, []).append(s)
        token_ids.setdefault(name, {}).update({r["index"]: r["ids"] for r in reqs})
        label = f"{name:<10} c={key:<3}" if level is not None else f"{name:<16}"
        print(f"  {label} {s['tokens_per_s']:8.1f} tok/s  ({len(reqs)} requests, {wall:.1f}s, "
              f"{s['cpu_ms_per_token']:.1f} ms CPU/token, load {l0}->{s['load_1m']['end']})", flush=True)
        return s

    # (c) sequential on the main thread (mlx-lm's thread-local generation stream), (b) the bare
    # BatchGenerator on the main thread with a stream made here, (a) the engine on its own GPU
    # thread: one runs while the others are idle, interleaved per repetition so that all see the
    # same machine (others may share it). Every path is warmed up alike first.
    t0 = time.perf_counter()
    if "sequential" in args.paths:
        run_sequential(model, tokenizer, work(seq_warm), args.max_tokens, bias)
    bare = eng = None
    if "batchgen" in args.paths:
        bare = BareBatch(model, eos_ids, bias, cfg)
        for level, block in warm_blocks.items():
            bare.run(work(block), level, args.max_tokens)
    if "engine" in args.paths:
        eng = EngineRunner(path, cfg)
        print(f"  engine: model loaded and warmed up by the engine in {eng.load_s:.1f}s", flush=True)
        for level, block in warm_blocks.items():
            eng.run(work(block), level, args.max_tokens, bias)
    print(f"  warm-up: {settings['warmup_requests']} requests, {time.perf_counter() - t0:.1f}s", flush=True)

    def sequential_phase(rep: int) -> None:
        if "sequential" in args.paths:
            measure("sequential", None,
                    lambda: run_sequential(model, tokenizer, work(seq_blocks[rep]), args.max_tokens, bias))

    try:
        for rep in range(args.repeat):
            if rep % 2 == 0:
                sequential_phase(rep)
            for level in args.levels:
                block = work(blocks[level, rep])
                order = (bare and "batchgen", eng and "engine")
                for name in order if rep % 2 == 0 else order[::-1]:
                    if name == "batchgen":
                        measure("batchgen", level, lambda: bare.run(block, level, args.max_tokens))
                    elif name == "engine":
                        measure("engine", level, lambda: eng.run(block, level, args.max_tokens, bias))
            if rep % 2 == 1:  # last in odd repetitions: a drift over the run favours no path
                sequential_phase(rep)
    finally:
        if bare is not None:
            bare.close()
        if eng is not None:
            eng.close()
    model = bare = None  # frees the weights (the lambdas above ran already)
    gc.collect()
    mx.clear_cache()
    # The table shows each (path, level)'s median run; the ratios below are per repetition.
    results = {name: {key: {**sorted(xs, key=lambda x: x["tokens_per_s"])[len(xs) // 2],
                            "runs_tokens_per_s": [round(x["tokens_per_s"], 2) for x in xs]}
                      for key, xs in levels.items()} for name, levels in runs.items()}

    # -- report -----------------------------------------------------------------------------------
    short = [f"{r['path']}@{r['concurrency']}: {r['tokens_per_request']}" for v in results.values()
             for r in v.values() if r["tokens_per_request"] != [args.max_tokens]]
    rows = []
    labels = {"engine": "engine (Engine.generate)", "batchgen": "BatchGenerator (bare loop)",
              "sequential": "sequential stream_generate"}
    for name in ("engine", "batchgen", "sequential"):
        for key, s in results.get(name, {}).items():
            rows.append([labels[name], "-" if key == "all" else key, s["requests"], s["generated_tokens"],
                         s["wall_s"], s["cpu_ms_per_token"], s["tokens_per_s"], s["ttft_ms"]["p50"],
                         s["ttft_ms"]["p99"], s["load_1m"]["start"]])
    print()
    print(f"BLAS: {blas}   model: {model_info['name']} {model_info['params'] / 1e6:.1f}M {model_info['dtype']}   "
          f"max_tokens: {args.max_tokens}   repetitions: {args.repeat} (median run shown)")
    table = print_table(["path", "concurrency", "requests", "tokens", "wall s", "CPU ms/tok", "tokens/s",
                         "TTFT p50 ms", "TTFT p99 ms", "load 1m"], rows)

    def tps(name: str, level: int | None, rep: int) -> float | None:
        xs = runs.get(name, {}).get("all" if level is None else str(level), [])
        return xs[rep]["tokens_per_s"] if rep < len(xs) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    per_rep: list[dict[str, float | None]] = []
    for rep in range(args.repeat):
        seq, r = tps("sequential", None, rep), {}
        for level in args.levels:
            r[f"engine_vs_batchgenerator_c{level}"] = ratio(tps("engine", level, rep), tps("batchgen", level, rep))
            r[f"engine_c{level}_vs_sequential"] = ratio(tps("engine", level, rep), seq)
            r[f"batchgenerator_c{level}_vs_sequential"] = ratio(tps("batchgen", level, rep), seq)
        per_rep.append(r)
    ratios_summary = {k: spread([r[k] for r in per_rep]) for k in per_rep[0]}
    ratios: dict[str, float | None] = {k: v["median"] for k, v in ratios_summary.items()}
    targets = {k: {"target": t, "value": ratios[k], "met": None if ratios[k] is None else ratios[k] >= t}
               for k, t in TARGETS.items() if k in ratios}

    # Greedy outputs of the same prompt across paths (informational: batch composition and padding
    # can change float rounding, so a few late divergences are not errors).
    consistency = {}
    if "engine" in token_ids and "batchgen" in token_ids:
        common_idx = set(token_ids["engine"]) & set(token_ids["batchgen"])
        consistency["engine_eq_batchgen"] = (
            f"{sum(token_ids['engine'][i] == token_ids['batchgen'][i] for i in common_idx)}/{len(common_idx)}")
    if "sequential" in token_ids:
        for name in ("engine", "batchgen"):
            if name in token_ids:
                common_idx = set(token_ids["sequential"]) & set(token_ids[name])
                consistency[f"{name}_eq_sequential"] = (
                    f"{sum(token_ids['sequential'][i] == token_ids[name][i] for i in common_idx)}/{len(common_idx)}")

    print()
    for k, v in ratios_summary.items():
        if v["median"] is not None:
            print(f"{k:38s} {v['median']:6.3f}  ({v['min']:.3f}-{v['max']:.3f}, {v['n']} repetitions)")
    for k, t in targets.items():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"target {k:31s} >= {t['target']:<4} {state}")
    eng_res = results.get("engine", {}).values()
    if eng_res:
        print(f"engine prompt cache ({cfg.prompt_cache_gb} GB): reused {sum(r['cached_prompt_tokens'] for r in eng_res)} "
              f"of {sum(r['prompt_tokens'] for r in eng_res)} prompt tokens in the runs shown")
    if consistency:
        print("identical greedy outputs: " + ", ".join(f"{k} {v}" for k, v in consistency.items()))
    loads = [x for v in results.values() for r in v.values() for x in r["load_1m"].values() if x is not None]
    cores = os.cpu_count() or 1
    busy = max(loads, default=0.0)
    if busy > cores:
        print(f"NOTE: the machine was shared (1-minute load average up to {busy:.1f} on {cores} cores): "
              "absolute tokens/s are depressed and noisy; engine and BatchGenerator run back to back per "
              "level, so their ratio is the steadier number (use --repeat).")
    if short:
        print("WARNING: some requests did not generate exactly max_tokens: " + "; ".join(short))
    else:
        print(f"every request generated exactly {args.max_tokens} tokens")

    if args.json:
        doc = {
            "benchmark": "bench_engine",
            "machine": {**machine_info(), "load_1m_max_during_run": busy},
            "model": model_info,
            "settings": settings,
            "results": results,
            "ratios": ratios,
            "ratios_per_repetition": per_rep,
            "ratios_summary": ratios_summary,
            "targets": targets,
            "consistency": consistency,
            "table": table,
        }
        print(f"wrote {write_json(args.json, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
