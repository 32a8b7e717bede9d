"""Benchmark report: benchmark JSON in, ``docs/benchmarks.md`` tables and PNG plots out.

    python loadtests/report.py --run --quick                # run the benchmarks, then write the report
    python loadtests/report.py bench-out/*.json             # report on results already measured
    python loadtests/report.py bench-out/engine.json --locust "HTTP (Locust):32:bench-out/chat32" ...

Inputs are JSON documents in the shape ``loadtests/bench_engine.py --json`` writes::

    {"benchmark": "bench_engine", "machine": {...}, "model": {...}, "settings": {...},
     "results": {"<path>": {"<concurrency>": {"concurrency": 8, "requests": 16, "tokens_per_s": 126.0,
                                               "ttft_ms": {"p50": 80.0, "p99": 140.0}, ...}}}}

so any benchmark that writes that shape (an HTTP benchmark against mlx-serving and mlx_lm.server,
a GPU run) joins the same tables. Runs are grouped by machine (CPU or GPU, from ``machine``) and
model; each group gets a tokens/s table, a TTFT table and two plots (aggregate tokens/s against
concurrency, TTFT p50 and p99 against concurrency).

``--locust LABEL:CONCURRENCY:PREFIX`` adds a Locust run (``--csv PREFIX``, with the TTFT rows and
``PREFIX_tokens.csv`` of loadtests/locustfile.py) as one point of series LABEL.

When ``docs/benchmarks.md`` already has ``<!-- report:begin -->`` and ``<!-- report:end -->``
markers only the text between them is replaced, so hand-written prose around it survives.
Plots use matplotlib when it is installed and Pillow (a dependency already) otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
# Benchmarks --run knows; a missing script is skipped (others may not exist yet).
BENCHES = {"bench_engine": "loadtests/bench_engine.py", "bench_http": "loadtests/bench_http.py",
           "bench_features": "loadtests/bench_features.py"}
LABELS = {  # friendlier series names for known (benchmark, path) pairs
    ("bench_engine", "engine"): "engine (in-process)",
    ("bench_engine", "batchgen"): "BatchGenerator (bare loop)",
    ("bench_engine", "sequential"): "sequential stream_generate",
    ("bench_http", "engine"): "engine (in-process, HTTP run)",
    ("bench_http", "http"): "mlx-serving over HTTP",
    ("bench_http", "mlx_lm_server"): "mlx_lm.server (HTTP)",
    # bench_features writes bench_engine's shape: one series per feature path, keyed by its client count
    ("bench_features", "free"): "features: free generation",
    ("bench_features", "constrained"): "features: constrained (json_schema)",
    ("bench_features", "prefix_cache_on"): "features: prefix cache on (1k shared)",
    ("bench_features", "prefix_cache_off"): "features: prefix cache off (1k shared)",
    ("bench_features", "batch_alone"): "features: batch clients alone",
    ("bench_features", "batch_with_speculative"): "features: batch clients beside speculative ones",
    ("bench_features", "speculative"): "features: speculative clients",
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Point:
    concurrency: int | None  # None: independent of concurrency (a sequential baseline)
    tokens_per_s: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    requests: int | None = None


@dataclass
class Series:
    label: str
    points: list[Point] = field(default_factory=list)


@dataclass
class Group:
    key: str  # "CPU: <cpu> / <model> (<params>, <dtype>)": see title()
    machine: dict[str, Any]
    model: dict[str, Any]
    settings: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


# -- inputs ---------------------------------------------------------------------------------------
def platform_of(machine: dict[str, Any]) -> str:
    dev = str(machine.get("mlx_device") or "").lower()
    if "gpu" in dev:
        return "GPU (Metal)" if "darwin" in str(machine.get("os", "")).lower() else "GPU (CUDA)"
    return "CPU"


def group_id(machine: dict[str, Any], model: dict[str, Any]) -> tuple[str, str, str]:
    what = machine.get("gpu") or machine.get("cpu") or machine.get("hostname") or "unknown machine"
    return platform_of(machine), str(what), str(model.get("name", "model"))


def title(machine: dict[str, Any], model: dict[str, Any]) -> str:
    plat, what, name = group_id(machine, model)
    params = model.get("params")
    n = (f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M" if params >= 1e7
         else f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params / 1e3:.0f}K") if params else ""
    size = f" ({n} params, {model.get('dtype')})" if params else ""
    return f"{plat}: {what} / {name}{size}"


def _rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat result rows from either shape: bench_engine's ``{path: {level: summary}}`` (TTFT under
    ``ttft_ms``) or bench_http's list of ``{path, concurrency, tokens_per_s, ttft_p50_ms, ...}``."""
    results = doc.get("results") or []
    if isinstance(results, list):
        return results
    rows = []
    for name, levels in results.items():
        for level, r in levels.items():
            ttft = r.get("ttft_ms") or {}
            rows.append({**r, "path": name, "concurrency": None if level == "all" else r.get("concurrency"),
                         "ttft_p50_ms": ttft.get("p50"), "ttft_p99_ms": ttft.get("p99")})
    return rows


