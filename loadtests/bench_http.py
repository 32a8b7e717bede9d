"""HTTP benchmark: mlx-serving over Ray Serve against the in-process engine and ``mlx_lm.server``.

Same run, same model, three paths, all started once and kept up for the whole run:

  engine          the in-process ``Engine`` (the ceiling for the HTTP path);
  http            ``POST /v1/completions`` with ``stream: true`` through the Serve ingress and a
                  model replica (a local Ray cluster started by this script);
  mlx_lm_server   ``mlx_lm.server`` started on the same model, same streaming requests;
  http_variant    (only when asked for) ``http`` through a second app in the same cluster whose
                  ingress and replica run with ``--variant-env`` set (Serve settings read in those
                  processes; by default ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``) and whose
                  engine also takes ``--variant-engine-config``: ``http_variant_vs_http_cN``;
  engine_spread   (only when asked for) the in-process engine, each request sent after a pause drawn
                  from 0..``--spread-ms``: arrivals as spread out as an HTTP hop leaves them, without
                  the hop: ``engine_spread_vs_engine_cN``.

Every request is greedy and generates exactly ``--max-tokens`` tokens (EOS gets a logit bias of
-100 in all three paths). Clients run closed loops: each sends its next request when the previous
stream ends, until it has sent ``--requests-per-client`` requests and the phase is ``--min-phase-s``
old (20 s on a GPU; never past 3x that). Client k starts k x ``--stagger-ms`` after the first, and a
refused connect is retried (nothing was sent), so no listen backlog counts as a failure.

Statistics (docs/benchmarks.md): every path gets the same warm-up (``--warmup-requests`` per client at
every level; by default 2, and on a GPU at least 64 requests per level); then ``--repeats``
repetitions, each running every path at every level (one phase at a time, the order of the paths
rotating), each phase with prompts no other phase had. A phase in which
a request fails after connecting (HTTP error, broken stream, short output) is void: it is kept with
its errors, and its repetition gives no ratio involving it. Aggregate tokens/s = generated tokens /
wall time of the phase; TTFT is measured to the first content chunk. Each phase also records the CPU
seconds of every process by role (``cpu``: the model replica, ingress, proxy, Ray's own; proc_cpu.py).
Ratios per repetition: ``http_vs_engine_c1``, ``http_vs_engine_c32``, ``http_vs_mlx_lm_server_c32``
(one per level); the JSON's ``ratios`` are their medians, ``spread`` has median, min, max and every
value, and targets are judged on the median.

    python loadtests/bench_http.py --json bench-out/http.json
    python loadtests/bench_http.py --quick          # tiny model, 2 repetitions
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    CONNECT_RETRIES, FreshPrompts, PhaseBudget, default_min_phase_s, ensure_model, machine_info, percentile,
    print_spread, print_table, reexec_with_openblas, send_streaming, spread, stagger, start_local_serve, stop_local_serve,
    warmup_per_client, write_json,
)
from loadtests.proc_cpu import PhaseCpu, busiest  # noqa: E402

TARGETS = {"http_vs_engine_c1": 0.9, "http_vs_engine_c32": 0.8, "http_vs_mlx_lm_server_c32": 1.0}
PATHS = ("engine", "http", "mlx_lm_server", "http_variant", "engine_spread")
DEFAULT_PATHS = PATHS[:3]
DEFAULT_VARIANT_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0"
ERRORS_KEPT = 5  # per phase, in the JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found")
    p.add_argument("--concurrency", default=None, help="levels (default 1,32)")
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 128; --quick 16)")
    p.add_argument("--requests-per-client", type=int, default=3,
                   help="fewest requests each client sends per phase (default 3)")
    p.add_argument("--min-phase-s", type=float, default=None,
                   help="fewest seconds per phase; clients stop at 3x this whatever happens "
                        "(default 20 on a GPU, 0 on the CPU and with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repetitions, each running every path at every level (default 5; --quick 2)")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="warm-up requests per client at every level, for every path (default 2; on a GPU at "
                        "least 64 per level in all)")
    p.add_argument("--stagger-ms", type=float, default=20.0, help="client k of a phase starts k x this later (20)")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"any of {','.join(PATHS)}")
    p.add_argument("--spread-ms", type=float, default=40.0,
                   help="engine_spread: each request waits a uniform 0..this many ms before it is sent (40)")
    p.add_argument("--variant-env", default=DEFAULT_VARIANT_ENV,
                   help=f"KEY=VALUE,... for the http_variant app's processes ({DEFAULT_VARIANT_ENV})")
    p.add_argument("--variant-engine-config", type=json.loads, default={},
                   help="JSON merged into the http_variant app's engine config, after --engine-config")
    p.add_argument("--engine-config", type=json.loads, default={},
                   help="JSON merged into the engine config of the engine and http paths, e.g. '{\"switch_interval_ms\": 1}'")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny model, 16 tokens, 2 repetitions: a smoke run")
    p.add_argument("--no-openblas", action="store_true")
    a = p.parse_args(argv)
    a.preset = "tiny" if a.quick else "bench"
    a.levels = [int(x) for x in (a.concurrency or "1,32").split(",") if x.strip()]
    a.max_tokens = a.max_tokens or (16 if a.quick else 128)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    pairs = [kv.strip() for kv in a.variant_env.split(",") if kv.strip()]
    if any("=" not in kv for kv in pairs):
        p.error(f"--variant-env takes KEY=VALUE,...; got {a.variant_env!r}")
    a.variant_env = dict(kv.split("=", 1) for kv in pairs)
    bad = [x for x in a.paths if x not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {PATHS}")
    if not a.levels or min(a.levels) < 1 or min(a.requests_per_client, a.repeats) < 1 or (a.warmup_requests or 0) < 0:
        p.error("levels, --requests-per-client and --repeats must be positive")
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(path: str, level: int, wall: float, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase. It is void when any request failed after connecting or came back short."""
    tokens = sum(r["tokens"] for r in recs)
    ttfts = [r["ttft"] for r in recs if r["ttft"] is not None]
    errors = [r["error"] for r in recs if r.get("error")]
    short = [r for r in recs if not r.get("error") and r["tokens"] != r["expected"]]
    problems = errors + [f"short output: {r['tokens']} of {r['expected']} tokens" for r in short]
    return {
        "path": path, "concurrency": level, "requests": len(recs), "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": (percentile(ttfts, 50) or 0) * 1000, "ttft_p99_ms": (percentile(ttfts, 99) or 0) * 1000,
        "short_requests": len(short), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "connect_retries": sum(r.get("retries", 0) for r in recs),
        "void": bool(problems), "error_list": problems[:ERRORS_KEPT],
    }


