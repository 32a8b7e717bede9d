"""What three engine features cost or save, each against its own baseline in the same run.

All parts run in-process through ``engine.engine.Engine`` on the same model (default: the bench demo
model), with closed-loop asyncio clients (each sends its next request when its previous one ends):

  constrained  ``--clients`` clients of constrained generation against the same number of free
               ones (one engine): what structured output costs in aggregate tokens/s. A
               ``--tool-share`` of the requests are forced tool calls (their free twins offer the
               same tools with tool_choice none), the rest carry a JSON-schema ``response_format``.
               The schema closes (bounded strings, a bounded array, an enum, a bounded integer), so
               every constrained output ends well inside ``--constrained-max-tokens``; each must end
               by itself, parse, validate against the schema and replay through its grammar. A free
               request generates as many tokens as the constrained requests of its kind did in the
               warm-up (mean, rounded), so both sides do the same work per request.
  prefix       one request at a time, each a shared ~1,000-token system prefix plus a user part of
               its own (all of one length), after two priming requests (a cache miss, then a hit); one
               engine with the prompt (prefix) cache on (EngineConfig's size) and one with it off:
               what the cache saves in TTFT, and that it changes no greedy output.
  speculative  an engine with a draft model (default: the target's own weights, so every draft token
               is accepted): ``--clients`` batch clients alone (phase A), then the same with
               ``--spec-clients`` speculative clients running beside them all the time (phase B): what
               speculative requests cost the batch, and how fast they run themselves.

Statistics (docs/benchmarks.md): each part warms up with ``--warmup-requests`` requests per client of
every kind it times; then each pair runs ``--repeat`` times (default 5), interleaved, its order
alternating (A B, B A, ...). A phase lasts until every client has sent ``--requests-per-client``
requests and, on a GPU, ``--min-phase-s`` (20 s) have passed (never past 3x that). Every phase has
prompts no other phase had (the prefix part: user parts no earlier request of that engine had; both
engines get the same ones). A phase with a failed request, a short output or an invalid constrained
output is void: kept with its errors in ``phases``, and its repetition gives no ratio. The ratios are
per repetition; ``ratios`` holds their medians and ``spread`` their median, min, max and values.

Free, batch and speculative requests are greedy with EOS biased by -100, so they generate exactly their
``max_tokens``; constrained requests use the same sampling (the grammar ends them when the JSON closes).
The constrained and speculative engines run without a prompt cache.

Ratios (JSON ``ratios``): ``constrained_vs_free_c16`` (aggregate tokens/s, target >= 0.8; the suffix is
``--clients``), ``prefix_cache_ttft_speedup`` (TTFT p50 off / on), ``batch_tps_with_speculative_vs_alone``
(the batch clients' aggregate tokens/s, phase B / A) and ``spec_request_tps_vs_batch_request_tps`` (mean
per-request decode rate, (tokens - 1) / (last token - first token), of a speculative request over a
batch request in phase B).

On Linux the script re-executes itself with OpenBLAS preloaded when MLX would use its reference
BLAS (``--no-openblas`` to skip), as bench_engine.py does.

    python loadtests/bench_features.py                         # bench model, all three parts
    python loadtests/bench_features.py --quick                 # tiny model, 2 repetitions, a smoke run
    python loadtests/bench_features.py --parts prefix --json out.json
    python loadtests/bench_features.py --model /tmp/m1b --draft /tmp/m1b-draft --spec-clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``loadtests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import (  # noqa: E402
    FreshPrompts, PhaseBudget, blas_description, corpus_sentences, default_min_phase_s, ensure_model, fmt,
    machine_info, model_description, percentile, print_spread, print_table, reexec_with_openblas, spread, write_json,
)
from loadtests.json_subset import validate  # noqa: E402

PARTS = ("constrained", "prefix", "speculative")
TARGETS = {"constrained_vs_free": 0.8}
NAME = "bench"  # the model's name inside each engine
ERRORS_KEPT = 5  # per phase, in the JSON
# A schema whose outputs close: ASCII-only bounded strings (1 byte per character), an enum, a bounded
# integer and a bounded array of bounded strings, every key required and no other allowed. Its longest
# value, as the engine's grammar writes it (", " and ": " separators), is WIDEST: 89 bytes, so at most 89
# tokens plus a tool call's wrapper.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 12, "pattern": "^[a-z ]+$"},
        "category": {"enum": ["news", "sport", "tech"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 6, "pattern": "^[a-z]+$"},
                 "minItems": 1, "maxItems": 2},
    },
    "required": ["title", "category", "rating", "tags"],
    "additionalProperties": False,
}
WIDEST = {"title": "a" * 12, "category": "sport", "rating": 5, "tags": ["a" * 6, "a" * 6]}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "article", "schema": SCHEMA}}
# Tool calls in the mix: the same schema as a function's parameters. The constrained side forces a call
# (tool_choice required); its free counterpart gets the same messages and tools with tool_choice none.
TOOLS = [{"type": "function", "function": {"name": "publish_article", "description": "Publish an article.",
                                           "parameters": SCHEMA}}]
SPEC_PROMPT_TOKENS = 40  # every speculative prompt has this length: CUDA kernels compile per shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local mlx-lm model directory (default: the bench demo model)")
    p.add_argument("--model-dir", help="where the demo model is built/found "
                   "(default ~/.cache/mlx-serving/models/demo-bench, or demo-tiny with --quick)")
    p.add_argument("--draft", help="the draft model directory for the speculative part; it must share the "
                   "target's tokenizer (default: the target's own directory, so acceptance is 100%%)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--clients", type=int,
                   help="closed-loop clients per side of the constrained part and batch clients of the speculative "
                        "part (default 16; --quick 8)")
    p.add_argument("--requests-per-client", type=int, default=3,
                   help="fewest requests each client sends per phase (default 3)")
    p.add_argument("--min-phase-s", type=float,
                   help="fewest seconds per phase; clients stop at 3x this whatever happens "
                        "(default 20 on a GPU, 0 on the CPU and with --quick)")
    p.add_argument("--warmup-requests", type=int, default=2,
                   help="warm-up requests per client of every kind a part times (default 2)")
    p.add_argument("--max-tokens", type=int,
                   help="generated tokens per request of the speculative part (default 128; --quick: 24)")
    p.add_argument("--constrained-max-tokens", type=int, default=256,
                   help="max_tokens of a constrained request: a cap above the schema's longest output (256)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="length of the shared prefix in tokens (1000)")
    p.add_argument("--prefix-requests", type=int,
                   help="fewest timed requests per engine and repetition (default 8; --quick: 4)")
    p.add_argument("--prefix-max-tokens", type=int, help="generated tokens per prefix request (default 16; --quick: 8)")
    p.add_argument("--spec-clients", type=int, default=2, help="speculative clients in phase B (2)")
    p.add_argument("--num-draft-tokens", type=int,
                   help="draft tokens per verify step of the speculative requests (default: EngineConfig's)")
    p.add_argument("--tool-share", type=float, default=0.5,
                   help="share of the constrained part's requests that are tool calls (0.5: every other one)")
    p.add_argument("--repeat", "--repeats", dest="repeat", type=int,
                   help="repetitions of each comparison, its two sides' order alternating (default 5; --quick 2)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 8 clients, 2 repetitions, 24 tokens")
    p.add_argument("--no-openblas", action="store_true", help="do not re-execute with OpenBLAS preloaded")
    a = p.parse_args(argv)
    q = a.quick
    a.preset = "tiny" if q else "bench"
    a.clients = a.clients or (8 if q else 16)
    a.max_tokens = a.max_tokens or (24 if q else 128)
    a.prefix_requests = a.prefix_requests or (4 if q else 8)
    a.prefix_max_tokens = a.prefix_max_tokens or (8 if q else 16)
    a.repeat = a.repeat or (2 if q else 5)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad or not a.parts:
        p.error(f"unknown part(s) {bad}; choose from {PARTS}")
    if min(a.clients, a.requests_per_client, a.prefix_requests, a.spec_clients, a.repeat, a.prefix_tokens) < 1:
        p.error("counts must be positive")
    if a.warmup_requests < 1:
        p.error("--warmup-requests must be at least 1 (the constrained part calibrates its free side on it)")
    if a.constrained_max_tokens < len(json.dumps(WIDEST, separators=(", ", ": "))):
        p.error("--constrained-max-tokens must hold the schema's longest output")
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
    """Token prompts that no other request of the run has had, drawn one at a time: each phase opens
    a range of ``make_prompts`` (``FreshPrompts``), so every phase gets the same mix of lengths."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts = FreshPrompts()
        self.filler = " " + " ".join(corpus_sentences()[:40])

    def phase(self) -> None:
        self.texts.phase()

    def take(self) -> list[int]:
        return list(self.tokenizer.encode(self.texts.take()))

    def fixed(self, n: int) -> list[int]:
        """A fresh prompt of exactly ``n`` tokens (its text, then corpus filler)."""
        ids = list(self.tokenizer.encode(self.texts.take() + self.filler))[:n]
        assert len(ids) == n, "the filler is too short"
        return ids

    def used(self) -> list[int]:
        return self.texts.used()


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