def load_json(path: Path, groups: dict[str, Group]) -> None:
    doc = json.loads(path.read_text())
    machine, model = doc.get("machine", {}), doc.get("model", {})
    if isinstance(model, str):  # a model directory
        model = {"name": Path(model).name, "path": model}
    bench = doc.get("benchmark") or ("bench_http" if "http" in path.stem else path.stem)
    gid = "|".join(group_id(machine, model))
    g = groups.setdefault(gid, Group(gid, machine, model))
    if model.get("params") and not g.model.get("params"):
        g.model = model
    g.sources.append(str(path))
    g.settings.append({"benchmark": bench, **(doc.get("settings") or {})})
    for r in _rows(doc):
        name = str(r.get("path"))
        label = LABELS.get((bench, name), f"{bench}: {name}")
        s = g.series.setdefault(label, Series(label))
        conc = r.get("concurrency")
        s.points.append(Point(None if conc is None else int(conc), r.get("tokens_per_s"), r.get("ttft_p50_ms"),
                              r.get("ttft_p99_ms"), r.get("requests")))


def load_locust(spec: str, groups: dict[str, Group]) -> None:
    """``LABEL:CONCURRENCY:PREFIX``: the TTFT row and the tokens file of one Locust run."""
    label, conc, prefix = spec.split(":", 2)
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    ttft = next((r for r in rows if r["Type"] == "TTFT"), None)
    tokens_per_s = None
    tok = Path(f"{prefix}_tokens.csv")
    if tok.exists():
        tokens_per_s = float(list(csv.DictReader(tok.open()))[0]["tokens_per_s"])
    key = "Locust (HTTP)"
    g = groups.setdefault(key, Group(key, {}, {}))
    g.sources.append(f"{prefix}_stats.csv")
    s = g.series.setdefault(label, Series(label))
    s.points.append(Point(int(conc), tokens_per_s, float(ttft["50%"]) if ttft else None,
                          float(ttft["99%"]) if ttft else None, int(ttft["Request Count"]) if ttft else None))