def new_record(expected: int) -> dict[str, Any]:
    return {"ttft": None, "tokens": 0, "expected": expected, "error": None, "retries": 0}


# -- one request per path -----------------------------------------------------------------------------
Send = Callable[[str], Awaitable[dict[str, Any]]]


def engine_sender(engine: Any, max_tokens: int, bias: dict[str, float]) -> Send:
    async def send(prompt: str) -> dict[str, Any]:
        rec = new_record(max_tokens)
        body = {"model": "bench", "prompt": prompt,
                "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "logit_bias": bias}}
        start = time.perf_counter()
        try:
            finished = False
            async for chunk in engine.generate(body):
                if rec["ttft"] is None and chunk.token_ids:
                    rec["ttft"] = time.perf_counter() - start
                rec["tokens"] += len(chunk.token_ids)
                finished = finished or chunk.finish_reason is not None
            if not finished:
                rec["error"] = "the stream ended without a finish reason"
        except Exception as e:  # noqa: BLE001 - any failure voids the phase
            rec["error"] = f"{type(e).__name__}: {e}"
        return rec

    return send


async def http_request(h: Any, model: str, prompt: str, max_tokens: int, bias: dict[str, float],
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed completion (ours and mlx_lm.server speak the same OpenAI protocol), with ``extra``
    body fields. A refused connect is retried; any later failure is the record's ``error``; ``chunks``
    counts the events that carried text."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logit_bias": bias,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    rec = new_record(max_tokens)
    chunks, done = 0, False
    start = time.perf_counter()
    try:
        r, rec["retries"] = await send_streaming(h, "/v1/completions", body)
    except httpx.HTTPError as e:  # still refused after the retries
        rec["error"] = f"connect failed after {CONNECT_RETRIES} retries: {type(e).__name__}: {e}"
        return rec
    try:
        if r.status_code != 200:
            rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return rec
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                rec["error"] = f"error event: {line[:200]}"
                break
            if data.get("usage"):
                rec["tokens"] = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - start
        if not done and rec["error"] is None:
            rec["error"] = "broken stream: no [DONE]"
    except (httpx.HTTPError, ValueError) as e:
        rec["error"] = f"broken stream: {type(e).__name__}: {e}"
    finally:
        await r.aclose()
    rec["tokens"] = rec["tokens"] or chunks
    rec["chunks"] = chunks
    return rec


async def http_records(base: str, model: str, first_prompt: int, level: int, per_client: int, min_s: float,
                       args: argparse.Namespace, bias: dict[str, float]) -> tuple[list[dict[str, Any]], float, float, list[int]]:
    """``level`` closed-loop streaming clients on fresh prompts from ``first_prompt`` on, each sending
    until ``PhaseBudget(per_client, min_s)`` says stop: one record per request, the wall-clock
    (``time.time``) start and end, so groups run in several processes can be pooled (bench_scaling.py),
    and the prompt range drawn."""
    import httpx

    prompts = FreshPrompts(first_prompt)
    prompts.phase()
    recs: list[dict[str, Any]] = []
    budget = PhaseBudget(per_client, min_s)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=level + 4)) as h:

        async def client(k: int) -> None:
            await stagger(k, getattr(args, "stagger_ms", 20.0))
            sent = 0
            while budget.more(sent):
                recs.append(await http_request(h, model, prompts.take(), args.max_tokens, bias))
                sent += 1

        t0 = time.time()
        await asyncio.gather(*[client(k) for k in range(level)])
        return recs, t0, time.time(), prompts.used()


