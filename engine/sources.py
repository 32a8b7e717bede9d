"""Model sources: a local directory, a Hugging Face repo id, or ``demo:<preset>``.

``demo:tiny`` / ``demo:bench`` / ``demo:vision`` name the offline demo models; they are built on
first use into the cache directory (``$MLX_SERVING_CACHE``, default ``~/.cache/mlx-serving``) on the
host that needs them, so a fleet needs no shared filesystem to serve the demo.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

DEMO_PREFIX = "demo:"
DEMO_KINDS = ("tiny", "bench", "vision")


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_SERVING_CACHE", "~/.cache/mlx-serving")).expanduser()


def is_demo(source: str) -> bool:
    return source.startswith(DEMO_PREFIX)


def demo_dir(source: str) -> Path:
    kind = source[len(DEMO_PREFIX):]
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo model {source!r}; choose one of " + ", ".join(DEMO_PREFIX + k for k in DEMO_KINDS))
    return cache_dir() / "models" / f"demo-{kind}"


def resolve(source: str) -> str:
    """A path or hub id that mlx-lm / mlx-vlm can load; builds a demo model if it is missing, or
    rebuilds one an older release built (``DEMO_VERSION``: e.g. before the tool and thinking markers)."""
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
