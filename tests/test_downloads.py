"""Hub downloads for real, over HTTP from a local fake hub (tests/fake_hub.py): the bytes' progress
reaches the caller, ``plan`` reads a model's size from the hub's safetensors headers, a replica
shows ``downloading`` in ``/ready`` before it serves, and ``up``'s wait counts from the last progress."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import ray_log_lines
from fake_hub import FakeHub

COMMIT = "e" * 40
PADDING = 24 * 2**20  # huggingface_hub reports a file's bytes every 10 MiB: a model this size shows steps


@pytest.fixture(scope="module")
def big_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model plus 24 MiB of notes.txt, which mlx-lm's patterns fetch and its loader ignores."""
    import shutil

    out = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "notes.txt").write_bytes(b"x" * PADDING)
    return out


@pytest.fixture()
def online_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A hub at http://127.0.0.1, and an empty cache: this process downloads for real."""
    from huggingface_hub import constants, hf_api

    hub = FakeHub(delay_s=0.001)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # the module's client, made at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield hub
    hub.close()


def test_a_download_reports_its_bytes_and_plan_reads_the_hub_headers(online_hub: FakeHub, tiny_model_dir: Path,
                                                                     big_model_dir: Path) -> None:
    from cluster.placement import hub_weight_bytes, model_weight_bytes
    from engine.sources import download

    online_hub.publish("acme/chat", big_model_dir, COMMIT)
    # The planner measures the model from its safetensors header, over HTTP, before any download.
    assert hub_weight_bytes("acme/chat", None) == model_weight_bytes(str(tiny_model_dir))
    seen: list[tuple[int, int]] = []
    snap = Path(download("acme/chat", progress=lambda done, total: seen.append((done, total))))
    assert snap.name == COMMIT and (snap / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    # What mlx-lm loads, less config.json: fetched first, alone, to tell a vision model from a text one.
    total = sum(f.stat().st_size for f in big_model_dir.iterdir() if f.name not in ("README.md", "config.json"))
    assert seen[-1] == (total, total)
    done = [d for d, _ in seen]
    assert done == sorted(done) and len({d for d, t in seen if 0 < d < total and t == total}) >= 2, seen
    seen.clear()
    download("acme/chat", progress=lambda done, total: seen.append((done, total)))
    assert seen == []  # in the cache: nothing to download


def test_ready_shows_a_replica_downloading_then_it_serves(app_url: str, big_model_dir: Path, tmp_path: Path) -> None:
    from ray import serve

    from deployments.app import build_app

    hub = FakeHub(delay_s=0.015)  # 390 pieces of 64 KiB: about 6 s of download
    hub.publish("acme/slow", big_model_dir, COMMIT)
    model = {"name": "hubby", "source": "acme/slow", "num_cpus": 0,
             "env_vars": {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache")}}
    deploy = threading.Thread(target=serve.run, args=(build_app({"models": [model]}),),
                              kwargs={"name": "dl", "route_prefix": "/dl"}, daemon=True)
    deploy.start()
    seen: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            r = httpx.get(app_url + "/dl/ready", timeout=10)
            if r.status_code in (200, 503) and r.headers.get("content-type", "").startswith("application/json"):
                m = r.json()["models"][0]
                seen.append(m)
                if m["ready"]:
                    break
            time.sleep(0.3)
        downloading = [m for m in seen if m["loading"] and m["loading"][0]["phase"] == "downloading"]
        assert downloading, seen
        first = downloading[0]
        assert not first["ready"] and "downloading" in first["detail"] and " MiB" in first["detail"]
        assert any(0 < m["loading"][0]["done_bytes"] < m["loading"][0]["total_bytes"] for m in downloading), downloading
        assert seen[-1]["ready"] and seen[-1]["loading"] == []
        chat = httpx.post(app_url + "/dl/v1/chat/completions", timeout=60, json={
            "model": "hubby", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
        assert any("downloading acme/slow: " in line.get("msg", "") for line in ray_log_lines("downloading acme/slow"))
    finally:
        deploy.join(timeout=60)
        serve.delete("dl")
        hub.close()


class ScriptedReady:
    """A /ready that answers from a script: a list of bodies, one per request, the last one repeated."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        script = list(bodies)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = script.pop(0) if len(script) > 1 else script[0]
                data = json.dumps(body).encode()
                self.send_response(200 if body["ready"] else 503)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def downloading(done: int) -> dict[str, Any]:
    return {"ready": False, "models": [{"name": "m", "ready": False, "replicas_healthy": 0, "replicas_target": 1,
                                        "loading": [{"replica": "r1", "phase": "downloading", "done_bytes": done,
                                                     "total_bytes": 10}]}]}


def test_up_waits_while_a_download_progresses_and_gives_up_when_it_stalls(capsys: pytest.CaptureFixture) -> None:
    from cluster.local import ReadyPrinter, wait_ready

    ready = {"ready": True, "models": [{"name": "m", "ready": True, "replicas_healthy": 1, "replicas_target": 1}]}
    # Six answers a second apart, each further along: longer than the 2.5 s timeout, never 2.5 s without progress.
    moving = ScriptedReady([downloading(d) for d in (1, 3, 5, 7, 9)] + [ready])
    printer = ReadyPrinter()
    assert wait_ready(moving.url, timeout_s=2.5, progress=printer, models=["m"])["ready"]
    printer.close()
    assert "m: 0 of 1 replicas running" in capsys.readouterr().out
    stalled = ScriptedReady([downloading(4)])
    with pytest.raises(TimeoutError, match="no progress for 2s"):
        wait_ready(stalled.url, timeout_s=2.0, models=["m"])