def new_record(req: Any, index: int = -1, kind: str = "text") -> dict[str, Any]:
    return {"index": index, "kind": kind, "max_tokens": req.sampling.max_tokens,
            "prompt_tokens": len(req.prompt_token_ids or []), "start": None, "first": None, "end": None,
            "tokens": 0, "ids": [], "text": [], "calls": [], "finish": None, "usage": None, "error": None}


async def stream_into(engine, req, rec: dict[str, Any]) -> dict[str, Any]:
    """Stream one request into ``rec`` as it goes, so a cancelled request still shows its tokens; a
    failure is the record's ``error`` (it voids the phase)."""
    rec["start"] = time.perf_counter()
    try:
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
    except Exception as e:  # noqa: BLE001 - any failure voids the phase
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end"] = time.perf_counter()
    return rec


Make = Callable[[int], tuple[str, Any]]  # request index in the phase -> (kind, request)


async def closed_loop(engine, make: Make, clients: int, budget: PhaseBudget, done: list[dict[str, Any]]) -> None:
    """``clients`` consumers; each sends its next request (``make(i)``, ``i`` counting the phase's
    requests) when its previous one ends, while ``budget`` lets it."""
    counter = itertools.count()

    async def client() -> None:
        sent = 0
        while budget.more(sent):
            i = next(counter)
            kind, req = make(i)
            rec = new_record(req, i, kind)
            done.append(rec)
            await stream_into(engine, req, rec)
            sent += 1

    await asyncio.gather(*(client() for _ in range(clients)))