# -- phases -------------------------------------------------------------------------------------------
async def phase(path: str, level: int, send: Send, prompts: FreshPrompts, per_client: int, min_s: float,
                stagger_ms: float) -> dict[str, Any]:
    """``level`` closed-loop clients on fresh prompts until the budget says stop."""
    recs: list[dict[str, Any]] = []
    prompts.phase()
    budget = PhaseBudget(per_client, min_s)

    async def client(k: int) -> None:
        await stagger(k, stagger_ms)
        sent = 0
        while budget.more(sent):
            recs.append(await send(prompts.take()))
            sent += 1

    cpu = PhaseCpu()
    cpu.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(level)))
    s = summarize(path, level, time.perf_counter() - t0, recs)
    s["prompts"] = prompts.used()
    s["cpu"] = cpu.stop()
    return s


def spread_sender(send: Send, spread_ms: float, seed: int) -> Send:
    """``send`` after a pause drawn from 0..``spread_ms``: the pause counts in the phase's wall time, as
    an HTTP hop's would, and not in the request's time to first token."""
    rng = random.Random(seed)

    async def spread(prompt: str) -> dict[str, Any]:
        await asyncio.sleep(rng.uniform(0.0, spread_ms) / 1000.0)
        return await send(prompt)

    return spread


class Senders:
    """Each path's ``send``. An HTTP path gets a new client (new connections) every phase: a keep-alive
    connection left idle while the other paths ran may be closed by its server under the next request."""

    def __init__(self) -> None:
        self.engine: Send | None = None
        self.http: dict[str, tuple[str, str]] = {}  # path -> (base URL, model name)

    @contextlib.asynccontextmanager
    async def open(self, path: str, level: int, args: argparse.Namespace,
                   bias: dict[str, float]) -> AsyncIterator[Send]:
        if path in ("engine", "engine_spread"):
            assert self.engine is not None
            yield self.engine if path == "engine" else spread_sender(self.engine, args.spread_ms, level)
            return
        import httpx

        base, model = self.http[path]
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=level + 4)) as h:
            yield lambda prompt: http_request(h, model, prompt, args.max_tokens, bias)


