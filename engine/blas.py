"""Linux CPU backend: MLX's wheel links netlib reference BLAS (about 5 GFLOP/s, so batching gains
nothing). When Debian's OpenBLAS is installed, preloading it gives 130-190 GFLOP/s on the same
machine. ``LD_PRELOAD`` only works at process start, so this module finds the library and says how
to use it; process launchers (``mlx-serving up``, the benchmarks) put it in their children's env.
macOS (Accelerate + Metal) and the CUDA backend need none of this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)


def uses_reference_blas() -> bool:
    """True on Linux when the MLX CPU wheel's bundled netlib BLAS will be used."""
    if not sys.platform.startswith("linux"):
        return False
    libs = next((p / "mlx_cpu.libs" for p in map(Path, sys.path) if (p / "mlx_cpu.libs").is_dir()), None)
    return libs is not None and any(libs.glob("libblas-*.so*"))


def openblas_path() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


def preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def preload_env() -> dict[str, str]:
    """Environment to give a child process so it uses OpenBLAS; empty when not needed or not installed."""
    if os.environ.get("MLX_SERVING_NO_OPENBLAS") or not uses_reference_blas():
        return {}
    lib = openblas_path()
    if lib is None or preloaded():
        return {}
    current = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{lib}:{current}" if current else lib}


def describe() -> str:
    if not uses_reference_blas():
        return "native (Accelerate/Metal, CUDA, or a non-reference BLAS)"
    if preloaded():
        return "OpenBLAS (preloaded)"
    lib = openblas_path()
    return ("reference BLAS (slow; install libopenblas0-pthread for OpenBLAS)" if lib is None
            else f"reference BLAS (slow; set LD_PRELOAD={lib})")
