"""Copying a hub model from this machine's Hugging Face cache to other hosts, over Ray itself.

A fleet downloads a model once: ``models pull`` fetches it here, then a small actor on each host
receives the cache entry in chunks and rebuilds it in that host's own Hugging Face cache (blobs,
snapshot links, refs), so replicas there load it offline, as if they had downloaded it themselves.
No ssh and no shared filesystem are needed: the bytes travel through Ray's object store.

Blobs are named by the hub's own hashes (SHA-256 for LFS files, the git blob SHA-1 for the others),
so each received file is checked against the hash the hub published. A copy in progress lives in
``blobs/<hash>.incomplete``, as huggingface_hub keeps its own partial downloads; an interrupted copy
resumes from the bytes already there, and a partial file whose content fails the hash is removed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

CHUNK_BYTES = 8 * 2**20
IN_FLIGHT = 4  # chunks queued per host: keeps the link busy while the receiver writes


class CachedFile(BaseModel):
    path: str  # relative to the snapshot
    blob: str | None  # the blob's name (its hub hash); None when the snapshot holds a plain file
    size: int


class CachedSnapshot(BaseModel):
    """One repo at one commit, as it sits in a Hugging Face cache."""

    repo_id: str
    folder: str  # models--org--name
    commit: str
    refs: dict[str, str]  # e.g. {"main": commit}
    files: list[CachedFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.unique_blobs())

    def unique_blobs(self) -> list[CachedFile]:
        seen: dict[str, CachedFile] = {}
        for f in self.files:
            seen.setdefault(f.blob or "file:" + f.path, f)
        return list(seen.values())


class CopyError(RuntimeError):
    pass


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def read_snapshot(snapshot_dir: str | Path, repo_id: str) -> CachedSnapshot:
    """The manifest of a snapshot directory that ``huggingface_hub`` made (``.../snapshots/<commit>``)."""
    snap = Path(snapshot_dir)
    repo = snap.parent.parent
    refs = {}
    for ref in sorted((repo / "refs").rglob("*")) if (repo / "refs").is_dir() else []:
        if ref.is_file() and ref.read_text().strip() == snap.name:
            refs[ref.relative_to(repo / "refs").as_posix()] = snap.name
    files = []
    for path in sorted(p for p in snap.rglob("*") if p.is_file()):
        blob = Path(os.readlink(path)).name if path.is_symlink() else None
        files.append(CachedFile(path=path.relative_to(snap).as_posix(), blob=blob, size=path.stat().st_size))
    return CachedSnapshot(repo_id=repo_id, folder=repo.name, commit=snap.name, refs=refs, files=files)


def content_hash(path: Path, name: str) -> str | None:
    """The digest the hub names this blob by, or None when the name is no hash we know (then the size
    alone is checked): SHA-256 of the content for LFS files, the git blob SHA-1 for the others."""
    if len(name) == 64:
        h = hashlib.sha256()
    elif len(name) == 40:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    else:
        return None
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


class CacheWriter:
    """Rebuilds cache entries in one host's Hugging Face cache (the Ray actor ``models pull`` starts
    on each host; a plain class, so it is tested without Ray)."""

    def __init__(self, cache: str | None = None) -> None:
        self.cache = Path(cache) if cache else hub_cache()

    def where(self) -> str:
        return str(self.cache)

    def _target(self, snap: CachedSnapshot, f: CachedFile) -> Path:
        repo = self.cache / snap.folder
        return repo / "blobs" / f.blob if f.blob else repo / "snapshots" / snap.commit / f.path

    def progress(self, snap: CachedSnapshot) -> dict[str, int]:
        """Bytes already here per file to send (key: blob or path): its size when complete, else
        the length of its partial copy (0 when there is none)."""
        out = {}
        for f in snap.unique_blobs():
            final = self._target(snap, f)
            partial = final.with_name(final.name + ".incomplete")
            key = f.blob or f.path
            if final.exists() and final.stat().st_size == f.size:
                out[key] = f.size
            else:
                out[key] = partial.stat().st_size if partial.exists() else 0
        return out

    def write(self, snap: CachedSnapshot, key: str, offset: int, data: bytes) -> int:
        f = self._file(snap, key)
        partial = self._target(snap, f).with_name(self._target(snap, f).name + ".incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if have != offset:
            raise CopyError(f"{f.path}: chunk at byte {offset}, but {have} bytes are here")
        with open(partial, "ab") as out:
            out.write(data)
        return offset + len(data)

    def finish(self, snap: CachedSnapshot, key: str) -> None:
        """Check the received file against the hub's hash (or its size) and move it into place."""
        f = self._file(snap, key)
        final = self._target(snap, f)
        partial = final.with_name(final.name + ".incomplete")
        if final.exists() and final.stat().st_size == f.size and not partial.exists():
            return
        if f.size == 0:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.touch()
        size = partial.stat().st_size if partial.exists() else -1
        digest = content_hash(partial, f.blob) if f.blob and size == f.size else None
        if size != f.size or (digest is not None and digest != f.blob):
            partial.unlink(missing_ok=True)
            what = f"{size} bytes, expected {f.size}" if size != f.size else f"hash {digest}, expected {f.blob}"
            raise CopyError(f"{f.path}: received {what}; the partial copy was removed, run the pull again")
        os.replace(partial, final)

    def link(self, snap: CachedSnapshot) -> str:
        """The snapshot's links to its blobs and the refs naming the commit: what makes the entry
        loadable offline. Returns the snapshot directory."""
        repo = self.cache / snap.folder
        snap_dir = repo / "snapshots" / snap.commit
        for f in snap.files:
            if not f.blob:
                continue
            link = snap_dir / f.path
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(repo / "blobs" / f.blob, link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        for name, commit in snap.refs.items():
            ref = repo / "refs" / name
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
        return str(snap_dir)

    @staticmethod
    def _file(snap: CachedSnapshot, key: str) -> CachedFile:
        for f in snap.files:
            if (f.blob or f.path) == key:
                return f
        raise CopyError(f"{key} is not part of {snap.repo_id}@{snap.commit}")

    def models(self) -> list[dict[str, Any]]:
        """What this host's cache holds: repo, commit, refs, bytes (``models list``)."""
        out = []
        for repo in sorted(self.cache.glob("models--*")):
            repo_id = repo.name[len("models--"):].replace("--", "/")
            refs = {r.relative_to(repo / "refs").as_posix(): r.read_text().strip()
                    for r in (repo / "refs").rglob("*") if r.is_file()} if (repo / "refs").is_dir() else {}
            for snap in sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []:
                files = [p for p in snap.rglob("*") if p.is_file()]
                if not files:
                    continue
                complete = all(p.exists() for p in snap.rglob("*") if p.is_symlink())
                out.append({"repo_id": repo_id, "commit": snap.name, "complete": complete,
                            "refs": sorted(n for n, c in refs.items() if c == snap.name),
                            "bytes": sum(p.stat().st_size for p in files)})
        return out


def send(call: Callable[..., Callable[[], Any]], snap: CachedSnapshot, source_dir: str | Path, *,
         advance: Callable[[int], None] = lambda n: None, resumed: Callable[[str, int], None] = lambda p, n: None,
         chunk_bytes: int = CHUNK_BYTES) -> str:
    """Send what a host lacks of ``snap`` and link it there; returns the snapshot directory there.

    ``call(method_name, *args)`` starts a ``CacheWriter`` method on the host and returns what waits
    for its result (a Ray actor call in production, so up to ``IN_FLIGHT`` chunks travel at once).
    ``advance(n)`` reports bytes found there or sent; ``resumed(path, n)`` a partial copy continued.
    """
    src = Path(source_dir)
    have = call("progress", snap)()
    advance(sum(have[f.blob or f.path] for f in snap.unique_blobs()))
    for f in snap.unique_blobs():
        key, offset = f.blob or f.path, have[f.blob or f.path]
        if 0 < offset < f.size:
            resumed(f.path, offset)
        pending: list[tuple[Callable[[], Any], int]] = []
        with open(src / f.path, "rb") as data:
            data.seek(offset)
            while block := data.read(chunk_bytes):
                pending.append((call("write", snap, key, offset, block), len(block)))
                offset += len(block)
                if len(pending) >= IN_FLIGHT:
                    wait, n = pending.pop(0)
                    wait()
                    advance(n)
        for wait, n in pending:
            wait()
            advance(n)
        call("finish", snap, key)()
    return call("link", snap)()
