"""What three engine features cost or save, each against its own baseline in the same run.

All parts run in-process through ``engine.engine.Engine`` on the same model (default: the bench demo
model), with closed-loop asyncio clients (each sends its next request when its previous one ends):

  constrained  16 clients of free greedy generation, then 16 constrained (one engine): what
               structured output costs in aggregate tokens/s. Half the constrained requests carry a
               JSON-schema ``response_format``, the other half are forced tool calls (``--tool-share``;
               their free twins offer the same tools with tool_choice none). Every JSON output that
               finished with "stop" must parse and match the schema, every one must replay through
               the schema's grammar, and every call that closed must validate. The ratio is the median
               over repetitions of each repetition's constrained / free (with its min and max).
  prefix       one request at a time, each a shared ~1,000-token system prefix plus a user part of
               its own (all of one length), after two priming requests (a cache miss, then a hit); one engine with the prompt (prefix) cache on
               (EngineConfig's size) and one with it off: what the cache saves in TTFT, and that it
               changes no greedy output.
  speculative  an engine with a draft model (default: the target's own weights, so every draft token
               is accepted): 16 non-speculative clients alone (phase A), then the same 16 with K
               speculative clients (one prompt, warmed up at full length first) running beside them
               all the time (phase B): what speculative
               requests cost the batch, and how fast they run themselves.

Free, batch and speculative requests are greedy with EOS biased by -100, so they generate exactly
``--max-tokens`` tokens; constrained requests use the same sampling (the grammar still ends them
when their JSON closes). The schema has open strings and an open array, so a random-weight model
usually runs to max_tokens there too; the mean completion tokens of both paths are reported.

Both sides of a comparison get the same prompts (prefill cost depends on them, padding included),
so the constrained and speculative parts run without a prompt cache: the second side must not
reuse the first's KV. Each part warms up outside timing with short requests (a full-width batch
where it measures one). ``--repeat`` measures each comparison several times, alternating the
order of its two sides; throughput parts report the best run per side, the prefix part pools its
TTFT samples.

Ratios (JSON ``ratios``): ``constrained_vs_free_c16`` (aggregate tokens/s, target >= 0.8; the suffix is
``--clients``), ``prefix_cache_ttft_speedup`` (TTFT p50 off / on), ``batch_tps_with_speculative_vs_alone``
(the batch clients' aggregate tokens/s, phase B / A) and ``spec_request_tps_vs_batch_request_tps`` (mean
per-request decode rate, (tokens - 1) / (last token - first token), of a speculative request over a
batch request in phase B).

On Linux the script re-executes itself with OpenBLAS preloaded when MLX would use its reference
BLAS (``--no-openblas`` to skip), as bench_engine.py does.

    python loadtests/bench_features.py                         # bench model, all three parts
    python loadtests/bench_features.py --quick                 # tiny model, well under a minute
    python loadtests/bench_features.py --parts prefix --json out.json
    python loadtests/bench_features.py --model /tmp/m1b --draft /tmp/m1b-draft --spec-clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``loadtests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    _PROMPT_SPANS, blas_description, corpus_sentences, ensure_model, fmt, machine_info, make_prompts,
    model_description, percentile, print_table, reexec_with_openblas, write_json,
)

PARTS = ("constrained", "prefix", "speculative")
TARGETS = {"constrained_vs_free": 0.8}
NAME = "bench"  # the model's name inside each engine
# Open strings and an open array: a random-weight model has no reason to close them soon, so
# constrained requests do about as much work as free ones (the report shows both means).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "summary", "tags"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "article", "schema": SCHEMA}}
# Tool calls in the mix: the same open schema as a function's parameters. The constrained side forces a
# call (tool_choice required); its free counterpart gets the same messages and tools with tool_choice none.
TOOLS = [{"type": "function", "function": {"name": "publish_article", "description": "Publish an article.",
                                           "parameters": SCHEMA}}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found "
                   "(default ~/.cache/mlx-serving/models/demo-bench, or demo-tiny with --quick)")
    p.add_argument("--draft", help="the draft model directory for the speculative part; it must share the "
                   "target's tokenizer (default: the target's own directory, so acceptance is 100%%)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--clients", type=int, default=16,
                   help="closed-loop clients of the constrained part and batch clients of the speculative part (16)")
    p.add_argument("--requests-per-client", type=int, help="requests per client and side (default 3; --quick: 2)")
    p.add_argument("--max-tokens", type=int,
                   help="generated tokens per request, constrained and speculative parts (default 128; --quick: 24)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="length of the shared prefix in tokens (1000)")
    p.add_argument("--prefix-requests", type=int,
                   help="timed requests per engine after the priming one (default 8; --quick: 4)")
    p.add_argument("--prefix-max-tokens", type=int, help="generated tokens per prefix request (default 16; --quick: 8)")
    p.add_argument("--spec-clients", type=int, default=2, help="speculative clients in phase B (2)")
    p.add_argument("--num-draft-tokens", type=int,
                   help="draft tokens per verify step of the speculative requests (default: EngineConfig's)")
    p.add_argument("--tool-share", type=float, default=0.5,
                   help="share of the constrained part's requests that are tool calls (0.5: every other one)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each comparison this many times, alternating the order of its two sides")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 requests per client, 24 tokens")
    p.add_argument("--no-openblas", action="store_true", help="do not re-execute with OpenBLAS preloaded")
    a = p.parse_args(argv)
    q = a.quick
    a.preset = "tiny" if q else "bench"
    a.requests_per_client = a.requests_per_client or (2 if q else 3)
    a.max_tokens = a.max_tokens or (24 if q else 128)
    a.prefix_requests = a.prefix_requests or (4 if q else 8)
    a.prefix_max_tokens = a.prefix_max_tokens or (8 if q else 16)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad or not a.parts:
        p.error(f"unknown part(s) {bad}; choose from {PARTS}")
    if min(a.clients, a.requests_per_client, a.prefix_requests, a.spec_clients, a.repeat, a.prefix_tokens) < 1:
        p.error("counts must be positive")
    if a.num_draft_tokens is not None and a.num_draft_tokens < 1:
        p.error("--num-draft-tokens must be at least 1 (0 would make the speculative clients plain batch ones)")
    return a


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# -- prompts ----------------------------------------------------------------------------------------
class Prompts:
    """Token prompts that no other request of the run has had: blocks of ``make_prompts``, each
    starting where that function's cycle of lengths starts, so every block has the same mix."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.next = 0

    def block(self, n: int) -> list[list[int]]:
        cycle = len(_PROMPT_SPANS)
        start = -(-self.next // cycle) * cycle
        self.next = start + n
        return [list(self.tokenizer.encode(t)) for t in make_prompts(n, start)]

    def one(self) -> list[int]:
        """The next prompt, unaligned (speculative clients take them one by one, mixed lengths)."""
        i, self.next = self.next, self.next + 1
        return list(self.tokenizer.encode(make_prompts(1, i)[0]))


def shared_prefix(tokenizer: Any, n: int) -> list[int]:
    """``n`` tokens of corpus text (repeated as needed), tokenized as a prompt's start (BOS and all)."""
    sentences = corpus_sentences()
    text, ids = "", []
    while len(ids) < n:
        text = " ".join([text, *sentences]).strip()
        ids = list(tokenizer.encode(text))
    return ids[:n]


USER_TOKENS = 24


def user_part(tokenizer: Any, i: int) -> list[int]:
    """A question of its own for request ``i``, tokenized to follow a prefix (no BOS), always
    ``USER_TOKENS`` long: MLX's CUDA backend compiles kernels per shape, so equal lengths let the
    priming request compile them and the timed requests measure the steady state."""
    sentences = corpus_sentences()
    text = f"\nUser question {i}: " + " ".join(sentences[(i * 5 + j) % len(sentences)] for j in range(4))
    try:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer without the keyword
        ids = list(tokenizer.encode(text))
    return ids[:USER_TOKENS]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- requests and clients -----------------------------------------------------------------------------
def request(prompt: list[int], max_tokens: int, bias: dict[int, float], **extra: Any):
    from engine.request import GenerationRequest, SamplingParams

    return GenerationRequest(model=NAME, prompt_token_ids=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=bias), **extra)


