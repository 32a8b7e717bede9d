"""Helpers shared by the benchmarks (engine in-process now, HTTP later).

Kept free of MLX imports at module level: ``reexec_with_openblas`` must run before MLX loads its
BLAS, because ``LD_PRELOAD`` is only read when a process starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

_REEXEC_MARK = "MLX_SERVING_BENCH_REEXEC"


# -- BLAS ------------------------------------------------------------------------------------------
def reexec_with_openblas(disabled: bool = False) -> None:
    """On Linux with MLX's reference BLAS, restart this process with OpenBLAS preloaded.

    Does nothing when ``disabled``, when not needed (macOS, CUDA, already preloaded), when OpenBLAS
    is not installed, or when this process is already the re-executed one.
    """
    if disabled:
        os.environ["MLX_SERVING_NO_OPENBLAS"] = "1"  # so children (and blas.preload_env) agree
        return
    if os.environ.get(_REEXEC_MARK):
        return
    from engine.blas import preload_env

    extra = preload_env()
    if not extra:
        return
    env = dict(os.environ, **extra, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def blas_description() -> str:
    from engine.blas import describe

    return describe()


# -- models ----------------------------------------------------------------------------------------
def default_model_dir(preset: str = "bench") -> Path:
    from engine.sources import demo_dir

    return demo_dir(f"demo:{preset}")


def ensure_model(model: str | None, model_dir: str | Path | None, preset: str = "bench") -> Path:
    """A loadable model directory: ``model`` as given, or the ``preset`` demo model built into
    ``model_dir`` (default: the engine's demo cache) on first use."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise SystemExit(f"--model {model}: no such directory")
        return path.resolve()
    target = Path(model_dir).expanduser() if model_dir else default_model_dir(preset)
    default = target.resolve() == default_model_dir(preset).resolve()
    if not default and (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target.resolve()  # the default one goes through resolve(), which rebuilds a stale demo
    t0 = time.monotonic()
    print(f"building demo model {preset!r} into {target} ...", flush=True)
    if default:
        from engine.sources import resolve

        out = Path(resolve(f"demo:{preset}"))  # locked: other processes may build it too
    else:
        from engine.demo import make_demo_model

        out = make_demo_model(target, preset)  # type: ignore[arg-type]
    print(f"built in {time.monotonic() - t0:.1f}s", flush=True)
    return out.resolve()


def model_description(model: Any, path: Path) -> dict[str, Any]:
    """Name, parameter count and dtype(s) of a loaded mlx-lm model."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in params})
    cfg: dict[str, Any] = {}
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        pass
    return {
        "name": path.name,
        "path": str(path),
        "model_type": cfg.get("model_type"),
        "params": int(sum(v.size for _, v in params)),
        "bytes": int(sum(v.nbytes for _, v in params)),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
    }


# -- prompts ---------------------------------------------------------------------------------------
def corpus_sentences() -> list[str]:
    from engine.demo import corpus_text

    text = corpus_text()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


# sentences per prompt, cycled: short, medium and long prompts interleave.
_PROMPT_SPANS = (1, 3, 6, 2, 10, 4, 1, 8)


def make_prompts(n: int, start: int = 0, numbered: bool = True) -> list[str]:
    """``n`` distinct text prompts of mixed lengths (1 to 10 corpus sentences), deterministic.

    Prompt ``i`` of one call is global prompt ``start + i``, so disjoint ranges give disjoint
    prompts. ``numbered`` opens each with its own number ("Request 17: ..."): prompts then share at
    most a token or two of prefix, so a prefix (prompt) cache finds nothing worth reusing and every
    request pays its full prefill, as it does on a server without one.
    """
    sentences = corpus_sentences()
    out: list[str] = []
    for i in range(start, start + n):
        span = _PROMPT_SPANS[i % len(_PROMPT_SPANS)]
        first = (i * 7) % len(sentences)
        text = " ".join((sentences * 2)[first:first + span])
        out.append(f"Request {i}: {text}" if numbered else text)
    if not numbered and len(set(out)) < len(out):
        raise ValueError(f"only {len(set(out))} distinct unnumbered prompts; use numbered=True")
    return out


class FreshPrompts:
    """Prompts no earlier phase had, drawn one at a time (a phase's request count can depend on time).

    ``phase()`` opens a new range of ``make_prompts`` indexes, starting on a multiple of the cycle of
    prompt lengths, so every phase gets the same mix of lengths in the same order; ``take()`` draws
    the next prompt of the open range; ``used()`` is the range drawn so far, for the JSON record.
    """

    def __init__(self, start: int = 0) -> None:
        self.start = self.next = start
        self._cache: dict[int, str] = {}

    def phase(self) -> int:
        cycle = len(_PROMPT_SPANS)
        self.start = self.next = -(-self.next // cycle) * cycle
        return self.start

    def take(self) -> str:
        i, self.next = self.next, self.next + 1
        if i not in self._cache:
            self._cache = dict(zip(range(i, i + 64), make_prompts(64, i)))  # one corpus read per 64
        return self._cache[i]

    def used(self) -> list[int]:
        return [self.start, self.next]


# -- phases ----------------------------------------------------------------------------------------
def on_gpu() -> bool:
    """Whether MLX computes on a GPU (Metal or CUDA): phases there must last ``--min-phase-s``."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return mx.default_device().type == mx.gpu or bool(cuda is not None and cuda.is_available())


GPU_MIN_PHASE_S = 20.0  # issue #16: a phase on a GPU lasts at least this long (one on the CPU: 3 requests per client)


def default_min_phase_s(quick: bool) -> float:
    """``--min-phase-s`` when not given: 20 s on a GPU, none on the CPU (and in a --quick smoke run)."""
    return 0.0 if quick or not on_gpu() else GPU_MIN_PHASE_S


GPU_WARMUP_REQUESTS = 64  # a level's warm-up on a GPU sends at least this many requests in all, per path


def warmup_per_client(given: int | None, level: int, quick: bool) -> int:
    """Warm-up requests per client at ``level``: ``given``, else 2, and on a GPU enough for
    ``GPU_WARMUP_REQUESTS`` in all. Each new prompt length is a new shape there: an H200 run whose
    lone client warmed up on 2 requests had TTFTs several times the later ones in its first two
    repetitions, on every path (docs/bench/http_gpu_h200_c1_warmup2.json)."""
    if given is not None:
        return given
    return 2 if quick or not on_gpu() else max(2, -(-GPU_WARMUP_REQUESTS // level))


class PhaseBudget:
    """When a closed-loop client of a phase sends its next request.

    It does while it has sent fewer than ``per_client`` requests or the phase is younger than
    ``min_s``; never once the phase is ``3 * min_s`` old, whatever happens (a stalled path cannot
    hold the run). With ``min_s`` 0 only the count applies.
    """

    def __init__(self, per_client: int, min_s: float = 0.0) -> None:
        self.per_client = per_client
        self.min_s = min_s
        self.t0 = time.perf_counter()

    def more(self, sent: int) -> bool:
        age = time.perf_counter() - self.t0
        if self.min_s > 0 and age >= 3 * self.min_s:
            return False
        return sent < self.per_client or age < self.min_s

    def describe(self) -> str:
        if self.min_s <= 0:
            return f"each client sends {self.per_client} requests"
        return (f"each client sends until it has sent {self.per_client} requests and the phase is {self.min_s:g} s "
                f"old, never past {3 * self.min_s:g} s")


async def stagger(k: int, step_ms: float) -> None:
    """Client ``k`` of a phase starts ``k * step_ms`` after the first: a burst of simultaneous connects
    would overflow a small listen backlog (``mlx_lm.server``'s is 5) and count as failures."""
    if k and step_ms > 0:
        await asyncio.sleep(k * step_ms / 1000)


CONNECT_RETRIES = 4


async def send_streaming(client: Any, url: str, body: dict[str, Any], retries: int = CONNECT_RETRIES,
                         backoff_s: float = 0.05) -> tuple[Any, int]:
    """POST ``body`` and return (the streaming response, connect retries it took).

    A refused or timed-out connect (``httpx.ConnectError`` / ``ConnectTimeout``: no byte of the request
    was sent) is retried after ``backoff_s``, doubling, up to ``retries`` times: a full listen backlog is
    not the server failing a request. Anything after the connect is the caller's to judge. The caller
    closes the response (``await response.aclose()``).
    """
    import httpx

    attempt = 0
    while True:
        try:
            return await client.send(client.build_request("POST", url, json=body), stream=True), attempt
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if attempt >= retries:
                raise
            await asyncio.sleep(backoff_s * 2 ** attempt)
            attempt += 1


# -- statistics and output -------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """A ratio over repetitions, as docs/benchmarks.md reports it: the median with its min and max
    (repetitions without a value, e.g. a void phase, are left out and listed as None)."""
    import statistics

    xs = [v for v in values if v is not None]
    return {"median": statistics.median(xs) if xs else None, "min": min(xs, default=None),
            "max": max(xs, default=None), "n": len(xs), "values": list(values)}


def print_spread(summary: dict[str, dict[str, Any]], digits: int = 1) -> str:
    """The table of ratios over repetitions (``spread`` values), ``digits`` after the point."""
    return print_table(["ratio", "median", "min", "max", "repetitions"],
                       [(k, *(fmt(v[x], digits) for x in ("median", "min", "max")), v["n"]) for k, v in summary.items()])


def serving_priority() -> None:
    """Ray processes this benchmark starts run their workers as mlx-serving's own nodes do: at normal
    priority, not at Ray's nice 15 (``cluster.nodes.niceness_env``). Call before starting Ray."""
    from cluster.nodes import niceness_env

    os.environ.update(niceness_env())


def start_local_serve(port: int) -> None:
    """A one-machine Ray cluster and Serve's proxy on 127.0.0.1:``port``; stopped by ``stop_local_serve``.
    Workers get the preloaded BLAS and the offline hub setting, and log warnings only."""
    import ray
    from ray import serve

    serving_priority()
    env = {k: v for k, v in os.environ.items() if k in ("LD_PRELOAD", "HF_HUB_OFFLINE")}
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {**env, "MLX_SERVING_LOG_LEVEL": "WARNING"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})


def stop_local_serve() -> None:
    """Shut down the Serve app and the local Ray a benchmark started."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file=None) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])
    print(out, file=file or sys.stdout, flush=True)
    return out


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(p)
    return p


# -- machine ---------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    mlx_device = None
    try:
        import mlx.core as mx

        mlx_device = str(mx.default_device())
    except Exception:  # noqa: BLE001 - descriptive only
        pass
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "usable_cores": usable,
        "memory_gib": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "mlx_device": mlx_device,
        "blas": blas_description(),
        "ld_preload": os.environ.get("LD_PRELOAD") or None,
        "hostname": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
