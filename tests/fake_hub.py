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


# -- over HTTP --------------------------------------------------------------------------------------

class FakeHub:
    """The hub's HTTP API for the calls huggingface_hub makes to download a repo (``repo_info``,
    the file tree, ``HEAD``/``GET`` of ``resolve`` URLs with ranges), serving model directories
    published at a commit. ``delay_s`` slows each 64 KiB of a download: a slow link, for real.
    Point a client at it with ``HF_ENDPOINT=hub.url``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.repos: dict[str, tuple[str, Path]] = {}  # repo id -> (commit, directory)
        self.delay_s = delay_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, repo_id: str, model_dir: Path, commit: str) -> None:
        self.repos[repo_id] = (commit, model_dir)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _entry(self, path: Path, root: Path) -> dict:
        size = path.stat().st_size
        out = {"type": "file", "path": path.relative_to(root).as_posix(), "size": size}
        if path.suffix in LFS_SUFFIXES:
            blob = path.read_bytes()
            out.update(oid=hashlib.sha1(b"blob %d\0" % size + blob).hexdigest(),
                       lfs={"oid": blob_name(path), "size": size, "pointerSize": 134})
        else:
            out["oid"] = blob_name(path)
        return out

    def _handler(self) -> type:
        import json
        import re
        import time
        from http.server import BaseHTTPRequestHandler

        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, body: object, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _repo(self, repo_id: str, rev: str) -> tuple[str, Path] | None:
                found = hub.repos.get(repo_id)
                if found is None or rev not in ("main", found[0]):
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound" if found is None else "RevisionNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return found

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                    if found := self._repo(m[1], m[2]):
                        commit, root = found
                        files = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
                        self._json({"id": m[1], "modelId": m[1], "sha": commit, "private": False,
                                    "siblings": [{"rfilename": f} for f in files]})
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                    if found := self._repo(m[1], m[2]):
                        root = found[1]
                        self._json([hub._entry(p, root) for p in sorted(root.rglob("*")) if p.is_file()])
                elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    if found := self._repo(m[1], m[2]):
                        self._file(found, m[3], body)
                else:
                    self._json({"error": "not found"}, 404)

            def _file(self, found: tuple[str, Path], name: str, body: bool) -> None:
                commit, root = found
                path = root / name
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                if r := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                    start, end = int(r[1]), min(int(r[2]) if r[2] else end, end)
                self.send_response(206 if self.headers.get("Range") else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{blob_name(path)}"')
                if path.suffix in LFS_SUFFIXES:
                    self.send_header("X-Linked-Etag", f'"{blob_name(path)}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(end - start + 1))
                if self.headers.get("Range"):
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                for i in range(start, end + 1, 65536):
                    self.wfile.write(data[i:min(i + 65536, end + 1)])
                    if hub.delay_s:
                        time.sleep(hub.delay_s)

        return Handler