def tool_request(text: str, max_tokens: int, bias: dict[int, float], choice: str):
    """A chat request offering ``TOOLS``: ``required`` (the constrained side) or ``none`` (its free twin)."""
    from engine.request import GenerationRequest, SamplingParams

    return GenerationRequest(model=NAME, messages=[{"role": "user", "content": text}], tools=TOOLS,
                             tool_choice=choice, parallel_tool_calls=False,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=bias))


def new_record(prompt: list[int] | None, index: int = -1) -> dict[str, Any]:
    return {"index": index, "prompt_tokens": len(prompt or []), "start": None, "first": None, "end": None,
            "tokens": 0, "ids": [], "text": [], "calls": [], "finish": None, "usage": None}


async def stream_into(engine, req, rec: dict[str, Any]) -> dict[str, Any]:
    """Stream one request into ``rec`` as it goes, so a cancelled request still shows its tokens."""
    rec["start"] = time.perf_counter()
    async for chunk in engine.generate(req):
        now = time.perf_counter()
        if chunk.token_ids and rec["first"] is None:
            rec["first"] = now
        rec["tokens"] += len(chunk.token_ids)
        rec["ids"].extend(chunk.token_ids)
        rec["text"].append(chunk.text)
        rec["calls"].extend(chunk.tool_calls or [])
        if chunk.finish_reason is not None:
            rec["finish"] = chunk.finish_reason
            rec["usage"] = chunk.usage.model_dump() if chunk.usage is not None else None
            if chunk.usage is not None:
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
    rec["end"] = time.perf_counter()
    return rec


async def closed_loop(engine, work: list[tuple[int, Any]], clients: int, done: list[dict[str, Any]]) -> None:
    """``clients`` consumers share ``work`` ((index, request) pairs); each sends its next request when
    its previous one ends."""
    pending = deque(work)

    async def client() -> None:
        while pending:
            i, req = pending.popleft()
            rec = new_record(req.prompt_token_ids, i)
            done.append(rec)
            await stream_into(engine, req, rec)

    await asyncio.gather(*(client() for _ in range(min(clients, len(work)))))