async def run_all(args: argparse.Namespace, model_dir: Path, bases: dict[str, tuple[str, str]],
                  bias: dict[str, float], min_s: float) -> dict[str, Any]:
    """Warm-up, then the interleaved repetitions, against paths that stay up throughout."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    senders = Senders()
    senders.http.update(bases)
    engine = None
    if {"engine", "engine_spread"} & set(args.paths):
        engine = Engine(EngineConfig(max_batch_size=max(32, *args.levels), **args.engine_config))
        await engine.load_model("bench", str(model_dir))
        senders.engine = engine_sender(engine, args.max_tokens, bias)
    prompts = FreshPrompts()
    warmup: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = []
    try:
        for path in args.paths:  # the same warm-up for every path: every level, fresh prompts
            for level in args.levels:
                n = warmup_per_client(args.warmup_requests, level, args.quick)
                if n:
                    async with senders.open(path, level, args, bias) as send:
                        w = await phase(path, level, send, prompts, n, 0.0, args.stagger_ms)
                    warmup.append(w)
                    print(f"warm-up {path:<14} c={level:<3} {w['requests']} requests, void {w['void']}", flush=True)
        for rep in range(args.repeats):
            order = args.paths[rep % len(args.paths):] + args.paths[:rep % len(args.paths)]
            for level in args.levels:
                for path in order:
                    async with senders.open(path, level, args, bias) as send:
                        s = await phase(path, level, send, prompts, args.requests_per_client, min_s, args.stagger_ms)
                    s["repetition"] = rep
                    phases.append(s)
                    print(f"rep {rep} {path:<14} c={level:<3} {s['tokens_per_s']:9.1f} tok/s  {s['requests']} requests "
                          f"{s['wall_s']:.1f}s  TTFT p50 {s['ttft_p50_ms']:.1f} ms  retries {s['connect_retries']}"
                          + (f"  VOID: {s['error_list'][0]}" if s["void"] else ""), flush=True)
                    print("    cpu " + busiest(s["cpu"]), flush=True)
    finally:
        if engine is not None:
            await engine.shutdown(5)
    return {"warmup": warmup, "phases": phases}


def ratios_per_repetition(phases: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, float | None]]:
    """Each repetition's ratios; None where a phase it needs is void or was not run."""
    out = []
    for rep in range(args.repeats):
        by = {(p["path"], p["concurrency"]): p for p in phases if p["repetition"] == rep}

        def tps(path: str, level: int) -> float | None:
            p = by.get((path, level))
            return None if p is None or p["void"] else p["tokens_per_s"]

        def div(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        r: dict[str, float | None] = {}
        for level in args.levels:
            if {"http", "engine"} <= set(args.paths):
                r[f"http_vs_engine_c{level}"] = div(tps("http", level), tps("engine", level))
            if {"http", "mlx_lm_server"} <= set(args.paths):
                r[f"http_vs_mlx_lm_server_c{level}"] = div(tps("http", level), tps("mlx_lm_server", level))
            if {"engine", "engine_spread"} <= set(args.paths):
                r[f"engine_spread_vs_engine_c{level}"] = div(tps("engine_spread", level), tps("engine", level))
            if {"http", "http_variant"} <= set(args.paths):
                r[f"http_variant_vs_http_c{level}"] = div(tps("http_variant", level), tps("http", level))
        out.append(r)
    return out


def median_runs(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (path, level) the phase of median tokens/s among the valid ones (report.py's rows)."""
    rows = []
    for key in dict.fromkeys((p["path"], p["concurrency"]) for p in phases):
        runs = [p for p in phases if (p["path"], p["concurrency"]) == key]
        valid = sorted((p for p in runs if not p["void"]), key=lambda p: p["tokens_per_s"])
        if valid:
            rows.append({**valid[len(valid) // 2], "runs_tokens_per_s": [round(p["tokens_per_s"], 2) for p in runs],
                         "void_runs": len(runs) - len(valid)})
    return rows


def report(phases: list[dict[str, Any]], per_rep: list[dict[str, float | None]]
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Print the median phase per path and level, the void phases and the ratios' spread; return
    (median rows, void phases, spread per ratio)."""
    results = median_runs(phases)
    print_table(["path", "clients", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "requests", "void runs"],
                [(r["path"], r["concurrency"], r["tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["requests"],
                  r["void_runs"]) for r in results])
    void = [p for p in phases if p["void"]]
    for p in void:
        print(f"VOID rep {p['repetition']} {p['path']} c={p['concurrency']}: {'; '.join(p['error_list'])}")
    summary = {k: spread([r[k] for r in per_rep]) for k in (per_rep[0] if per_rep else {})}
    print_spread(summary, digits=3)
    return results, void, summary


def phase_settings(args: argparse.Namespace, min_s: float) -> dict[str, Any]:
    """How the phases ran, for the JSON (shared with bench_sharded.py)."""
    return {"levels": args.levels, "max_tokens": args.max_tokens, "paths": args.paths,
            "repeats": args.repeats, "requests_per_client": args.requests_per_client,
            "min_phase_s": min_s, "phase": PhaseBudget(args.requests_per_client, min_s).describe(),
            "warmup_requests_per_client": {str(n): warmup_per_client(args.warmup_requests, n, args.quick)
                                           for n in args.levels}, "stagger_ms": args.stagger_ms,
            "connect_retries": CONNECT_RETRIES,
            **({"engine_config": args.engine_config} if hasattr(args, "engine_config") else {}),
            **({"variant_env": args.variant_env, "variant_engine_config": args.variant_engine_config}
               if "http_variant" in args.paths else {}),
            **({"spread_ms": args.spread_ms} if "engine_spread" in args.paths else {}),
            "order": "warm-up of every path at every level; then per repetition, per level, every path "
                     "once (their order rotating between repetitions)",
            "prompts": "numbered corpus prompts, a new range for every phase (warm-up included)",
            "sampling": "greedy, EOS biased by -100: every request generates exactly max_tokens",
            "quick": args.quick}


def judge(summary: dict[str, dict[str, Any]], levels: list[int]) -> dict[str, dict[str, Any]]:
    """Targets on the median, each at the level it is set for (a run without that level judges nothing)."""
    out = {}
    for key, target in TARGETS.items():
        if key not in summary:
            continue
        value = summary[key]["median"]
        out[key] = {"target": target, "value": value, "met": None if value is None else value >= target}
    return out


# -- the servers --------------------------------------------------------------------------------------
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


def start_serve(model_dir: Path, args: argparse.Namespace) -> dict[str, str]:
    """A local Ray cluster and the Serve app (and the ``http_variant`` one at ``/variant``), each path's
    base URL; the caller stops them (``stop_local_serve``)."""
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    start_local_serve(port)
    base = f"http://127.0.0.1:{port}"
    engine = {"max_batch_size": max(32, *args.levels), **args.engine_config}
    apps = {"http": ("bench", "/", {}, engine)}
    if "http_variant" in args.paths:
        apps["http_variant"] = ("bench-variant", "/variant", args.variant_env, {**engine, **args.variant_engine_config})
    for name, prefix, env, engine_config in apps.values():
        serve.run(build_app({"env_vars": env, "models": [{
            "name": "bench", "source": str(model_dir), "num_cpus": 0, "max_ongoing_requests": 256, "env_vars": env,
            "engine": engine_config}]}), name=name, route_prefix=prefix)
    bases = {path: base + prefix.rstrip("/") for path, (_, prefix, _, _) in apps.items()}
    for b in bases.values():
        wait_http(b + "/ready", 300)
    return bases


def start_mlx_lm_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port),
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/v1/models", 300)
    except TimeoutError:
        proc.kill()
        raise
    return proc, base


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = ensure_model(args.model, args.model_dir, args.preset)
    min_s = default_min_phase_s(args.quick) if args.min_phase_s is None else args.min_phase_s
    bias = eos_bias(model_dir)
    bases: dict[str, tuple[str, str]] = {}
    server = None
    ray_up = False
    try:  # both servers start once and stay up; only the phases interleave
        if {"http", "http_variant"} & set(args.paths):
            ray_up = True
            bases.update((path, (base, "bench")) for path, base in start_serve(model_dir, args).items())
        if "mlx_lm_server" in args.paths:
            server, base = start_mlx_lm_server(model_dir)
            bases["mlx_lm_server"] = (base, str(model_dir))
        out = asyncio.run(run_all(args, model_dir, {p: bases[p] for p in args.paths if p in bases}, bias, min_s))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        if ray_up:
            stop_local_serve()

    phases = out["phases"]
    per_rep = ratios_per_repetition(phases, args)
    results, void, summary = report(phases, per_rep)
    targets = judge(summary, args.levels)
    for k, t in targets.items():
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"{k}: median {t['value'] if t['value'] is None else round(t['value'], 3)} (target >= {t['target']}: {state})")
    if args.json:
        write_json(args.json, {
            "benchmark": "bench_http", "machine": machine_info(), "model": str(model_dir),
            "settings": phase_settings(args, min_s),
            "results": results, "ratios": {k: v["median"] for k, v in summary.items()}, "spread": summary,
            "ratios_per_repetition": per_rep, "targets": targets, "void_phases": len(void),
            "phases": phases, "warmup": out["warmup"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
