"""The benchmarks' ``--quick`` smoke runs, and the pieces their statistics rules rest on (issue #16).

Each script runs as a user starts it (``python loadtests/bench_X.py --quick --json OUT``) in a
subprocess with its own HOME, model cache and Ray temp dir (the scripts that need Ray start a local
one, apart from the session's), and its JSON must say what docs/benchmarks.md promises: the ratio
keys, one value per repetition, medians that are the medians of those values, no void phase (or a
void one that lists its errors), fresh prompts per phase, tokens generated. The helpers are checked
against real faults on 127.0.0.1: a refused connect is retried, a broken or short stream voids a phase,
an unclosed or invalid constrained output is counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import kill_processes_naming

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests import bench_features, bench_http  # noqa: E402
from loadtests.common import FreshPrompts, PhaseBudget, send_streaming, spread, warmup_per_client  # noqa: E402
from loadtests.json_subset import validate  # noqa: E402

DROP = ("MLX_SERVING_CACHE", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
        "MLX_SERVING_API_KEYS", "MLX_SERVING_ADMIN_KEYS", "PYTEST_CURRENT_TEST")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One HOME and model cache for the module's runs: the tiny demo model is built once."""
    return tmp_path_factory.mktemp("bench-home")


def run_quick(name: str, home: Path, out_dir: Path, ok_codes: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """``loadtests/<name>.py --quick --json OUT`` as a subprocess; its JSON."""
    out = out_dir / f"{name}.json"
    ray_tmp = Path(tempfile.mkdtemp(prefix="mlxq-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env.update(HOME=str(home), MLX_SERVING_CACHE=str(home / "cache"), RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, f"loadtests/{name}.py", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=280)
    finally:
        kill_processes_naming(ray_tmp)  # whatever Ray or server process a failed run left
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode in ok_codes, f"{name} exited {done.returncode}:\n{log}"
    assert out.is_file(), log
    return json.loads(out.read_text())


def assert_medians(doc: dict[str, Any], summary_key: str, repeats: int, keys: set[str]) -> None:
    """Every ratio has one value per repetition, and ``ratios`` holds their median."""
    summary = doc[summary_key]
    assert keys <= set(summary) and keys <= set(doc["ratios"]), (keys, sorted(summary))
    for k in keys:
        s = summary[k]
        assert len(s["values"]) == repeats, (k, s)
        xs = [v for v in s["values"] if v is not None]
        assert s["n"] == len(xs) and xs, (k, s)
        assert s["median"] == pytest.approx(statistics.median(xs)) and s["min"] <= s["median"] <= s["max"]
        assert doc["ratios"][k] == pytest.approx(s["median"])


def assert_fresh(ranges: list[list[int]]) -> None:
    """Prompt ranges ([start, end) of make_prompts indexes) that no two phases share."""
    spans = sorted(tuple(r) for r in ranges if r and r[1] > r[0])
    assert spans, ranges
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, spans


# -- the quick runs -----------------------------------------------------------------------------------
def test_bench_engine_quick(home: Path, tmp_path: Path) -> None:
    doc = run_quick("bench_engine", home, tmp_path)
    s = doc["settings"]
    levels, repeat = s["concurrency"], s["repeat"]
    keys = {f"engine_vs_batchgenerator_c{c}" for c in levels} | {f"engine_c{c}_vs_sequential" for c in levels}
    assert_medians(doc, "ratios_summary", repeat, keys)
    for path in ("engine", "batchgen"):
        for c in levels:
            r = doc["results"][path][str(c)]
            assert len(r["runs_tokens_per_s"]) == repeat
            assert r["generated_tokens"] == r["requests"] * s["max_tokens"] > 0
            assert r["tokens_per_request"] == [s["max_tokens"]]
    assert set(doc["targets"]) == {"engine_c1_vs_sequential"}  # --quick runs c=1,4: only the c=1 target applies
    assert s["warmup_requests"] == {"sequential": 2, **{str(c): 2 * c for c in levels}}  # 2 per client, every level
    t = doc["targets"]["engine_c1_vs_sequential"]
    assert t["target"] == 0.95 and t["value"] == doc["ratios"]["engine_c1_vs_sequential"]
    assert t["met"] == (t["value"] >= 0.95)


def test_bench_http_quick(home: Path, tmp_path: Path) -> None:
    doc = run_quick("bench_http", home, tmp_path)
    s = doc["settings"]
    assert s["levels"] == [1, 32] and s["repeats"] == 2 and s["stagger_ms"] > 0
    assert_medians(doc, "spread", s["repeats"], {"http_vs_engine_c1", "http_vs_engine_c32",
                                                 "http_vs_mlx_lm_server_c32"})
    phases = doc["phases"]
    assert len(phases) == s["repeats"] * len(s["levels"]) * len(s["paths"])
    assert doc["void_phases"] == sum(p["void"] for p in phases) == 0, [p["error_list"] for p in phases if p["void"]]
    for p in phases + doc["warmup"]:
        warm = s["warmup_requests_per_client"][str(p["concurrency"])]
        assert p["requests"] >= p["concurrency"] * (s["requests_per_client"] if "repetition" in p else warm)
        assert p["tokens"] == p["requests"] * s["max_tokens"] > 0 and p["short_requests"] == p["errors"] == 0
    assert len(doc["warmup"]) == len(s["levels"]) * len(s["paths"])
    assert_fresh([p["prompts"] for p in phases + doc["warmup"]])
    for rep in range(s["repeats"]):  # every path at every level before the next repetition
        assert {(p["path"], p["concurrency"]) for p in phases if p["repetition"] == rep} == {
            (path, c) for path in s["paths"] for c in s["levels"]}
    assert [p["repetition"] for p in phases] == sorted(p["repetition"] for p in phases)
    for k, t in doc["targets"].items():
        assert t["value"] == doc["spread"][k]["median"] and t["met"] == (t["value"] >= t["target"])
    assert {r["path"] for r in doc["results"]} == set(s["paths"])
    worker = {"engine": "bench process (clients, in-process engine)", "http": "serve replica model-bench",
              "mlx_lm_server": "mlx_lm.server"}
    for p in phases:  # where the CPU went: each path's work shows in its own process
        roles = {k: v["cpu_s"] for k, v in p["cpu"]["by_role"].items()}
        assert roles[worker[p["path"]]] > 0 and p["cpu"]["cores_busy"] > 0, roles
        if p["path"] == "http":
            assert roles["serve replica ingress"] > 0 and roles["serve proxy"] > 0, roles
        else:  # the Serve model replica idles meanwhile
            assert roles.get("serve replica model-bench", 0) < roles[worker[p["path"]]], roles


def test_bench_features_quick(home: Path, tmp_path: Path) -> None:
    doc = run_quick("bench_features", home, tmp_path)
    s = doc["settings"]
    c, repeat = s["clients"], s["repeat"]
    keys = {f"constrained_vs_free_c{c}", "prefix_cache_ttft_speedup", "batch_tps_with_speculative_vs_alone",
            "spec_request_tps_vs_batch_request_tps"}
    assert repeat == 2
    assert_medians(doc, "spread", repeat, keys)
    phases = doc["phases"]
    assert doc["void_phases"] == sum(p["void"] for p in phases) == 0, [p["error_list"] for p in phases if p["void"]]
    series = [p["path"] for p in phases]
    for name in ("free", "constrained", "prefix_cache_on", "prefix_cache_off", "batch_alone", "batch_with_speculative"):
        assert series.count(name) == repeat, name
    for p in phases:
        assert p["generated_tokens"] > 0 and p["requests"] >= 1
    constrained = [p for p in phases if p["path"] == "constrained"]
    assert all(p["invalid_outputs"] == 0 and p["finish_reasons"].keys() <= {"stop", "tool_calls"} for p in constrained)
    ch = doc["checks"]["constrained"]
    assert ch["outputs"] == sum(p["requests"] for p in constrained) > 0 and ch["invalid"] == 0
    assert set(ch["finish_reasons"]) == {"stop", "tool_calls"}
    assert ch["schema_longest_output_bytes"] <= s["constrained_max_tokens"]
    free = [p for p in phases if p["path"] == "free"]
    assert all(p["finish_reasons"] == {"length": p["requests"]} for p in free)  # runs to the calibrated length
    assert_fresh([p["prompts"] for p in phases + doc["warmup"] if "prompts" in p])
    assert doc["checks"]["prefix"]["identical_outputs_on_vs_off"].split("/")[0] == \
        doc["checks"]["prefix"]["identical_outputs_on_vs_off"].split("/")[1] != "0"
    t = doc["targets"][f"constrained_vs_free_c{c}"]
    assert t["value"] == doc["spread"][f"constrained_vs_free_c{c}"]["median"]


def test_bench_scaling_quick(home: Path, tmp_path: Path) -> None:
    """Two loopback Ray nodes, the one-replica and two-replica apps side by side, interleaved phases."""
    doc = run_quick("bench_scaling", home, tmp_path)
    s = doc["settings"]
    assert s["repeats"] == 2 and s["gpus"] == 0 and s["stagger_ms"] > 0
    assert s["apps"]["one"]["placements"] == ["node-1"] and s["apps"]["two"]["placements"] == ["node-1", "node-2"]
    assert len(s["apps"]["two"]["proxies"]) == 2 and all("127.0.0.1" in b for b in s["apps"]["two"]["proxies"])
    assert_medians(doc, "spread", s["repeats"], {"two_replicas_vs_one"})
    phases = doc["phases"]
    assert doc["void_phases"] == sum(p["void"] for p in phases) == 0, [p["error_list"] for p in phases if p["void"]]
    for rep in range(s["repeats"]):  # both apps in every repetition, the order rotating
        order = [p["path"] for p in phases if p["repetition"] == rep]
        assert sorted(order) == ["one", "two"] and order[0] == ["one", "two"][rep % 2]
    clients = {"one": s["clients_per_replica"], "two": 2 * s["clients_per_replica"]}
    for p in phases + doc["warmup"]:
        per_client = s["requests_per_client"] if "repetition" in p else s["warmup_requests_per_client"]
        assert p["concurrency"] == clients[p["path"]] and p["requests"] >= p["concurrency"] * per_client
        assert p["tokens"] == p["requests"] * s["max_tokens"] > 0 and p["short_requests"] == p["errors"] == 0
    assert_fresh([r for p in phases + doc["warmup"] for r in p["prompts"]])
    by = {(p["repetition"], p["path"]): p["tokens_per_s"] for p in phases}
    assert doc["spread"]["two_replicas_vs_one"]["values"] == [
        pytest.approx(by[(r, "two")] / by[(r, "one")]) for r in range(s["repeats"])]


def test_bench_routing_quick(home: Path, tmp_path: Path) -> None:
    """Every path in every round, fresh prompts, no void round, ratios against direct per round."""
    doc = run_quick("bench_routing", home, tmp_path)
    s = doc["settings"]
    assert s["rounds"] == 2 and s["concurrency"] == 4 and s["quick"]
    paths = doc["paths"]
    assert set(paths) == {"direct", "route-1", "route-2", "proxied"} and doc["void_rounds"] == 0
    rounds = [r for p in paths.values() for r in p["rounds"]]
    for p in paths.values():
        assert len(p["rounds"]) == s["rounds"] and p["median_tokens_per_s"] > 0
    for r in rounds:
        assert r["tokens"] == s["concurrency"] * s["requests_per_client"] * s["max_tokens"] and r["errors"] == 0
    assert_fresh([r["prompts"] for r in rounds + list(doc["warmup"].values())])
    assert_medians(doc, "spread", s["rounds"], {"route_1_vs_direct", "route_2_vs_direct", "proxied_vs_direct"})
    for i in range(s["rounds"]):
        direct = paths["direct"]["rounds"][i]["tokens_per_s"]
        assert doc["spread"]["proxied_vs_direct"]["values"][i] == pytest.approx(
            paths["proxied"]["rounds"][i]["tokens_per_s"] / direct)
    assert doc["unary_choose"]["choose_p50_ms"] > 0


def test_bench_priority_quick(home: Path, tmp_path: Path) -> None:
    doc = run_quick("bench_priority", home, tmp_path, ok_codes=(0, 1))  # 1: a target not met (tiny model, 2 cores)
    s = doc["settings"]
    assert s["repeats"] == 2 and len(doc["repetitions"]) == 2
    assert_medians(doc, "ratios_summary", 2, {"interactive_ttft_p50_loaded_vs_idle", "batch_tokens_loaded_vs_alone"})
    for rep in doc["repetitions"]:
        assert set(rep) == set(s["phases"])
        for p in rep.values():
            assert not p["void"] or p["first_error"], p  # a void phase says why
            assert p["interactive_requests"] + p["batch_requests"] > 0
        assert rep["alone"]["batch_tokens"] > 0 and rep["idle"]["interactive_requests"] > 0


def test_bench_prefix_routing_quick(home: Path, tmp_path: Path) -> None:
    doc = run_quick("bench_prefix_routing", home, tmp_path, ok_codes=(0, 1))  # 1: the 2x goal not met
    s = doc["settings"]
    assert len(doc["repetitions"]) == s["repeats"] >= 1
    assert_medians(doc, "ratios_summary", s["repeats"], {"prefix_routing_ttft_p50_speedup"})
    for rep in doc["repetitions"]:
        for p in rep.values():
            assert not p["void"], p["first_error"]
            assert p["requests"] == s["users"] * s["turns"] and p["tokens_per_s"] > 0
        assert rep["prefix"]["cached_prompt_fraction_after_first_turn"] > 0.5  # later turns found their history


# -- the helpers, on real faults --------------------------------------------------------------------
def test_spread_leaves_void_repetitions_out() -> None:
    s = spread([1.0, None, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"], s["values"]) == (2.0, 1.0, 3.0, 3, [1.0, None, 3.0, 2.0])
    assert spread([None])["median"] is None


def test_phase_budget_needs_count_and_time_and_stops_at_three_times(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("loadtests.common.time.perf_counter", lambda: now[0])
    b = PhaseBudget(per_client=3, min_s=20.0)
    assert b.more(0) and b.more(2)
    assert b.more(3)  # the count is reached, the time is not
    now[0] += 20.0
    assert not b.more(3) and b.more(2)  # both reached; a client short of its count goes on
    now[0] += 40.0
    assert not b.more(0)  # 3x the time: stop whatever happens
    cpu = PhaseBudget(per_client=3)
    assert cpu.more(2) and not cpu.more(3)


def test_warmup_on_a_gpu_sends_64_requests_a_level_and_2_per_client_at_least(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loadtests.common.on_gpu", lambda: True)
    assert [warmup_per_client(None, n, quick=False) for n in (1, 8, 32, 64)] == [64, 8, 2, 2]
    assert warmup_per_client(None, 1, quick=True) == 2 and warmup_per_client(5, 1, quick=False) == 5
    monkeypatch.setattr("loadtests.common.on_gpu", lambda: False)
    assert warmup_per_client(None, 1, quick=False) == 2 and warmup_per_client(0, 1, quick=False) == 0


def test_fresh_prompts_never_repeat_and_each_phase_starts_a_cycle() -> None:
    p = FreshPrompts()
    p.phase()
    a = [p.take() for _ in range(5)]
    first = p.used()
    p.phase()
    b = [p.take() for _ in range(5)]
    assert not set(a) & set(b) and first == [0, 5]
    assert p.used() == [8, 13]  # the next phase starts where the cycle of prompt lengths starts


class _Server:
    """A tiny HTTP server on 127.0.0.1 that answers every request with ``body`` (raw bytes)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.server: asyncio.AbstractServer | None = None

    async def start(self, port: int = 0) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.body)
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connect_is_retried_until_the_server_listens() -> None:
    port = _free_port()  # nothing listens there: a real refused connect
    server = _Server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    attempts: list[str] = []

    class Transport(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                response = await super().handle_async_request(request)
            except httpx.ConnectError:
                attempts.append("refused")
                if len(attempts) == 2:  # the server comes up after the second refusal
                    await server.start(port)
                raise
            attempts.append("connected")
            return response

    async def go() -> tuple[int, int, bytes]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", transport=Transport()) as h:
            r, retries = await send_streaming(h, "/x", {"a": 1}, backoff_s=0.001)
            body = await r.aread()
            await r.aclose()
        await server.stop()
        return r.status_code, retries, body

    assert asyncio.run(go()) == (200, 2, b"ok")
    assert attempts == ["refused", "refused", "connected"]


def test_a_connect_still_refused_after_the_retries_fails() -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{_free_port()}") as h:
            await send_streaming(h, "/x", {}, retries=2, backoff_s=0.001)

    with pytest.raises(httpx.ConnectError):
        asyncio.run(go())


def _sse(*events: str) -> bytes:
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body


def _chunk(text: str, finish: str | None = None) -> str:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})


def _usage(n: int) -> str:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m", "choices": [],
                       "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})


ERROR_EVENT = json.dumps({"error": {"message": "replica died", "type": "server_error", "param": None,
                                    "code": "replica_died"}})


@pytest.mark.parametrize("body, reason", [
    (_sse(_chunk("ab"), _chunk("cd", "length"), _usage(4), "[DONE]"), None),
    (_sse(_chunk("ab"), _chunk("c", "length"), _usage(3), "[DONE]"), "short"),
    (_sse(_chunk("ab")), "broken stream"),
    (_sse(_chunk("ab"), ERROR_EVENT, "[DONE]"), "error event"),
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops", "HTTP 500"),
])
def test_an_http_phase_with_a_failed_request_is_void(body: bytes, reason: str | None) -> None:
    import openai_types

    async def go() -> dict[str, Any]:
        server = _Server(body)
        port = await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as h:
                rec = await bench_http.http_request(h, "m", "hello", 4, {})
        finally:
            await server.stop()
        return bench_http.summarize("http", 1, 1.0, [rec])

    with openai_types.capture() as seen:  # the broken answers are meant to break the OpenAI format
        s = asyncio.run(go())
    assert s["void"] == (reason is not None)
    if reason:
        assert reason in s["error_list"][0], s["error_list"]
    else:
        assert s["tokens"] == 4 and s["error_list"] == [] and seen.violations == []  # a well-formed stream


def test_the_subset_validator_agrees_with_jsonschema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = bench_features.SCHEMA
    values = [
        bench_features.WIDEST,
        {**bench_features.WIDEST, "title": "a" * 13},
        {**bench_features.WIDEST, "title": "A title"},
        {**bench_features.WIDEST, "category": "cooking"},
        {**bench_features.WIDEST, "rating": 6},
        {**bench_features.WIDEST, "rating": 2.5},
        {**bench_features.WIDEST, "rating": True},
        {**bench_features.WIDEST, "tags": []},
        {**bench_features.WIDEST, "tags": ["a", "b", "c"]},
        {**bench_features.WIDEST, "extra": 1},
        {k: v for k, v in bench_features.WIDEST.items() if k != "tags"},
        [],
    ]
    for v in values:
        assert (validate(v, schema) == []) == jsonschema.Draft202012Validator(schema).is_valid(v), v
    assert validate(bench_features.WIDEST, schema) == []
    with pytest.raises(ValueError, match="outside the subset"):
        validate({}, {"type": "object", "uniqueItems": True})


def test_a_constrained_output_must_close_parse_and_validate() -> None:
    from engine.request import ToolCallDelta

    def rec(kind: str, finish: str, text: str = "", calls: list[Any] | None = None) -> dict[str, Any]:
        return {"kind": kind, "finish": finish, "text": [text], "calls": calls or [], "tokens": 10, "error": None,
                "ids": []}

    good = json.dumps(bench_features.WIDEST)
    grammar_ok = lambda r: True  # noqa: E731 - the grammar replay is the engine's; here the parse and schema
    check = bench_features.check_constrained
    assert check(rec("json", "stop", good), grammar_ok) is None
    assert "did not close" in check(rec("json", "length", good[:20]), grammar_ok)
    assert "invalid JSON" in check(rec("json", "stop", good[:-1]), grammar_ok)
    assert "schema" in check(rec("json", "stop", json.dumps({**bench_features.WIDEST, "rating": 9})), grammar_ok)
    assert "grammar" in check(rec("json", "stop", good), lambda r: False)
    call = [ToolCallDelta(index=0, id="c1", name="publish_article", arguments=good)]
    assert check(rec("tool", "tool_calls", calls=call), grammar_ok) is None
    assert "did not close" in check(rec("tool", "length", calls=call), grammar_ok)
    wrong = [ToolCallDelta(index=0, id="c1", name="other", arguments=good)]
    assert "publish_article" in check(rec("tool", "tool_calls", calls=wrong), grammar_ok)


def test_engine_spread_pauses_each_request_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_http's engine_spread path: a pause drawn from 0..spread_ms before each send, reproducible
    from its seed, with the prompt passed on unchanged."""
    pauses: list[float] = []
    sent: list[str] = []

    async def fake_sleep(delay: float) -> None:
        pauses.append(delay)

    async def send(prompt: str) -> dict[str, Any]:
        sent.append(prompt)
        return {"prompt": prompt}

    async def go(seed: int) -> list[dict[str, Any]]:
        spread_send = bench_http.spread_sender(send, 30.0, seed)
        return [await spread_send(f"p{i}") for i in range(50)]

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    recs = asyncio.run(go(1))
    first = list(pauses)
    assert [r["prompt"] for r in recs] == sent == [f"p{i}" for i in range(50)]
    assert len(first) == 50 and all(0.0 <= p <= 0.030 for p in first) and len(set(first)) == 50
    assert max(first) > 0.02 and min(first) < 0.01  # spread over the range, not one fixed delay
    pauses.clear()
    asyncio.run(go(1))
    assert pauses == first