async def start_engine(cfg, path: Path, draft: Path | None = None):
    from engine.engine import Engine

    engine = Engine(cfg)
    t = time.perf_counter()
    await engine.load_model(NAME, str(path), draft_source=str(draft) if draft else None)
    return engine, time.perf_counter() - t


def remember(ctx: dict[str, Any], engine, path: Path) -> None:
    """On the first engine of the run: the model's description, tokenizer, prompts and EOS bias, read
    from the engine's own loaded model (no second load of the weights, the same EOS ids it uses)."""
    if "prompts" in ctx:
        return
    m = engine._model(NAME)
    eos = sorted(int(t) for t in m.eos_ids)
    ctx.update(model_info=model_description(m.model, path), tokenizer=m.tokenizer, vocab_size=m.vocab_size,
               prompts=Prompts(m.tokenizer), eos_ids=eos, bias={t: -100.0 for t in eos})


# -- summaries ----------------------------------------------------------------------------------------
def summarize(series: str, clients: int, wall: float, recs: list[dict[str, Any]],
              load: tuple[float | None, float | None]) -> dict[str, Any]:
    """One measurement in the shape report.py reads (``tokens_per_s``, ``ttft_ms``), plus per-request
    decode figures: TPOT is (end - first token) / (tokens - 1) of each finished request."""
    finished = [r for r in recs if r["finish"] is not None]
    tokens = sum(r["tokens"] for r in recs)
    ttft = [(r["first"] - r["start"]) * 1e3 for r in finished if r["first"] is not None]
    decoding = [r for r in finished if r["tokens"] > 1 and r["end"] > r["first"]]
    tpot = [(r["end"] - r["first"]) * 1e3 / (r["tokens"] - 1) for r in decoding]
    rate = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in decoding]
    completion = [r["tokens"] for r in finished]
    return {
        "path": series,
        "concurrency": clients,
        "requests": len(finished),
        "unfinished_requests": len(recs) - len(finished),
        "generated_tokens": tokens,
        "mean_completion_tokens": mean(completion),
        "prompt_tokens": sum(r["prompt_tokens"] for r in finished),
        "finish_reasons": dict(Counter(str(r["finish"]) for r in finished)),
        "wall_s": round(wall, 3),
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "mean": mean(ttft),
                    "max": max(ttft) if ttft else None},
        "tpot_ms": {"mean": mean(tpot), "p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
        "decode_tokens_per_s_per_request": mean(rate),
        "load_1m": {"start": load[0], "end": load[1]},
    }