def exact_length(rec: dict[str, Any]) -> str | None:
    """Why a free (EOS-banned) request's output is wrong, or None: it must run to its max_tokens."""
    if rec["error"]:
        return rec["error"]
    if rec["tokens"] != rec["max_tokens"]:
        return f"short output: {rec['tokens']} of {rec['max_tokens']} tokens (finish {rec['finish']})"
    return None


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


def judged(s: dict[str, Any], problems: list[str], rep: int | None) -> dict[str, Any]:
    """Mark a phase void when anything in it went wrong, keeping the first few reasons."""
    s.update(repetition=rep, void=bool(problems), errors=len(problems), error_list=problems[:ERRORS_KEPT])
    return s


class Runs:
    """Every phase of the run (``phases`` in the JSON) and, per series, the median valid one in the
    shape report.py reads (``{series: {clients: summary}}``, bench_engine's)."""

    def __init__(self) -> None:
        self.phases: list[dict[str, Any]] = []
        self.warmup: list[dict[str, Any]] = []

    def add(self, s: dict[str, Any]) -> dict[str, Any]:
        (self.warmup if s["repetition"] is None else self.phases).append(s)
        return s

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for series in dict.fromkeys(p["path"] for p in self.phases):
            runs = [p for p in self.phases if p["path"] == series]
            by_ttft = series.startswith("prefix")  # the prefix part is about TTFT, not throughput
            valid = sorted((p for p in runs if not p["void"]),
                           key=lambda p: (p["ttft_ms"]["p50"] if by_ttft else p["tokens_per_s"]) or 0.0)
            if valid:
                out[series] = {str(valid[0]["concurrency"]): {
                    **valid[len(valid) // 2], "runs_tokens_per_s": [round(p["tokens_per_s"] or 0.0, 2) for p in runs],
                    "void_runs": len(runs) - len(valid)}}
        return out


def report_line(s: dict[str, Any], extra: str = "") -> None:
    rep = "warm-up" if s["repetition"] is None else f"rep {s['repetition']}"
    void = f"  VOID: {s['error_list'][0]}" if s["void"] else ""
    print(f"  {rep:<8} {s['path']:<24} c={s['concurrency']:<3} {fmt(s['tokens_per_s']):>9} tok/s  "
          f"({s['requests']} requests, {s['wall_s']:.1f}s, {fmt(s['mean_completion_tokens'])} tokens/request, "
          f"TTFT p50 {fmt(s['ttft_ms']['p50'])} ms){extra}{void}", flush=True)


def tps_of(s: dict[str, Any] | None) -> float | None:
    return None if s is None or s["void"] else s["tokens_per_s"]


# -- part 1: constrained vs free ----------------------------------------------------------------------
def grammar_checker(ctx: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """Whether an output's tokens are ones the schema's grammar accepts, in order, ending in a complete
    value: a fresh llguidance matcher replays them (the engine's own grammar, independent of the parse)."""
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
        return m.is_accepting() or m.is_stopped()

    return ok


def check_value(text: str) -> str | None:
    """Why ``text`` is not a JSON value valid for SCHEMA, or None."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"invalid JSON ({e}): {text[:80]!r}"
    errors = validate(value, SCHEMA)
    return f"schema: {'; '.join(errors[:3])}" if errors else None


def check_constrained(rec: dict[str, Any], follows_grammar: Callable[[dict[str, Any]], bool]) -> str | None:
    """Why a constrained output is invalid, or None. It must have closed by itself (finish ``stop``, or
    ``tool_calls`` for a forced call) and its JSON must parse and validate."""
    from engine.tools import assemble

    if rec["error"]:
        return rec["error"]
    if rec["kind"] == "tool":
        if rec["finish"] != "tool_calls":
            return f"tool call did not close: finish {rec['finish']} after {rec['tokens']} tokens"
        calls = assemble(rec["calls"])
        if len(calls) != 1 or calls[0]["name"] != "publish_article":
            return f"expected one call of publish_article, got {[c['name'] for c in calls]}"
        return check_value(calls[0]["arguments"])
    if rec["finish"] != "stop":
        return f"did not close: finish {rec['finish']} after {rec['tokens']} tokens"
    return check_value("".join(rec["text"])) or (None if follows_grammar(rec) else "off the schema's grammar")


def constrained_maker(side: str, args: argparse.Namespace, ctx: dict[str, Any], free_tokens: dict[str, int]) -> Make:
    """One side's requests, each on a fresh prompt: a ``tool_share`` of chat requests with tools (forced
    calls on the constrained side, tool_choice none on the free side), the rest token prompts (with the
    JSON schema on the constrained side). Free requests run to ``free_tokens[kind]``."""
    every = round(1 / args.tool_share) if args.tool_share > 0 else 0
    prompts: Prompts = ctx["prompts"]
    bias, decode = ctx["bias"], ctx["tokenizer"].decode
    constrained = side == "constrained"

    def make(i: int) -> tuple[str, Any]:
        p = prompts.take()
        kind = "tool" if every and i % every == every - 1 else "json"
        mt = args.constrained_max_tokens if constrained else free_tokens[kind]
        if kind == "tool":
            return kind, tool_request(decode(p), mt, bias, "required" if constrained else "none")
        return kind, request(p, mt, bias, **({"response_format": RESPONSE_FORMAT} if constrained else {}))

    return make


async def part_constrained(args: argparse.Namespace, cfg, path: Path, ctx: dict[str, Any], runs: Runs,
                           min_s: float) -> dict[str, Any]:
    engine, load_s = await start_engine(cfg, path)
    remember(ctx, engine, path)
    prompts: Prompts = ctx["prompts"]
    follows_grammar = grammar_checker(ctx)
    print(f"constrained vs free: {args.clients} clients per side (engine loaded in {load_s:.1f}s)", flush=True)
    checks: dict[str, Any] = {"outputs": 0, "invalid": 0, "finish_reasons": Counter()}
    free_tokens = {"json": args.constrained_max_tokens, "tool": args.constrained_max_tokens}

    async def one(side: str, rep: int | None, per_client: int, phase_s: float) -> dict[str, Any]:
        recs: list[dict[str, Any]] = []
        prompts.phase()
        l0, t0 = load1(), time.perf_counter()
        await closed_loop(engine, constrained_maker(side, args, ctx, free_tokens), args.clients,
                          PhaseBudget(per_client, phase_s), recs)
        s = summarize(side, args.clients, time.perf_counter() - t0, recs, (l0, load1()))
        s["prompts"] = prompts.used()
        s["mean_tokens_by_kind"] = {k: mean([r["tokens"] for r in recs if r["kind"] == k])
                                    for k in sorted({r["kind"] for r in recs})}
        if side == "constrained":
            reasons = [check_constrained(r, follows_grammar) for r in recs]
            problems = [x for x in reasons if x]
            s["invalid_outputs"] = len(problems)
            s["tool_requests"] = sum(r["kind"] == "tool" for r in recs)
            if rep is not None:
                checks["outputs"] += len(recs)
                checks["invalid"] += len(problems)
                checks["finish_reasons"].update(str(r["finish"]) for r in recs)
        else:
            problems = [x for x in map(exact_length, recs) if x]
        runs.add(judged(s, problems, rep))
        report_line(s, f", invalid {s['invalid_outputs']} of {len(recs)}" if side == "constrained" else "")
        return s

    per_rep: list[float | None] = []
    try:
        # warm-up of both sides; the constrained one first: its closed outputs' mean length per kind is
        # what each free request then generates (the same work per request on both sides)
        w = await one("constrained", None, args.warmup_requests, 0.0)
        for kind, n in w["mean_tokens_by_kind"].items():
            free_tokens[kind] = max(1, round(n))
        await one("free", None, args.warmup_requests, 0.0)
        for rep in range(args.repeat):
            pair = {}
            for side in (("free", "constrained") if rep % 2 == 0 else ("constrained", "free")):
                pair[side] = await one(side, rep, args.requests_per_client, min_s)
            per_rep.append(ratio(tps_of(pair["constrained"]), tps_of(pair["free"])))
    finally:
        await engine.shutdown(drain_timeout_s=5.0)
    checks["finish_reasons"] = dict(checks["finish_reasons"])
    checks["free_max_tokens"] = free_tokens
    checks["schema_longest_output_bytes"] = len(json.dumps(WIDEST, separators=(", ", ": ")))
    return {"checks": checks, "per_rep": {f"constrained_vs_free_c{args.clients}": per_rep}}


# -- part 2: prefix cache TTFT ------------------------------------------------------------------------
async def part_prefix(args: argparse.Namespace, path: Path, ctx: dict[str, Any], runs: Runs,
                      min_s: float) -> dict[str, Any]:
    from engine.config import EngineConfig

    base = ctx["cfg_kwargs"]
    on_cfg = EngineConfig(**base)  # EngineConfig's prompt_cache_gb: the cache as a server runs it
    engines = {"prefix_cache_on": await start_engine(on_cfg, path),
               "prefix_cache_off": await start_engine(EngineConfig(**{**base, "prompt_cache_gb": 0}), path)}
    remember(ctx, engines["prefix_cache_on"][0], path)
    tok, prompts = ctx["tokenizer"], ctx["prompts"]
    bias, mt = ctx["bias"], args.prefix_max_tokens
    prefix = shared_prefix(tok, args.prefix_tokens)
    print(f"prefix cache: a shared prefix of {len(prefix)} tokens, requests one at a time per engine after two "
          f"priming requests, {mt} tokens each; cache {on_cfg.prompt_cache_gb} GB vs off", flush=True)
    ids: dict[str, dict[int, list[int]]] = {k: {} for k in engines}
    cached: dict[str, list[tuple[int, int]]] = {k: [] for k in engines}
    seen: list[list[int]] = []
    shared: dict[int, int] = {}  # request index -> tokens it shares with an earlier prompt
    per_rep: list[float | None] = []
    try:
        priming = [prefix + user_part(tok, i) for i in (0, 1)]  # a miss, then a hit
        for side, (engine, _) in engines.items():  # the same warm-up for both engines
            prompts.phase()
            warm: list[dict[str, Any]] = []
            await closed_loop(engine, lambda i: ("text", request(prompts.take(), 8, bias)), 1,
                              PhaseBudget(args.warmup_requests), warm)
            for p in priming:
                req = request(p, mt, bias)
                warm.append(await stream_into(engine, req, new_record(req)))
            s = summarize(side, 1, 0.0, warm, (None, None))
            runs.add(judged(s, [x for x in (r["error"] for r in warm) if x], None))
        seen.extend(priming)
        parts: list[tuple[int, list[int]]] = []  # this repetition's user parts: both engines get the same ones
        nxt = itertools.count(len(priming))

        def part(j: int) -> tuple[int, list[int]]:
            while len(parts) <= j:
                idx = next(nxt)
                p = prefix + user_part(tok, idx)
                shared[idx] = max(common_prefix(p, q) for q in seen)
                seen.append(p)
                parts.append((idx, p))
            return parts[j]

        for rep in range(args.repeat):
            parts.clear()
            ttft: dict[str, float | None] = {}
            for side in (list(engines) if rep % 2 == 0 else list(engines)[::-1]):
                engine = engines[side][0]
                recs: list[dict[str, Any]] = []
                l0, t0 = load1(), time.perf_counter()

                def make(j: int) -> tuple[str, Any]:
                    idx, p = part(j)
                    return "text", request(p, mt, bias)

                await closed_loop(engine, make, 1, PhaseBudget(args.prefix_requests, min_s), recs)  # c=1
                s = summarize(side, 1, time.perf_counter() - t0, recs, (l0, load1()))
                for r in recs:
                    idx = parts[r["index"]][0]
                    ids[side][idx] = r["ids"]
                    cached[side].append((idx, (r["usage"] or {}).get("cached_tokens", 0)))
                s["user_parts"] = [parts[0][0], parts[len(recs) - 1][0] + 1] if recs else []
                s["cached_tokens_mean"] = mean([(r["usage"] or {}).get("cached_tokens", 0) for r in recs])
                s["prompt_tokens_mean"] = mean([r["prompt_tokens"] for r in recs])
                s["prompt_cache_gb"] = on_cfg.prompt_cache_gb if side == "prefix_cache_on" else 0
                runs.add(judged(s, [x for x in map(exact_length, recs) if x], rep))
                ttft[side] = None if s["void"] else s["ttft_ms"]["p50"]
                report_line(s, f", cached {fmt(s['cached_tokens_mean'])} of {fmt(s['prompt_tokens_mean'])} prompt tokens")
            per_rep.append(ratio(ttft["prefix_cache_off"], ttft["prefix_cache_on"]))
    finally:
        for engine, _ in engines.values():
            await engine.shutdown(drain_timeout_s=5.0)
    common = set(ids["prefix_cache_on"]) & set(ids["prefix_cache_off"])
    same = sum(ids["prefix_cache_on"][i] == ids["prefix_cache_off"][i] for i in common)
    checks: dict[str, Any] = {
        "prefix_tokens": len(prefix), "shared_prefix_tokens_mean": mean([shared[i] for i, _ in cached["prefix_cache_on"]]),
        "identical_outputs_on_vs_off": f"{same}/{len(common)}",
        "cached_equals_shared_prefix_on": f"{sum(c == shared[i] for i, c in cached['prefix_cache_on'])}/"
                                          f"{len(cached['prefix_cache_on'])}",
        "cached_tokens_off": sum(c for _, c in cached["prefix_cache_off"]),
        "engine_load_s": {k: round(v[1], 2) for k, v in engines.items()},
    }
    print(f"  identical greedy outputs, cache on vs off: {checks['identical_outputs_on_vs_off']}", flush=True)
    return {"checks": checks, "per_rep": {"prefix_cache_ttft_speedup": per_rep}}


# -- part 3: speculative requests beside the batch ----------------------------------------------------
async def spec_client(engine, prompts: Prompts, max_tokens: int, bias: dict[int, float], num_draft: int | None,
                      out: list[dict[str, Any]]) -> None:
    """A speculative closed-loop client that runs until it is cancelled (at the end of its phase).

    Every prompt is fresh and ``SPEC_PROMPT_TOKENS`` long: a speculative sequence keeps caches of its
    exact length, and MLX's CUDA backend compiles kernels per shape, so the warm-up compiles every
    shape the timed requests use (the steady state of a long-running server, not its first minutes)."""
    while True:
        req = request(prompts.fixed(SPEC_PROMPT_TOKENS), max_tokens, bias, num_draft_tokens=num_draft)
        rec = new_record(req, kind="speculative")
        out.append(rec)
        await stream_into(engine, req, rec)


async def part_speculative(args: argparse.Namespace, cfg, path: Path, draft: Path, ctx: dict[str, Any],
                           runs: Runs, min_s: float) -> dict[str, Any]:
    engine, load_s = await start_engine(cfg, path, draft)
    remember(ctx, engine, path)
    prompts: Prompts = ctx["prompts"]
    bias, k, nd = ctx["bias"], args.spec_clients, args.num_draft_tokens  # nd None: the engine's default
    print(f"speculative beside the batch: {args.clients} batch clients alone, then with {k} speculative clients "
          f"(draft {draft}, {nd or cfg.num_draft_tokens} draft tokens per step); {args.max_tokens} tokens per "
          f"request (engine and draft loaded in {load_s:.1f}s)", flush=True)

    def batch(i: int) -> tuple[str, Any]:
        return "batch", request(prompts.take(), args.max_tokens, bias, num_draft_tokens=0)

    async def one(side: str, rep: int | None, per_client: int, phase_s: float) -> tuple[dict[str, Any], dict | None]:
        recs: list[dict[str, Any]] = []
        spec: list[dict[str, Any]] = []
        prompts.phase()
        l0, t0 = load1(), time.perf_counter()
        tasks = [asyncio.create_task(spec_client(engine, prompts, args.max_tokens, bias, nd, spec))
                 for _ in range(k if side == "batch_with_speculative" else 0)]
        await closed_loop(engine, batch, args.clients, PhaseBudget(per_client, phase_s), recs)
        wall = time.perf_counter() - t0
        for t in tasks:  # the phase ends with the batch: cut the speculative requests still running
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        load = (l0, load1())
        s = summarize(side, args.clients, wall, recs, load)
        s["prompts"] = prompts.used()
        problems = [x for x in map(exact_length, recs) if x]
        sp = None
        if tasks:
            sp = summarize("speculative", k, wall, spec, load)
            usages = [r["usage"] for r in spec if r["usage"]]
            drafted = sum(u.get("draft_tokens") or 0 for u in usages)
            accepted = sum(u.get("accepted_draft_tokens") or 0 for u in usages)
            sp.update(draft_tokens=drafted, accepted_draft_tokens=accepted,
                      acceptance_rate=round(accepted / drafted, 4) if drafted else None,
                      num_draft_tokens=nd or cfg.num_draft_tokens, draft=str(draft),
                      note="tokens_per_s counts every token the speculative clients received while the batch ran "
                           "(requests cut at its end included); per-request figures use finished requests")
            problems += [x for x in map(exact_length, (r for r in spec if r["finish"] is not None or r["error"])) if x]
            runs.add(judged(sp, problems, rep))
        runs.add(judged(s, problems, rep))
        note = (f"; speculative: {fmt(sp['tokens_per_s'])} tok/s, {sp['requests']} finished, acceptance "
                f"{fmt(sp['acceptance_rate'], 3)}") if sp else ""
        report_line(s, note)
        return s, sp

    per_rep: dict[str, list[float | None]] = {"batch_tps_with_speculative_vs_alone": [],
                                              "spec_request_tps_vs_batch_request_tps": []}
    acceptance: list[float] = []
    try:
        await one("batch_alone", None, args.warmup_requests, 0.0)  # warm-up: both phases' shapes
        await one("batch_with_speculative", None, args.warmup_requests, 0.0)
        for rep in range(args.repeat):
            got: dict[str, tuple[dict[str, Any], dict | None]] = {}
            for side in (("batch_alone", "batch_with_speculative") if rep % 2 == 0
                         else ("batch_with_speculative", "batch_alone")):
                got[side] = await one(side, rep, args.requests_per_client, min_s)
            (a, _), (b, sp) = got["batch_alone"], got["batch_with_speculative"]
            per_rep["batch_tps_with_speculative_vs_alone"].append(ratio(tps_of(b), tps_of(a)))
            ok = sp is not None and not b["void"]
            per_rep["spec_request_tps_vs_batch_request_tps"].append(
                ratio(sp["decode_tokens_per_s_per_request"], b["decode_tokens_per_s_per_request"]) if ok else None)
            if ok and sp["acceptance_rate"] is not None:
                acceptance.append(sp["acceptance_rate"])
    finally:
        await engine.shutdown(drain_timeout_s=5.0)
    checks = {"acceptance_rate_min": min(acceptance, default=None), "acceptance_rate_max": max(acceptance, default=None),
              "draft": str(draft), "self_draft": draft.resolve() == path.resolve(),
              "spec_prompt_tokens": SPEC_PROMPT_TOKENS}
    return {"checks": checks, "per_rep": per_rep}


# -- main ---------------------------------------------------------------------------------------------
async def run_parts(args: argparse.Namespace, path: Path, draft: Path, ctx: dict[str, Any], runs: Runs,
                    min_s: float) -> dict[str, Any]:
    from engine.config import EngineConfig

    out: dict[str, Any] = {"checks": {}, "per_rep": {}}
    base = ctx["cfg_kwargs"]
    no_cache = {**base, "prompt_cache_gb": 0}  # parts 1 and 3 measure no cache
    for part in args.parts:
        if part == "constrained":
            got = await part_constrained(args, EngineConfig(**no_cache), path, ctx, runs, min_s)
        elif part == "prefix":
            got = await part_prefix(args, path, ctx, runs, min_s)
        else:
            cfg = EngineConfig(**{**no_cache, "max_speculative": max(EngineConfig().max_speculative, args.spec_clients)})
            got = await part_speculative(args, cfg, path, draft, ctx, runs, min_s)
        out["checks"][part] = got["checks"]
        out["per_rep"].update(got["per_rep"])
    return out


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
    min_s = default_min_phase_s(args.quick) if args.min_phase_s is None else args.min_phase_s
    cfg_kwargs: dict[str, Any] = {}
    if EngineConfig().max_batch_size < args.clients + args.spec_clients:
        cfg_kwargs["max_batch_size"] = args.clients + args.spec_clients
    cfg = EngineConfig(**cfg_kwargs)
    ctx: dict[str, Any] = {"cfg_kwargs": cfg_kwargs}
    runs = Runs()
    out = asyncio.run(run_parts(args, path, draft, ctx, runs, min_s))
    model_info, eos_ids = ctx["model_info"], ctx["eos_ids"]
    runtime = time.perf_counter() - t_start

    # -- report -----------------------------------------------------------------------------------
    c = args.clients
    results = runs.results()
    labels = {"free": "free (greedy)", "constrained": "constrained (json_schema, tools)",
              "prefix_cache_on": "prefix cache on", "prefix_cache_off": "prefix cache off",
              "batch_alone": "batch clients alone", "batch_with_speculative": "batch clients + speculative",
              "speculative": "speculative clients"}
    rows = []
    for series, label in labels.items():
        s = next(iter(results.get(series, {}).values()), None)
        if s is None:
            continue
        detail = ", ".join(f"{k} {v}" for k, v in sorted(s["finish_reasons"].items()))
        if series == "constrained":
            detail += f"; invalid {s['invalid_outputs']}/{s['requests']}"
        elif series.startswith("prefix"):
            detail = f"cached {fmt(s['cached_tokens_mean'])} of {fmt(s['prompt_tokens_mean'])}"
        elif series == "speculative":
            detail = f"acceptance {fmt(s['acceptance_rate'], 3)}; {s['unfinished_requests']} cut at phase end"
        rows.append([label, s["concurrency"], s["requests"], s["mean_completion_tokens"], s["tokens_per_s"],
                     s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["tpot_ms"]["mean"],
                     s["decode_tokens_per_s_per_request"], f"{s['void_runs']} void; {detail}"])
    print()
    print(f"BLAS: {blas}   model: {model_info['name']} {model_info['params'] / 1e6:.1f}M {model_info['dtype']}   "
          f"max_tokens: {args.max_tokens} (prefix part: {args.prefix_max_tokens})   repetitions: {args.repeat} "
          "(median run shown)")
    table = print_table(["series", "clients", "requests", "tok/req", "tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                         "TPOT ms", "tok/s/req", "detail"], rows)
    per_rep = out["per_rep"]
    summary = {k: spread(v) for k, v in per_rep.items()}
    ratios: dict[str, float | None] = {f"constrained_vs_free_c{c}": None, "prefix_cache_ttft_speedup": None,
                                       "batch_tps_with_speculative_vs_alone": None,
                                       "spec_request_tps_vs_batch_request_tps": None}
    ratios.update({k: v["median"] for k, v in summary.items()})
    targets = {f"constrained_vs_free_c{c}": {"target": TARGETS["constrained_vs_free"],
                                             "value": ratios[f"constrained_vs_free_c{c}"]}}
    for t in targets.values():
        t["met"] = None if t["value"] is None else t["value"] >= t["target"]
    print()
    print_spread(summary, digits=3)
    for k, t in targets.items():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"target {k:33s} >= {t['target']:<4} on the median: {state}")
    checks = out["checks"]
    void = [p for p in runs.phases if p["void"]]
    for p in void:
        print(f"VOID rep {p['repetition']} {p['path']}: {'; '.join(p['error_list'])}")
    if "constrained" in checks:
        ch = checks["constrained"]
        print(f"constrained outputs: {ch['outputs']} timed, {ch['invalid']} invalid (not closed, not JSON, not valid "
              f"for the schema, or off its grammar); finish reasons {ch['finish_reasons']}; free requests run to "
              f"{ch['free_max_tokens']} tokens")
    if "prefix" in checks:
        ch = checks["prefix"]
        print(f"prefix cache: prefix {ch['prefix_tokens']} tokens, cached equals shared prefix "
              f"{ch['cached_equals_shared_prefix_on']}; identical greedy outputs {ch['identical_outputs_on_vs_off']}")
    if "speculative" in checks:
        ch = checks["speculative"]
        print(f"speculative: acceptance {fmt(ch['acceptance_rate_min'], 3)}-{fmt(ch['acceptance_rate_max'], 3)} "
              f"({'self-draft: should be 1.0' if ch['self_draft'] else 'draft ' + ch['draft']})")
    loads = [x for p in runs.phases for x in p["load_1m"].values() if x is not None]
    cores = os.cpu_count() or 1
    busy = max(loads, default=0.0)
    if busy > cores:
        print(f"NOTE: the machine was shared (1-minute load average up to {busy:.1f} on {cores} cores): absolute "
              "figures are depressed and noisy; the ratios pair phases run back to back.")
    print(f"runtime: {runtime:.1f}s")

    if args.json:
        budget = PhaseBudget(args.requests_per_client, min_s)
        settings = {
            "parts": args.parts,
            "clients": c,
            "requests_per_client": args.requests_per_client,
            "min_phase_s": min_s,
            "phase": budget.describe() + " (prefix part: --prefix-requests, one client)",
            "warmup_requests_per_client": args.warmup_requests,
            "max_tokens": args.max_tokens,
            "constrained_max_tokens": args.constrained_max_tokens,
            "prefix_tokens": args.prefix_tokens,
            "prefix_requests": args.prefix_requests,
            "prefix_max_tokens": args.prefix_max_tokens,
            "spec_clients": args.spec_clients,
            "num_draft_tokens": args.num_draft_tokens or cfg.num_draft_tokens,
            "draft": str(draft),
            "response_format": RESPONSE_FORMAT,
            "tools": TOOLS,
            "tool_share": args.tool_share,
            "sampling": "greedy (temperature 0)",
            "eos_suppression": f"logit_bias -100 on EOS ids {eos_ids} for every request (constrained ones still "
                               "end when their JSON closes: the grammar then allows only EOS)",
            "closed_loop": "each client sends its next request when its previous one finishes",
            "prompts": "numbered corpus prompts (1-10 sentences), a new range for every phase, warm-up included; "
                       "speculative prompts fresh and all SPEC_PROMPT_TOKENS long; the prefix part: one shared "
                       "prefix plus a user part no earlier request of that engine had",
            "repeat": args.repeat,
            "order": "warm-up of every timed kind, then per repetition both sides of each pair back to back, "
                     "their order alternating; ratios per repetition, median with min-max; void phases give none",
            "max_batch_size": cfg.max_batch_size,
            "prefill_batch_size": cfg.prefill_batch_size,
            "admission_window_ms": getattr(cfg, "admission_window_ms", None),
            "prompt_cache_gb": {"constrained": 0, "prefix": {"on": cfg.prompt_cache_gb, "off": 0},
                                "speculative": 0},
            "quick": args.quick,
            "blas": blas,
            "runtime_s": round(runtime, 1),
        }
        doc = {
            "benchmark": "bench_features",
            "machine": {**machine_info(), "load_1m_max_during_run": busy},
            "model": model_info,
            "settings": settings,
            "results": results,
            "ratios": ratios,
            "spread": summary,
            "ratios_per_repetition": per_rep,
            "targets": targets,
            "void_phases": len(void),
            "checks": checks,
            "phases": [strip(p) for p in runs.phases],
            "warmup": [strip(p) for p in runs.warmup],
            "table": table,
        }
        print(f"wrote {write_json(args.json, doc)}")
    return 0


def strip(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k not in ("ids", "text")}


if __name__ == "__main__":
    sys.exit(main())