# -- running the benchmarks ----------------------------------------------------------------------
def run_benchmarks(out_dir: Path, quick: bool, extra: list[str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, script in BENCHES.items():
        path = ROOT / script
        if not path.exists():
            print(f"skipping {name}: {script} does not exist (yet)", flush=True)
            continue
        target = out_dir / f"{name}.json"
        cmd = [sys.executable, str(path), "--json", str(target), *(["--quick"] if quick else []), *extra]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{name} failed (exit {proc.returncode}); its results are left out", flush=True)
            continue
        print(f"{name}: {time.monotonic() - t0:.0f}s", flush=True)
        written.append(target)
    return written


# -- tables ---------------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def levels_of(g: Group) -> list[int]:
    return sorted({p.concurrency for s in g.series.values() for p in s.points if p.concurrency is not None})


def table(g: Group, metric: str, digits: int = 1) -> str:
    levels = levels_of(g)
    head = "| series | " + " | ".join(f"c={c}" for c in levels) + (" | sequential |" if _has_flat(g) else " |")
    sep = "|---|" + "---:|" * len(levels) + ("---:|" if _has_flat(g) else "")
    lines = [head, sep]
    for s in g.series.values():
        by = {p.concurrency: p for p in s.points}
        cells = [_f(getattr(by[c], metric), digits) if c in by else "-" for c in levels]
        if _has_flat(g):
            cells.append(_f(getattr(by[None], metric), digits) if None in by else "-")
        lines.append(f"| {s.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _has_flat(g: Group) -> bool:
    return any(p.concurrency is None for s in g.series.values() for p in s.points)


# -- plots ----------------------------------------------------------------------------------------
def plot(g: Group, path: Path, kind: str) -> Path | None:
    """``kind``: ``throughput`` (tokens/s) or ``ttft`` (p50 solid, p99 dashed), against concurrency."""
    lines: list[tuple[str, list[tuple[int, float]], bool, str]] = []  # label, points, dashed, color
    for i, s in enumerate(g.series.values()):
        color = COLORS[i % len(COLORS)]
        pts = sorted((p for p in s.points if p.concurrency is not None), key=lambda p: p.concurrency)
        if kind == "throughput":
            xy = [(p.concurrency, p.tokens_per_s) for p in pts if p.tokens_per_s is not None]
            flat = [p.tokens_per_s for p in s.points if p.concurrency is None and p.tokens_per_s is not None]
            if flat and levels_of(g):  # a sequential baseline: a flat line across the levels
                xy = [(c, flat[0]) for c in levels_of(g)]
            lines.append((s.label, xy, bool(flat), color))
        else:
            lines.append((f"{s.label} p50", [(p.concurrency, p.ttft_p50_ms) for p in pts if p.ttft_p50_ms], False, color))
            lines.append((f"{s.label} p99", [(p.concurrency, p.ttft_p99_ms) for p in pts if p.ttft_p99_ms], True, color))
    lines = [x for x in lines if x[1]]
    if not lines:
        return None
    ylabel = "aggregate tokens/s" if kind == "throughput" else "TTFT (ms)"
    title = ("Throughput" if kind == "throughput" else "Time to first token") + f" - {g.key}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for label, xy, dashed, color in lines:
            ax.plot([x for x, _ in xy], [y for _, y in xy], "--" if dashed else "-", marker="o", color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    except ImportError:
        _pillow_plot(lines, path, title, ylabel)
    return path


def _pillow_plot(lines: list[tuple[str, list[tuple[int, float]], bool, str]], path: Path, title: str,
                 ylabel: str) -> None:
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 880, 500, 80, 20, 40, 130
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = sorted({x for _, xy, _, _ in lines for x, _ in xy})
    ymax = max(y for _, xy, _, _ in lines for _, y in xy) * 1.1 or 1.0
    lx = [math.log2(x) for x in xs]
    x0, x1 = (min(lx), max(lx)) if len(lx) > 1 else (lx[0] - 1, lx[0] + 1)

    def px(x: float, y: float) -> tuple[float, float]:
        return (L + (math.log2(x) - x0) / (x1 - x0) * (W - L - R), T + (1 - y / ymax) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(6):  # y grid and labels
        y = ymax * i / 5
        _, py = px(xs[0], y)
        d.line([L, py, W - R, py], fill="#dddddd")
        d.text((5, py - 6), _f(y, 0), fill="black")
    for x in xs:
        gx, _ = px(x, 0)
        d.line([gx, T, gx, H - B], fill="#eeeeee")
        d.text((gx - 6, H - B + 5), str(x), fill="black")
    d.text((L, 10), title[:120], fill="black")
    d.text((W // 2 - 60, H - B + 22), "concurrent requests", fill="black")
    d.text((5, T - 20), ylabel, fill="black")
    for i, (label, xy, dashed, color) in enumerate(lines):
        pts = [px(x, y) for x, y in xy]
        for (ax_, ay), (bx, by) in zip(pts, pts[1:]):
            if dashed:
                n = max(1, int(math.hypot(bx - ax_, by - ay) // 8))
                for k in range(0, n, 2):
                    d.line([ax_ + (bx - ax_) * k / n, ay + (by - ay) * k / n,
                            ax_ + (bx - ax_) * (k + 1) / n, ay + (by - ay) * (k + 1) / n], fill=color, width=2)
            else:
                d.line([ax_, ay, bx, by], fill=color, width=2)
        for cx, cy in pts:
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        ly = H - B + 42 + (i % 5) * 16
        lx_ = L + (i // 5) * 280
        d.line([lx_, ly + 6, lx_ + 24, ly + 6], fill=color, width=2)
        d.text((lx_ + 30, ly), label[:40] + (" (dashed)" if dashed else ""), fill="black")
    img.save(path)


# -- markdown -------------------------------------------------------------------------------------
def slug(text: str) -> str:
    s = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")[:60].strip("-")


def render(groups: dict[str, Group], out: Path, plots_dir: Path) -> str:
    parts = [f"_Generated by `python loadtests/report.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}._", ""]
    for g in groups.values():
        if g.machine or g.model:
            g.key = title(g.machine, g.model)
        parts += [f"### {g.key}", ""]
        m = g.machine
        if m:
            parts.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
                         f"MLX {m.get('mlx')} on {m.get('mlx_device')}; mlx-lm {m.get('mlx_lm')}; BLAS: {m.get('blas')}; "
                         f"measured {m.get('time')}.")
        for st in g.settings:
            keys = ("max_tokens", "sampling", "closed_loop", "eos_suppression")
            bits = [f"{k}: {st[k]}" for k in keys if k in st]
            if bits:
                parts.append(f"Settings ({st.get('benchmark')}): " + "; ".join(map(str, bits)) + ".")
        parts += ["", "Aggregate tokens/s (generated tokens / wall time):", "", table(g, "tokens_per_s"), "",
                  "TTFT p50 (ms):", "", table(g, "ttft_p50_ms"), "", "TTFT p99 (ms):", "", table(g, "ttft_p99_ms"), ""]
        for kind in ("throughput", "ttft"):
            p = plot(g, plots_dir / f"{slug(g.key)}-{kind}.png", kind)
            if p is not None:
                rel = p.relative_to(out.parent) if p.is_relative_to(out.parent) else p
                parts += [f"![{kind} - {g.key}]({rel.as_posix()})", ""]
        parts += ["Sources: " + ", ".join(f"`{s}`" for s in g.sources), ""]
    return "\n".join(parts)


def write_report(body: str, out: Path) -> None:
    block = f"{BEGIN}\n{body}\n{END}\n"
    if out.exists():
        text = out.read_text()
        if BEGIN in text and END in text:
            out.write_text(text[:text.index(BEGIN)] + block + text[text.index(END) + len(END) + 1:])
            return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Benchmarks\n\nHow to reproduce: `python loadtests/report.py --run` (see loadtests/README.md).\n\n"
                   "## Results\n\n" + block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="benchmark JSON files")
    p.add_argument("--run", action="store_true", help="run the benchmarks first (their JSON goes to --bench-dir)")
    p.add_argument("--quick", action="store_true", help="with --run: the benchmarks' --quick mode")
    p.add_argument("--bench-arg", action="append", default=[], help="with --run: an extra argument for every benchmark")
    p.add_argument("--bench-dir", default=str(ROOT / "bench-out"), help="where --run writes JSON (default bench-out/)")
    p.add_argument("--locust", action="append", default=[], metavar="LABEL:CONCURRENCY:PREFIX",
                   help="a Locust run (its --csv prefix) as one point of series LABEL")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--plots", help="PNG directory (default: benchmarks/ beside --out)")
    a = p.parse_args(argv)
    inputs = [Path(x) for x in a.inputs]
    if a.run:
        inputs += run_benchmarks(Path(a.bench_dir), a.quick, a.bench_arg)
    if not inputs and not a.locust:
        p.error("no input: give benchmark JSON files, --locust runs, or --run")
    groups: dict[str, Group] = {}
    for path in inputs:
        load_json(path, groups)
    for spec in a.locust:
        load_locust(spec, groups)
    out = Path(a.out)
    plots_dir = Path(a.plots) if a.plots else out.parent / "benchmarks"
    write_report(render(groups, out, plots_dir), out)
    print(f"wrote {out} ({len(groups)} group(s)); plots in {plots_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
