"""A local fake hub: huggingface_hub's cache layout in a temp dir, as a download leaves it.

Files live once under ``blobs/``, named by the hub's hashes (SHA-256 of an LFS file's content, the
git blob SHA-1 of any other file); ``snapshots/<commit>/`` links to them; ``refs/<name>`` holds a
commit. Code that reads the cache offline cannot tell it from a real download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".model")  # what the hub stores with git-lfs


def blob_name(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish(hub: Path, repo_id: str, model_dir: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``model_dir`` into the cache as ``repo_id`` at ``commit``, with ``refs`` pointing at it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        blob = repo / "blobs" / blob_name(src)
        if not blob.exists():
            blob.write_bytes(src.read_bytes())
        link = snapshot / src.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