class Results:
    """Measurements by series (``{series: {clients: summary}}``, bench_engine's shape), keeping the best
    run (highest tokens/s) when a part repeats."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, Any]]] = {}

    def keep_best(self, s: dict[str, Any], better: Callable[[dict[str, Any], dict[str, Any]], bool]) -> dict[str, Any]:
        key = str(s["concurrency"])
        best = self.data.setdefault(s["path"], {}).get(key)
        runs = (best["runs_tokens_per_s"] if best else []) + [round(s["tokens_per_s"] or 0.0, 2)]
        if best is None or better(s, best):
            best = s
        best["runs_tokens_per_s"] = runs
        self.data[s["path"]][key] = best
        return best

    def get(self, series: str) -> dict[str, Any] | None:
        levels = self.data.get(series) or {}
        return next(iter(levels.values()), None)


def higher_tps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["tokens_per_s"] or 0.0) > (b["tokens_per_s"] or 0.0)


def report_line(s: dict[str, Any], extra: str = "") -> None:
    print(f"  {s['path']:<24} c={s['concurrency']:<3} {fmt(s['tokens_per_s']):>9} tok/s  "
          f"({s['requests']} requests, {s['wall_s']:.1f}s, {fmt(s['mean_completion_tokens'])} tokens/request, "
          f"TTFT p50 {fmt(s['ttft_ms']['p50'])} ms, load {s['load_1m']['start']}->{s['load_1m']['end']}){extra}",
          flush=True)


# -- part 1: constrained vs free ----------------------------------------------------------------------
def grammar_checker(ctx: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """Whether an output's tokens are ones the schema's grammar accepts, in order (and, for an output
    that stopped, a complete value): a fresh llguidance matcher replays them. This covers outputs cut
    at max_tokens too, which cannot parse as JSON."""
    from engine.grammar import check_grammar, spec_from_response_format, to_grammar
    from engine.structured import compiler_for

    spec = spec_from_response_format(RESPONSE_FORMAT)
    assert spec is not None
    template = check_grammar(to_grammar(spec), compiler_for(ctx["tokenizer"], ctx["vocab_size"]).llg_tokenizer)
    eos = set(ctx["eos_ids"])

    def ok(rec: dict[str, Any]) -> bool:
        m = template.deep_copy()
        if not all(m.consume_token(t) for t in rec["ids"] if t not in eos):
            return False
        return rec["finish"] != "stop" or m.is_accepting() or m.is_stopped()

    return ok


def check_calls(rec: dict[str, Any]) -> bool:
    """A forced call that closed validates against its function's parameters (one cut at max_tokens is
    checked by the grammar replay only)."""
    from engine.tools import assemble

    if rec["finish"] != "tool_calls":
        return rec["finish"] == "length"
    calls = assemble(rec["calls"])
    try:
        values = [json.loads(call["arguments"]) for call in calls]
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:  # a GPU machine without it: the arguments parse, the grammar replay covers the rest
        return len(calls) == 1
    try:
        for value in values:
            jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return len(calls) == 1 and calls[0]["name"] == "publish_article"


def check_json(rec: dict[str, Any]) -> tuple[bool, bool | None]:
    """(parses as JSON, matches SCHEMA or None when jsonschema is not installed) for a finished output."""
    try:
        value = json.loads("".join(rec["text"]))
    except ValueError:
        return False, False
    try:
        import jsonschema
    except ImportError:
        return True, None
    try:
        jsonschema.validate(value, SCHEMA)
        return True, True
    except jsonschema.ValidationError:
        return True, False


async def part_constrained(args: argparse.Namespace, cfg, path: Path, ctx: dict[str, Any],
                           res: Results) -> dict[str, Any]:
    engine, load_s = await start_engine(cfg, path)
    remember(ctx, engine, path)
    prompts: Prompts = ctx["prompts"]
    bias, n = ctx["bias"], args.clients * args.requests_per_client
    print(f"constrained vs free: {args.clients} clients, {n} requests per side, {args.max_tokens} tokens each "
          f"(engine loaded in {load_s:.1f}s)", flush=True)
    checks = {"stop": 0, "length": 0, "invalid_json": 0, "schema_violations": 0, "schema_checked": True,
              "grammar_violations": 0, "outputs": 0}
    follows_grammar = grammar_checker(ctx)
    try:
        # warm-up outside timing: a full-width batch of both paths at once (the schema compiled too)
        warm_block = prompts.block(2 * args.clients)
        for side in ("free", "constrained"):
            await closed_loop(engine, mixed_work(side, warm_block, 8, bias, args.tool_share, ctx), args.clients, [])
        for rep in range(args.repeat):
            block = prompts.block(n)  # fresh prompts per repetition, the same for both sides: prefill work depends on them
            order = ("free", "constrained") if rep % 2 == 0 else ("constrained", "free")
            pair: dict[str, float] = {}
            for side in order:
                work = mixed_work(side, block, args.max_tokens, bias, args.tool_share, ctx)
                recs: list[dict[str, Any]] = []
                l0, t0 = load1(), time.perf_counter()
                await closed_loop(engine, work, args.clients, recs)
                s = summarize(side, args.clients, time.perf_counter() - t0, recs, (l0, load1()))
                pair[side] = s["tokens_per_s"] or 0.0
                note = ""
                if side == "constrained":
                    tool_recs = [r for r in recs if r["index"] in ctx["tool_indexes"]]
                    s["tool_requests"] = len(tool_recs)
                    s["tool_call_violations"] = sum(not check_calls(r) for r in tool_recs)
                    checks["tool_requests"] = checks.get("tool_requests", 0) + len(tool_recs)
                    checks["tool_call_violations"] = checks.get("tool_call_violations", 0) + s["tool_call_violations"]
                    checks["tool_calls_closed"] = checks.get("tool_calls_closed", 0) + sum(
                        r["finish"] == "tool_calls" for r in tool_recs)
                    recs = [r for r in recs if r["index"] not in ctx["tool_indexes"]]
                    stopped = [r for r in recs if r["finish"] == "stop"]
                    parsed = [check_json(r) for r in stopped]
                    s["json_checked"] = len(stopped)
                    s["grammar_violations"] = sum(not follows_grammar(r) for r in recs)
                    s["invalid_json"] = sum(not ok for ok, _ in parsed)
                    s["schema_violations"] = None if any(m is None for _, m in parsed) else sum(
                        ok and not m for ok, m in parsed)
                    checks["stop"] += len(stopped)
                    checks["length"] += sum(r["finish"] == "length" for r in recs)
                    checks["invalid_json"] += s["invalid_json"]
                    checks["grammar_violations"] += s["grammar_violations"]
                    checks["outputs"] += len(recs)
                    if s["schema_violations"] is None:
                        checks["schema_checked"] = False
                    else:
                        checks["schema_violations"] += s["schema_violations"]
                    note = (f", invalid JSON {s['invalid_json']} of {len(stopped)} that stopped, "
                            f"off-grammar {s['grammar_violations']} of {len(recs)}, tool calls invalid "
                            f"{s['tool_call_violations']} of {s['tool_requests']}")
                res.keep_best(s, higher_tps)
                report_line(s, note)
            checks.setdefault("ratio_per_repeat", []).append(ratio(pair["constrained"], pair["free"]))
    finally:
        await engine.shutdown(drain_timeout_s=5.0)
    return checks


def mixed_work(side: str, block: list[list[int]], max_tokens: int, bias: dict[int, float], tool_share: float,
               ctx: dict[str, Any]) -> list[tuple[int, Any]]:
    """One side's requests over ``block``: a ``tool_share`` of them chat requests with tools (forced calls on
    the constrained side, tool_choice none on the free side), the rest token prompts (with the JSON schema
    on the constrained side)."""
    every = round(1 / tool_share) if tool_share > 0 else 0
    ctx["tool_indexes"] = {i for i in range(len(block)) if every and i % every == every - 1}
    decode = ctx["tokenizer"].decode
    out = []
    for i, p in enumerate(block):
        if i in ctx["tool_indexes"]:
            out.append((i, tool_request(decode(p), max_tokens, bias, "required" if side == "constrained" else "none")))
        else:
            extra = {"response_format": RESPONSE_FORMAT} if side == "constrained" else {}
            out.append((i, request(p, max_tokens, bias, **extra)))
    return out


# -- part 2: prefix cache TTFT ------------------------------------------------------------------------
async def part_prefix(args: argparse.Namespace, path: Path, ctx: dict[str, Any], res: Results) -> dict[str, Any]:
    from engine.config import EngineConfig

    base = ctx["cfg_kwargs"]
    on_cfg = EngineConfig(**base)  # EngineConfig's prompt_cache_gb: the cache as a server runs it
    engines = {"prefix_cache_on": await start_engine(on_cfg, path),
               "prefix_cache_off": await start_engine(EngineConfig(**{**base, "prompt_cache_gb": 0}), path)}
    remember(ctx, engines["prefix_cache_on"][0], path)
    tok, prompts = ctx["tokenizer"], ctx["prompts"]
    bias, mt = ctx["bias"], args.prefix_max_tokens
    prefix = shared_prefix(tok, args.prefix_tokens)
    print(f"prefix cache: a shared prefix of {len(prefix)} tokens, {args.prefix_requests} requests one at a time "
          f"per engine after two priming requests, {mt} tokens each; cache {on_cfg.prompt_cache_gb} GB vs off",
          flush=True)
    recs: dict[str, list[dict[str, Any]]] = {k: [] for k in engines}
    loads: dict[str, list[float | None]] = {k: [] for k in engines}
    walls: dict[str, float] = {k: 0.0 for k in engines}
    seen: list[list[int]] = []
    shared: dict[int, int] = {}  # request index -> tokens it shares with an earlier prompt
    try:
        warm = prompts.block(2)  # warm-up without the prefix, then two priming requests with it (a miss, a hit)
        priming = [prefix + user_part(tok, i) for i in (0, 1)]
        for engine, _ in engines.values():
            await closed_loop(engine, [(i, request(p, 8, bias)) for i, p in enumerate(warm)], 1, [])
            for p in priming:
                await stream_into(engine, request(p, mt, bias), new_record(p))
        seen.extend(priming)
        idx = len(priming)
        for rep in range(args.repeat):
            batch = []
            for _ in range(args.prefix_requests):
                p = prefix + user_part(tok, idx)
                shared[idx] = max(common_prefix(p, q) for q in seen)
                seen.append(p)
                batch.append((idx, p))
                idx += 1
            order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
            for side in order:
                engine = engines[side][0]
                loads[side].append(load1())
                t0 = time.perf_counter()
                for i, p in batch:  # c=1: each request alone
                    rec = new_record(p, i)
                    recs[side].append(rec)
                    await stream_into(engine, request(p, mt, bias), rec)
                walls[side] += time.perf_counter() - t0
                loads[side].append(load1())
    finally:
        for engine, _ in engines.values():
            await engine.shutdown(drain_timeout_s=5.0)
    on_ids = {r["index"]: r["ids"] for r in recs["prefix_cache_on"]}
    same = sum(on_ids.get(r["index"]) == r["ids"] for r in recs["prefix_cache_off"])
    checks: dict[str, Any] = {"prefix_tokens": len(prefix), "shared_prefix_tokens_mean": mean(list(shared.values())),
                              "identical_outputs_on_vs_off": f"{same}/{len(recs['prefix_cache_off'])}"}
    for side, rs in recs.items():
        s = summarize(side, 1, walls[side], rs, (loads[side][0], loads[side][-1]))
        cached = [(r["usage"] or {}).get("cached_tokens", 0) for r in rs]
        s["cached_tokens_mean"] = mean(cached)
        s["prompt_tokens_mean"] = mean([r["prompt_tokens"] for r in rs])
        match = sum(c == shared[r["index"]] for c, r in zip(cached, rs, strict=True))
        s["cached_equals_shared_prefix"] = f"{match}/{len(rs)}"
        s["prompt_cache_gb"] = on_cfg.prompt_cache_gb if side == "prefix_cache_on" else 0
        s["engine_load_s"] = round(engines[side][1], 2)
        s["repeat"] = args.repeat
        res.data.setdefault(side, {})["1"] = s
        checks[f"{side}_cached_tokens_mean"] = s["cached_tokens_mean"]
        report_line(s, f", cached {fmt(s['cached_tokens_mean'])} of {fmt(s['prompt_tokens_mean'])} prompt tokens")
    print(f"  identical greedy outputs, cache on vs off: {checks['identical_outputs_on_vs_off']}", flush=True)
    return checks


# -- part 3: speculative requests beside the batch ----------------------------------------------------
async def spec_client(engine, prompt: list[int], max_tokens: int, bias: dict[int, float], num_draft: int | None,
                      out: list[dict[str, Any]]) -> None:
    """A speculative closed-loop client that runs until it is cancelled (at the end of its phase).

    Every request has the same prompt: a speculative sequence keeps caches of its exact length, and
    MLX's CUDA backend compiles kernels per shape, so the warm-up request compiles every shape the
    timed ones use (the steady state of a long-running server, not its first minutes)."""
    while True:
        p = list(prompt)
        rec = new_record(p)
        out.append(rec)
        await stream_into(engine, request(p, max_tokens, bias, num_draft_tokens=num_draft), rec)


async def part_speculative(args: argparse.Namespace, cfg, path: Path, draft: Path, ctx: dict[str, Any],
                           res: Results) -> dict[str, Any]:
    engine, load_s = await start_engine(cfg, path, draft)
    remember(ctx, engine, path)
    prompts: Prompts = ctx["prompts"]
    bias, n, k = ctx["bias"], args.clients * args.requests_per_client, args.spec_clients
    nd = args.num_draft_tokens  # None: the engine's default
    print(f"speculative beside the batch: {args.clients} batch clients ({n} requests per phase) alone, then with "
          f"{k} speculative clients (draft {draft}, {nd or cfg.num_draft_tokens} draft tokens per step); "
          f"{args.max_tokens} tokens per request (engine and draft loaded in {load_s:.1f}s)", flush=True)
    best_b: dict[str, dict[str, Any]] = {}
    try:
        # warm-up outside timing: a full-width batch and every speculative client, both lanes at once
        warm = prompts.block(args.clients + k)
        spec_prompt = prompts.one()
        await stream_into(engine, request(spec_prompt, args.max_tokens, bias, num_draft_tokens=nd), new_record(spec_prompt))
        await asyncio.gather(
            closed_loop(engine, [(i, request(p, 8, bias, num_draft_tokens=0)) for i, p in enumerate(warm[k:])],
                        args.clients, []),
            closed_loop(engine, [(i, request(p, 8, bias, num_draft_tokens=nd)) for i, p in enumerate(warm[:k])], k, []))
        for rep in range(args.repeat):
            block = prompts.block(n)  # the same batch prompts in both phases
            order = (("batch_alone", "batch_with_speculative") if rep % 2 == 0
                     else ("batch_with_speculative", "batch_alone"))
            for side in order:
                work = [(i, request(p, args.max_tokens, bias, num_draft_tokens=0)) for i, p in enumerate(block)]
                recs: list[dict[str, Any]] = []
                spec: list[dict[str, Any]] = []
                spec_tasks: list[asyncio.Task] = []
                l0, t0 = load1(), time.perf_counter()
                if side == "batch_with_speculative":
                    spec_tasks = [asyncio.create_task(spec_client(engine, spec_prompt, args.max_tokens, bias, nd, spec))
                                  for _ in range(k)]
                await closed_loop(engine, work, args.clients, recs)
                wall = time.perf_counter() - t0
                for t in spec_tasks:  # the phase ends with the batch: cut the speculative requests still running
                    t.cancel()
                await asyncio.gather(*spec_tasks, return_exceptions=True)
                load = (l0, load1())
                s = summarize(side, args.clients, wall, recs, load)
                better = higher_tps(s, res.get(side) or {"tokens_per_s": None})
                res.keep_best(s, higher_tps)
                note = ""
                if spec_tasks:
                    sp = summarize("speculative", k, wall, spec, load)
                    usages = [r["usage"] for r in spec if r["usage"]]
                    drafted = sum(u.get("draft_tokens") or 0 for u in usages)
                    accepted = sum(u.get("accepted_draft_tokens") or 0 for u in usages)
                    sp["draft_tokens"], sp["accepted_draft_tokens"] = drafted, accepted
                    sp["acceptance_rate"] = round(accepted / drafted, 4) if drafted else None
                    sp["num_draft_tokens"] = nd or cfg.num_draft_tokens
                    sp["draft"] = str(draft)
                    sp["note"] = ("tokens_per_s counts every token the speculative clients received while the batch "
                                  "ran (requests cut at its end included); per-request figures use finished requests")
                    if better:  # keep the speculative figures of the phase-B run that is kept
                        best_b["speculative"] = sp
                    note = (f"; speculative: {fmt(sp['tokens_per_s'])} tok/s, {sp['requests']} finished, "
                            f"acceptance {fmt(sp['acceptance_rate'], 3)}")
                report_line(s, note)
    finally:
        await engine.shutdown(drain_timeout_s=5.0)
    if "speculative" in best_b:
        res.data["speculative"] = {str(k): best_b["speculative"]}
    sp = best_b.get("speculative") or {}
    return {"acceptance_rate": sp.get("acceptance_rate"), "speculative_requests_finished": sp.get("requests"),
            "draft": str(draft), "self_draft": draft.resolve() == path.resolve()}


# -- main ---------------------------------------------------------------------------------------------
async def run_parts(args: argparse.Namespace, path: Path, draft: Path, ctx: dict[str, Any],
                    res: Results) -> dict[str, Any]:
    from engine.config import EngineConfig

    checks: dict[str, Any] = {}
    base = ctx["cfg_kwargs"]
    # Parts 1 and 3 give both sides of a comparison the same prompts (prefill cost depends on them, padding
    # included), so their engines run without a prompt cache: the second side must not reuse the first's.
    no_cache = {**base, "prompt_cache_gb": 0}
    if "constrained" in args.parts:
        checks["constrained"] = await part_constrained(args, EngineConfig(**no_cache), path, ctx, res)
    if "prefix" in args.parts:
        checks["prefix"] = await part_prefix(args, path, ctx, res)
    if "speculative" in args.parts:
        cfg = EngineConfig(**{**no_cache, "max_speculative": max(EngineConfig().max_speculative, args.spec_clients)})
        checks["speculative"] = await part_speculative(args, cfg, path, draft, ctx, res)
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_openblas(disabled=args.no_openblas)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.config import EngineConfig

    t_start = time.perf_counter()
    blas = blas_description()
    print(f"BLAS: {blas}", flush=True)
    path = ensure_model(args.model, args.model_dir, args.preset)
    draft = Path(args.draft).expanduser().resolve() if args.draft else path
    if not draft.exists():
        raise SystemExit(f"--draft {args.draft}: no such directory")
    if args.num_draft_tokens and args.num_draft_tokens > EngineConfig().max_draft_tokens:
        raise SystemExit(f"--num-draft-tokens may be at most {EngineConfig().max_draft_tokens}")
    cfg_kwargs: dict[str, Any] = {}
    if EngineConfig().max_batch_size < args.clients:
        cfg_kwargs["max_batch_size"] = args.clients
    cfg = EngineConfig(**cfg_kwargs)
    ctx: dict[str, Any] = {"cfg_kwargs": cfg_kwargs}
    res = Results()
    checks = asyncio.run(run_parts(args, path, draft, ctx, res))
    model_info, eos_ids = ctx["model_info"], ctx["eos_ids"]
    runtime = time.perf_counter() - t_start

    # -- report -----------------------------------------------------------------------------------
    get = res.get
    c = args.clients
    labels = {"free": "free (greedy)", "constrained": "constrained (json_schema, tools)",
              "prefix_cache_on": "prefix cache on", "prefix_cache_off": "prefix cache off",
              "batch_alone": "batch clients alone", "batch_with_speculative": "batch clients + speculative",
              "speculative": "speculative clients"}
    rows = []
    for series, label in labels.items():
        s = get(series)
        if s is None:
            continue
        detail = ", ".join(f"{k} {v}" for k, v in sorted(s["finish_reasons"].items()))
        if series == "constrained":
            detail += (f"; invalid JSON {s['invalid_json']}/{s['json_checked']} stopped, off-grammar "
                       f"{s['grammar_violations']}/{s['requests'] - s['tool_requests']}, invalid calls "
                       f"{s['tool_call_violations']}/{s['tool_requests']}")
        elif series.startswith("prefix"):
            detail = f"cached {fmt(s['cached_tokens_mean'])} of {fmt(s['prompt_tokens_mean'])}"
        elif series == "speculative":
            detail = f"acceptance {fmt(s['acceptance_rate'], 3)}; {s['unfinished_requests']} cut at phase end"
        rows.append([label, s["concurrency"], s["requests"], s["mean_completion_tokens"], s["tokens_per_s"],
                     s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["tpot_ms"]["mean"],
                     s["decode_tokens_per_s_per_request"], detail])
    print()
    print(f"BLAS: {blas}   model: {model_info['name']} {model_info['params'] / 1e6:.1f}M {model_info['dtype']}   "
          f"max_tokens: {args.max_tokens} (prefix part: {args.prefix_max_tokens})   repeat: {args.repeat}")
    table = print_table(["series", "clients", "requests", "tok/req", "tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                         "TPOT ms", "tok/s/req", "detail"], rows)

    def tps(series: str) -> float | None:
        s = get(series)
        return s["tokens_per_s"] if s else None

    def per_request(series: str) -> float | None:
        s = get(series)
        return s["decode_tokens_per_s_per_request"] if s else None

    on, off = get("prefix_cache_on"), get("prefix_cache_off")
    per_repeat = [r for r in checks.get("constrained", {}).get("ratio_per_repeat", []) if r is not None]
    ratios: dict[str, float | None] = {
        f"constrained_vs_free_c{c}": statistics.median(per_repeat) if per_repeat else None,
        "prefix_cache_ttft_speedup": ratio(off["ttft_ms"]["p50"], on["ttft_ms"]["p50"]) if on and off else None,
        "batch_tps_with_speculative_vs_alone": ratio(tps("batch_with_speculative"), tps("batch_alone")),
        "spec_request_tps_vs_batch_request_tps": ratio(per_request("speculative"),
                                                       per_request("batch_with_speculative")),
    }
    targets = {f"constrained_vs_free_c{c}": {"target": TARGETS["constrained_vs_free"],
                                             "value": ratios[f"constrained_vs_free_c{c}"]}}
    for t in targets.values():
        t["met"] = None if t["value"] is None else t["value"] >= t["target"]
    print()
    for k, v in ratios.items():
        if v is not None:
            print(f"{k:40s} {v:7.3f}")
    if per_repeat:
        print(f"constrained / free per repetition (median judged): {', '.join(f'{r:.3f}' for r in per_repeat)}; "
              f"min {min(per_repeat):.3f}, max {max(per_repeat):.3f}")
    for k, t in targets.items():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"target {k:33s} >= {t['target']:<4} {state}")
    if "constrained" in checks:
        ch = checks["constrained"]
        print(f"tool calls: {ch.get('tool_requests', 0)} forced, {ch.get('tool_calls_closed', 0)} closed, "
              f"{ch.get('tool_call_violations', 0)} invalid (a call cut at max_tokens is not checked)")
        print(f"constrained outputs: {ch['stop']} stopped ({ch['invalid_json']} invalid JSON, "
              f"{ch['schema_violations'] if ch['schema_checked'] else 'unchecked'} schema violations), "
              f"{ch['length']} cut at max_tokens; {ch['grammar_violations']} of {ch['outputs']} outputs off the "
              "schema's grammar")
    if "prefix" in checks:
        ch = checks["prefix"]
        on_c, off_c = ch.get("prefix_cache_on_cached_tokens_mean"), ch.get("prefix_cache_off_cached_tokens_mean")
        print(f"prefix cache: prefix {ch['prefix_tokens']} tokens, cached tokens per request {fmt(on_c)} on / "
              f"{fmt(off_c)} off; identical greedy outputs {ch['identical_outputs_on_vs_off']}")
    if "speculative" in checks:
        ch = checks["speculative"]
        print(f"speculative: acceptance {fmt(ch['acceptance_rate'], 3)} "
              f"({'self-draft: should be 1.0' if ch['self_draft'] else 'draft ' + ch['draft']})")
    loads = [x for v in res.data.values() for s in v.values() for x in s["load_1m"].values() if x is not None]
    cores = os.cpu_count() or 1
    busy = max(loads, default=0.0)
    if busy > cores:
        print(f"NOTE: the machine was shared (1-minute load average up to {busy:.1f} on {cores} cores): absolute "
              "figures are depressed and noisy; use --repeat.")
    print(f"runtime: {runtime:.1f}s")

    if args.json:
        settings = {
            "parts": args.parts,
            "clients": c,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "prefix_tokens": args.prefix_tokens,
            "prefix_requests": args.prefix_requests,
            "prefix_max_tokens": args.prefix_max_tokens,
            "spec_clients": args.spec_clients,
            "num_draft_tokens": args.num_draft_tokens or cfg.num_draft_tokens,
            "draft": str(draft),
            "response_format": RESPONSE_FORMAT,
            "tools": TOOLS,
            "tool_share": args.tool_share,
            "constrained_ratio": "per repetition, constrained / free aggregate tokens/s of the same block; the median "
                                 "of the repetitions is reported (checks.constrained.ratio_per_repeat has them all)",
            "sampling": "greedy (temperature 0)",
            "eos_suppression": f"logit_bias -100 on EOS ids {eos_ids} for every request (constrained ones still "
                               "end when their JSON closes: the grammar then allows only EOS)",
            "closed_loop": "each client sends its next request when its previous one finishes",
            "prompts": "numbered corpus prompts (1-10 sentences), a new block per repetition, the same block for "
                       "both sides of a comparison; the prefix part: one shared prefix plus a short user part "
                       "per request",
            "warmup": "before timing, each part runs 8-token requests: a full-width batch of both paths (constrained), "
                      "the batch plus every speculative client (speculative), two short ones and the priming "
                      "request per engine (prefix)",
            "repeat": args.repeat,
            "order": "the two sides of each comparison alternate between repetitions; throughput parts keep the "
                     "best run per side, the prefix part pools its TTFT samples",
            "max_batch_size": cfg.max_batch_size,
            "prefill_batch_size": cfg.prefill_batch_size,
            "admission_window_ms": getattr(cfg, "admission_window_ms", None),
            "prompt_cache_gb": {"constrained": 0, "prefix": {"on": cfg.prompt_cache_gb, "off": 0},
                                "speculative": 0},
            "prompt_cache_note": "off in the constrained and speculative parts, whose two sides get the same prompts",
            "quick": args.quick,
            "blas": blas,
            "runtime_s": round(runtime, 1),
        }
        doc = {
            "benchmark": "bench_features",
            "machine": {**machine_info(), "load_1m_max_during_run": busy},
            "model": model_info,
            "settings": settings,
            "results": res.data,
            "ratios": ratios,
            "targets": targets,
            "checks": checks,
            "table": table,
        }
        print(f"wrote {write_json(args.json, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
