"""Model sources: a local directory, a Hugging Face repo id (at a revision), or ``demo:<preset>``.

A hub id is resolved to its local snapshot (downloaded when missing, from the cache when
``HF_HUB_OFFLINE`` is set) before anything inspects it, so a vision model given by hub id is
recognised as one. ``demo:tiny`` / ``demo:bench`` / ``demo:vision`` / ``demo:tiny-qwen2`` name the offline demo models;
they are built on first use into the cache directory (``$MLX_SERVING_CACHE``, default
``~/.cache/mlx-serving``) on the host that needs them, so a fleet needs no shared filesystem to
serve the demo.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DEMO_PREFIX = "demo:"
DEMO_KINDS = ("tiny", "bench", "vision", "tiny-qwen2", "bench-qwen2")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ADAPTER_FILES = ["adapters.safetensors", "adapter_config.json"]  # what mlx-lm's load_adapters reads
Progress = Callable[[int, int], None]  # (bytes written, bytes to write) of a download


@dataclass(frozen=True)
class ModelSource:
    """What to load: weights (a path, a hub id at ``revision``, or a demo) and an optional LoRA adapter
    (a directory with ``adapters.safetensors`` and ``adapter_config.json``, or a hub id holding them)."""

    source: str
    revision: str | None = None
    adapter_path: str | None = None

    def local_dir(self, progress: Progress | None = None) -> str:
        return resolve(self.source, self.revision, progress=progress)

    def local_adapter(self) -> str | None:
        return None if self.adapter_path is None else resolve(self.adapter_path, patterns=ADAPTER_FILES)

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return self.source + at + (f" + adapter {self.adapter_path}" if self.adapter_path else "")


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_SERVING_CACHE", "~/.cache/mlx-serving")).expanduser()


def is_demo(source: str) -> bool:
    return source.startswith(DEMO_PREFIX)


def demo_dir(source: str) -> Path:
    kind = source[len(DEMO_PREFIX):]
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo model {source!r}; choose one of " + ", ".join(DEMO_PREFIX + k for k in DEMO_KINDS))
    return cache_dir() / "models" / f"demo-{kind}"


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).expanduser().exists()


def resolve(source: str, revision: str | None = None, patterns: list[str] | None = None,
            progress: Progress | None = None) -> str:
    """A local directory mlx-lm / mlx-vlm can load. A hub id becomes its snapshot (``patterns``:
    the files to fetch, by default those mlx-lm loads); a demo model is built if it is missing, or
    rebuilt when an older release built it (``DEMO_VERSION``: e.g. before the tool and thinking markers)."""
    if revision is not None and not is_hub_id(source):
        raise ValueError(f"revision {revision!r} applies to hub ids only, not to {source!r}")
    if is_hub_id(source):
        return download(source, revision, patterns, progress)
    if not is_demo(source):
        path = Path(source).expanduser()
        return str(path) if path.exists() else source
    out = demo_dir(source)
    if _current(out):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # replicas on one host build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _current(out):
            kind = source[len(DEMO_PREFIX):]
            stale = (out / "model.safetensors").exists()
            if kind == "vision":
                from .demo_vision import make_demo_vision_model

                make_demo_vision_model(out, force=stale)
            else:
                from .demo import make_demo_model

                make_demo_model(out, kind, force=stale)  # type: ignore[arg-type]
            (out / VERSION_FILE).write_text(str(DEMO_VERSION))
    return str(out)


DEMO_VERSION = 2  # bump when the demo models change (2: tool-call and thinking markers in the tokenizer)
VERSION_FILE = "mlx-serving-demo-version"


def _current(out: Path) -> bool:
    try:
        return (out / "model.safetensors").exists() and int((out / VERSION_FILE).read_text()) >= DEMO_VERSION
    except (OSError, ValueError):
        return False


# What mlx-vlm 0.x fetches for a vision checkpoint (its get_model_path); mlx-lm's DEFAULT_ALLOW_PATTERNS otherwise.
VISION_PATTERNS = ["*.json", "*.jsonl", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def download(repo_id: str, revision: str | None = None, patterns: list[str] | None = None,
             progress: Progress | None = None) -> str:
    """The local snapshot of ``repo_id`` at ``revision``: from the Hugging Face cache when it is there
    (or when ``HF_HUB_OFFLINE`` is set), else downloaded into it. Without ``patterns``, ``config.json``
    comes first and says which files the model needs: mlx-vlm's for a vision model, mlx-lm's otherwise.
    ``progress`` hears the byte counts of the weights' download (nothing when the cache has them)."""
    import json

    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    if patterns is None:
        head = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"]))
        try:
            vision = "vision_config" in json.loads((head / "config.json").read_text())
        except (OSError, ValueError):
            vision = False
        patterns = VISION_PATTERNS if vision else DEFAULT_ALLOW_PATTERNS
    bars = None if progress is None else progress_bars(progress)
    return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, tqdm_class=bars)


def progress_bars(report: Progress) -> type:
    """A tqdm class for ``snapshot_download`` that draws nothing and passes byte counts to ``report``.

    huggingface_hub aggregates every file of a snapshot into byte bars (bytes received, bytes
    written); the larger count of the two is reported."""
    from tqdm.auto import tqdm

    counts: dict[int, tuple[int, int]] = {}
    lock = threading.Lock()

    class ByteCounts(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = _devnull()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if self.unit == "B":
                with lock:
                    counts[id(self)] = (int(self.n), int(self.total or 0))
                    done, total = max(counts.values())
                report(done, total)
            return out

    return ByteCounts


@functools.cache
def _devnull() -> Any:
    return open(os.devnull, "w")
