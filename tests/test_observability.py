"""Metrics, request ids, structured logs, the dashboard's metric names and a Locust smoke run."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port, no_eos, ray_log_lines

ROOT = Path(__file__).resolve().parent.parent


# -- engine metrics (prometheus-client, in-process) ------------------------------------------------
def _bias_eos(engine, model: str) -> dict[int, float]:
    tok = engine.tokenize(model, "<|im_end|>")
    return {t: -100.0 for t in tok}


def test_prometheus_observer_follows_the_engine(tiny_model_dir: Path) -> None:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.errors import DeadlineExceededError
    from engine.metrics import PrometheusObserver

    obs = PrometheusObserver(memory_interval_s=0.0)
    engine = Engine(EngineConfig(max_batch_size=4), observer=obs)
    obs.attach(engine)
    v = obs.value

    async def scenario() -> tuple[list[Any], int, int]:
        await engine.load_model("m", str(tiny_model_dir))
        bias = _bias_eos(engine, "m")
        reqs = [{"model": "m", "prompt": f"Tell me about number {i}" + " please" * i,
                 "sampling": {"max_tokens": 5 + i, "temperature": 0, "logit_bias": bias}} for i in range(6)]
        results = await asyncio.gather(*[engine.complete(r) for r in reqs])
        # one that waits past its deadline (an engine error with a code) ...
        with pytest.raises(DeadlineExceededError):
            await engine.complete({"model": "m", "prompt": "late", "timeout_s": 1e-6})
        # ... and one whose consumer goes away mid-stream (a cancellation)
        gen = engine.generate({"model": "m", "prompt": "walk away", "sampling": {"max_tokens": 500, "logit_bias": bias}})
        await gen.__anext__()
        await gen.aclose()
        deadline = time.monotonic() + 30
        while v("mlx_serving_requests_cancelled_total", {"model": "m"}) != 1.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return results, sum(r.usage.prompt_tokens for r in results), engine.list_models()[0].nbytes

    try:
        results, prompt_tokens, nbytes = asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown(5))
    completion = sum(r.usage.completion_tokens for r in results)
    m = {"model": "m"}
    assert completion == sum(5 + i for i in range(6))
    assert v("mlx_serving_generation_tokens_total", m) == completion
    assert v("mlx_serving_prompt_tokens_total", m) == prompt_tokens
    assert v("mlx_serving_requests_finished_total", {"model": "m", "finish_reason": "length"}) == 6
    assert v("mlx_serving_e2e_request_latency_seconds_count", m) == 6
    assert v("mlx_serving_time_per_output_token_seconds_count", m) == 6
    # first tokens: the 6 finished, the cancelled one (it streamed a chunk) and none for the expired one
    assert v("mlx_serving_time_to_first_token_seconds_count", m) == 7
    assert v("mlx_serving_queue_wait_seconds_count", m) == 7  # admitted: the same 7
    ttft_mean = v("mlx_serving_time_to_first_token_seconds_sum", m) / 7
    e2e_mean = v("mlx_serving_e2e_request_latency_seconds_sum", m) / 6
    assert 0 < ttft_mean < e2e_mean
    assert v("mlx_serving_request_errors_total", {"model": "m", "code": "deadline_exceeded"}) == 1
    assert v("mlx_serving_requests_cancelled_total", m) == 1
    steps = v("mlx_serving_step_seconds_count", m)
    assert steps and steps >= max(5 + i for i in range(6))  # at least one step per token of the longest
    assert v("mlx_serving_batch_size_count", m) == steps
    assert v("mlx_serving_batch_size_sum", m) >= completion  # every generated token came out of a step
    assert v("mlx_serving_model_loads_total", m) == 1 and v("mlx_serving_model_load_seconds_count", m) == 1
    assert v("mlx_serving_model_weight_bytes", m) == nbytes > 0
    assert v("mlx_serving_process_resident_memory_bytes") > 10e6
    assert v("mlx_serving_mlx_peak_memory_bytes") is not None
    # attached: running / waiting are read from the engine at scrape time, so an idle engine says 0
    assert v("mlx_serving_requests_running", m) == 0 and v("mlx_serving_requests_waiting", m) == 0
    text = obs.exposition().decode()
    assert 'mlx_serving_time_to_first_token_seconds_bucket{le="0.005",model="m"}' in text


def test_observers_have_their_own_registries_and_serve_metrics() -> None:
    from engine.metrics import PrometheusObserver, serve_metrics

    a, b = PrometheusObserver(), PrometheusObserver()  # no "Duplicated timeseries" error
    a.on_finish("x", 3, 4, 0, 1.0, "stop")
    a.on_speculative("x", 10, 7)
    assert a.value("mlx_serving_generation_tokens_total", {"model": "x"}) == 4
    assert a.value("mlx_serving_accepted_draft_tokens_total", {"model": "x"}) == 7
    assert b.value("mlx_serving_generation_tokens_total", {"model": "x"}) is None
    # without attach(), running / waiting come from the last step
    a.on_step("x", 3, 0.01, 3, 2)
    assert a.value("mlx_serving_requests_running", {"model": "x"}) == 3
    assert a.value("mlx_serving_requests_waiting", {"model": "x"}) == 2
    port = free_port()
    server, thread = serve_metrics(a, port=port, addr="127.0.0.1")
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    assert 'mlx_serving_generation_tokens_total{model="x"} 4.0' in body


def test_tpot_uses_the_requests_ttft_when_given() -> None:
    from engine.metrics import PrometheusObserver

    obs = PrometheusObserver()
    obs.on_finish("x", 3, 11, 0, 2.0, "length", ttft_s=1.0)  # 10 tokens after the first in 1.0 s
    assert obs.value("mlx_serving_time_per_output_token_seconds_sum", {"model": "x"}) == pytest.approx(0.1)


# -- logs -----------------------------------------------------------------------------------------
def test_json_formatter_carries_the_request_id_and_extra_fields() -> None:
    from engine import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    log = logging.getLogger("mlx_serving.test_json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    token = logs.request_id_var.set("rid-" + "x" * 300)
    try:
        log.info("hello %s", "world", extra={"model": "m", "tokens": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logs.request_id_var.reset(token)
        log.removeHandler(handler)
    log.info("no request")
    first, second = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert first["msg"] == "hello world" and first["level"] == "INFO" and first["logger"] == "mlx_serving.test_json"
    assert first["model"] == "m" and first["tokens"] == 3
    assert first["request_id"].startswith("rid-x") and len(first["request_id"]) == logs.MAX_REQUEST_ID_CHARS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_events_are_json_lines_and_saturation_is_rate_limited() -> None:
    from deployments import logging as events
    from engine import logs

    stream = io.StringIO()
    logs.configure(stream=stream, fmt="json", force=True)
    try:
        events.router_event({"kind": "breaker", "route": "chat", "name": "canary", "from_state": "closed",
                             "to_state": "open", "reason": "5 consecutive failures"})
        events.router_event({"kind": "rollout", "route": "chat", "action": "rollback", "state": "rolled_back",
                             "canary_percent": 0.0, "reason": "error rate", "name": "x"})
        for _ in range(5):
            events.queue_saturated("m-rl-test", "engine", "full")
    finally:
        logs.configure(force=True)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    breaker, rollback, saturated = lines
    assert breaker["event"] == "breaker_transition" and breaker["level"] == "WARNING"
    assert breaker["variant"] == "canary" and breaker["to_state"] == "open"
    assert rollback["event"] == "rollback" and rollback["route"] == "chat" and rollback["name_"] == "x"
    assert saturated["event"] == "queue_saturated" and saturated["suppressed"] == 0  # 4 more held back


# -- HTTP middleware without Ray ------------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def record(self, *args: Any) -> None:
        self.calls.append(args)


def test_http_middleware_request_id_codes_and_metrics() -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from deployments.logging import annotate
    from deployments.metrics import HttpObservability

    rec = _Recorder()
    app = FastAPI()

    @app.post("/v1/ok")
    async def ok() -> JSONResponse:
        annotate(model="m")
        return JSONResponse({"ok": True}, headers={"x-mlx-variant": "m-canary"})

    @app.post("/v1/bad")
    async def bad() -> JSONResponse:
        return JSONResponse({"error": {"code": "invalid_request", "message": "no"}}, status_code=400)

    @app.post("/v1/stream")
    async def stream() -> StreamingResponse:
        annotate(model="m")

        async def gen():
            yield 'data: {"x":1}\n\n'
            yield 'data: {"error":{"code":"replica_died","message":"gone"}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-mlx-variant": "m"})

    app.add_middleware(HttpObservability, metrics=lambda: rec, access_log_enabled=False)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post("/v1/ok", headers={"x-request-id": "given-1"}), await c.post("/v1/ok"),
                    await c.post("/v1/bad"), await c.post("/v1/stream"), await c.post("/nowhere")]

    given, made, bad_r, stream_r, missing = asyncio.run(go())
    assert given.headers.get_list("x-request-id") == ["given-1"]
    assert made.headers["x-request-id"] and made.headers["x-request-id"] != "given-1"
    assert len({r.headers["x-request-id"] for r in (made, bad_r, stream_r, missing)}) == 4
    by_route = {c[0]: c for c in rec.calls}
    assert rec.calls[0][:5] == ("/v1/ok", "m", "m-canary", 200, "")
    assert by_route["/v1/bad"][:5] == ("/v1/bad", "", "", 400, "invalid_request")
    route, model, variant, status, code, duration, ttfb = by_route["/v1/stream"]
    assert (model, variant, status, code) == ("m", "m", 200, "replica_died") and 0 < ttfb <= duration
    assert by_route["unmatched"][3] == 404


# -- through the Serve app ------------------------------------------------------------------------
def test_request_id_round_trip_through_serve(app_url: str) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    rid = f"obs-{uuid.uuid4().hex}"
    r = httpx.post(app_url + "/v1/chat/completions", json=body, headers={"x-request-id": rid}, timeout=60)
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == [rid]
    a = httpx.post(app_url + "/v1/chat/completions", json=body, timeout=60)
    b = httpx.post(app_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert a.status_code == b.status_code == 200
    assert len(a.headers.get_list("x-request-id")) == 1 and len(b.headers.get_list("x-request-id")) == 1
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    err = httpx.post(app_url + "/v1/chat/completions", json={**body, "model": "nope"}, headers={"x-request-id": rid + "e"})
    assert err.status_code == 404 and err.headers["x-request-id"] == rid + "e"


def test_the_request_id_reaches_the_replica_and_every_log_line(app_url: str) -> None:
    """The secure app's deadline fails every generation in the engine: the replica logs the failure
    and the ingress its access line, both with the client's x-request-id."""
    rid = f"obs-log-{uuid.uuid4().hex}"
    r = httpx.post(app_url + "/secure/v1/chat/completions", timeout=60,
                   json={"model": "guarded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                   headers={"Authorization": "Bearer sk-test-key", "x-request-id": rid})
    assert r.status_code == 504 and r.headers["x-request-id"] == rid
    deadline = time.monotonic() + 30
    lines: list[dict] = []
    while time.monotonic() < deadline:
        lines = ray_log_lines(rid)
        if {x.get("component") for x in lines} >= {"ingress", "replica"}:
            break
        time.sleep(0.5)
    access = [x for x in lines if x.get("event") == "http_request"]
    failed = [x for x in lines if x.get("event") == "request_failed"]
    assert access and failed, lines
    assert access[0]["status"] == 504 and access[0]["code"] == "deadline_exceeded" and access[0]["model"] == "guarded"
    assert access[0]["component"] == "ingress" and access[0]["app"] == "secure"
    assert failed[0]["component"] == "replica" and failed[0]["code"] == "deadline_exceeded"
    assert failed[0]["completion_id"] == access[0]["completion_id"] and failed[0]["completion_id"].startswith("chatcmpl-")
    assert all(x["request_id"] == rid for x in lines)


def test_a_replica_below_normal_priority_says_so(app_url: str) -> None:
    """The session's cluster is plain ``ray.cluster_utils.Cluster``, not one mlx-serving started, so
    its workers run 15 below this process (Ray's ``nice(15)``): each replica records its niceness and
    warns with the fix."""
    niceness = min(os.getpriority(os.PRIO_PROCESS, 0) + 15, 19)
    started = [x for x in ray_log_lines('"replica_started"') if x.get("event") == "replica_started"]
    assert started and {x["niceness"] for x in started} == {niceness}, started
    warned = ray_log_lines("RAY_worker_niceness=0 ray start")
    assert warned and all(x["level"] == "WARNING" and x["component"] == "replica" for x in warned), warned
    assert f"runs at niceness {niceness}" in warned[0]["msg"]


def _scrape_ray() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            try:
                texts.append(httpx.get(f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=10).text)
            except httpx.HTTPError:
                pass
    if not texts:
        pytest.fail("no Ray node metrics endpoint answered")
    return "\n".join(texts)


def _sample_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_ray_exports_engine_and_http_metrics(app_url: str) -> None:
    """Ray's node metrics endpoint serves the replica's engine metrics and the ingress's HTTP metrics
    (as ray_mlx_serving_*), and they move with the traffic. The vLLM names that Ray's Serve LLM
    dashboard queries are there too (ray_vllm_*, with model_name and the WorkerId it joins on)."""
    from test_vllm_metrics import exported_dashboard_names

    before = _sample_sum(_scrape_ray(), "ray_mlx_serving_generation_tokens_total", model="demo", application="main")
    for _ in range(2):  # the same prompt twice (longer than a cache block): the second finds the first's prefix
        r = httpx.post(app_url + "/v1/completions", timeout=60,
                       json={"model": "demo", "prompt": "count me " * 12, "max_tokens": 7, "logit_bias": no_eos(app_url)})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
    with httpx.stream("POST", app_url + "/v1/completions", timeout=60,
                      json={"model": "demo", "prompt": "stream me", "max_tokens": 3, "stream": True}) as s:
        assert s.status_code == 200
        s.read()
    deadline = time.monotonic() + 60  # Ray exports every 10 s
    while True:
        text = _scrape_ray()
        after = _sample_sum(text, "ray_mlx_serving_generation_tokens_total", model="demo", application="main")
        http_ok = _sample_sum(text, "ray_mlx_serving_http_requests_total", route="/v1/completions", model="demo",
                              variant="demo", status="200", code="")
        ttfb = _sample_sum(text, "ray_mlx_serving_http_time_to_first_byte_seconds_count", route="/v1/completions")
        hits = _sample_sum(text, "ray_vllm_prefix_cache_hits_total", model_name="demo", application="main")
        if (after >= before + 14 and http_ok >= 3 and ttfb >= 1 and hits > 0) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert after >= before + 14, (before, after)
    assert http_ok >= 3 and ttfb >= 1 and hits > 0
    for name in ("ray_mlx_serving_time_to_first_token_seconds_bucket", "ray_mlx_serving_requests_running",
                 "ray_mlx_serving_process_resident_memory_bytes", "ray_mlx_serving_model_loads_total",
                 "ray_mlx_serving_model_weight_bytes"):
        assert re.search(rf'^{name}{{[^}}]*deployment="model-demo"', text, re.M), name

    # Ray's Serve LLM dashboard: every vLLM sample it queries (and we export), from the replica, with
    # model_name; and a WorkerId that Serve's own request counter of that replica carries too (the
    # dashboard joins the two on it to name the deployment and replica).
    def labels(line: str) -> dict[str, str]:
        return dict(re.findall(r'(\w+)="([^"]*)"', line.partition("{")[2].rpartition("}")[0]))

    serve_workers = {labels(x).get("WorkerId") for x in text.splitlines()
                     if x.startswith("ray_serve_deployment_request_counter_total{") and 'deployment="model-demo"' in x}
    serve_workers.discard(None)
    assert serve_workers, "Serve's request counter of model-demo carries no WorkerId"
    missing = []
    for name in exported_dashboard_names():
        lines = [labels(x) for x in text.splitlines() if x.startswith(name + "{")]
        ours = [x for x in lines if x.get("model_name") == "demo" and x.get("deployment") == "model-demo"]
        if not ours:
            missing.append(name)
        else:
            assert all(x.get("WorkerId") in serve_workers for x in ours), (name, ours[0], serve_workers)
    assert not missing, missing
    assert _sample_sum(text, "ray_vllm_generation_tokens_total", model_name="demo", application="main") == \
        _sample_sum(text, "ray_mlx_serving_generation_tokens_total", model="demo", application="main")


# -- config files ---------------------------------------------------------------------------------
def test_dashboard_and_scrape_config_use_exported_names() -> None:
    import yaml

    from deployments.metrics import HTTP_METRICS, ROUTER_METRICS
    from deployments.qos.metrics import QOS_METRICS
    from engine.metrics import ENGINE_METRICS

    prom = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "ray")
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]

    dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exported = set()
    for s in (*ENGINE_METRICS.values(), *HTTP_METRICS.values(), *ROUTER_METRICS.values(), *QOS_METRICS.values()):
        if s.kind == "counter":
            exported.add(s.full_name + "_total")
        elif s.kind == "histogram":
            exported |= {s.full_name + x for x in ("_bucket", "_sum", "_count")}
        else:
            exported.add(s.full_name)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\$\{prefix\}(mlx_serving_\w+)", e)}
    assert used and used <= exported, sorted(used - exported)
    assert not [e for e in exprs if re.search(r"(?<!\$\{prefix\})\bmlx_serving_", e)]  # always through ${prefix}
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for what in ("time to first token", "tokens/s", "running and waiting", "errors", "batch size", "memory",
                 "variant split", "slo burn rate", "slo met", "qos actions", "admission gate", "per api key"):
        assert what in titles, what
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))

    # The alert rules: well formed, on exported names (Ray's prefix), SLO burn on both windows.
    rules = [r for g in yaml.safe_load((ROOT / "config" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    for r in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(r) and r["labels"]["severity"], r
        names = set(re.findall(r"\bray_(mlx_serving_\w+)", r["expr"]))
        assert names and names <= exported, (r["alert"], names - exported)
    fast = next(r for r in rules if r["alert"] == "MlxServingSloFastBurn")
    assert 'window="1h"' in fast["expr"] and 'window="5m"' in fast["expr"] and "\nand\n" in fast["expr"]


# -- Locust ---------------------------------------------------------------------------------------
def test_locust_streaming_smoke(app_url: str, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    env = {**os.environ, "MLX_LOCUST_MODEL": "demo", "MLX_LOCUST_MAX_TOKENS": "8", "MLX_LOCUST_TURNS": "2"}
    locust = Path(sys.executable).with_name("locust")
    proc = subprocess.run(
        [str(locust), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "-u", "3", "-r", "3",
         "-t", "5s", "--host", app_url, "--csv", str(prefix), "--only-summary", "StreamingChatUser",
         "ConversationUser"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "smoke_stats.csv").open()))
    by_type = {(r["Type"], r["Name"]): r for r in rows}
    ttft = by_type[("TTFT", "chat [stream]")]
    assert int(ttft["Request Count"]) > 0 and float(ttft["Average Response Time"]) > 0
    post = by_type[("POST", "chat [stream]")]
    assert int(post["Request Count"]) >= int(ttft["Request Count"]) and int(post["Failure Count"]) == 0
    assert int(by_type[("TPS", "chat [stream]")]["Request Count"]) > 0
    for turn in ("first turn", "later turn"):  # conversations went past their first turn, without a failure
        assert int(by_type[("TTFT", f"conversation [{turn}]")]["Request Count"]) > 0
        assert int(by_type[("POST", f"conversation [{turn}]")]["Failure Count"]) == 0
    tokens = list(csv.DictReader((tmp_path / "smoke_tokens.csv").open()))[0]
    assert int(tokens["generated_tokens"]) > 0


CANARY_CHECK = """
from locustfile import canary_verdict, parse_weights
w = parse_weights("stable=90, canary=10")
assert w == {"stable": 0.9, "canary": 0.1}
assert canary_verdict({"stable": 905, "canary": 95}, w, 0.0)["ok"] is True
bad = canary_verdict({"stable": 700, "canary": 300}, w, 0.03)
assert bad["ok"] is False and [r["ok"] for r in bad["variants"]] == [False, False]
assert canary_verdict({"stable": 10, "rogue": 1}, w, 0.5)["ok"] is False  # a variant that should not answer
assert canary_verdict({"a": 3}, {}, 0.03)["ok"] is None  # nothing to check against
print("checked")
"""


def test_canary_verdict() -> None:
    """The split check of CanaryUser (in a subprocess: importing locust monkey-patches the process)."""
    proc = subprocess.run([sys.executable, "-c", CANARY_CHECK], capture_output=True, text=True,
                          timeout=120, cwd=ROOT / "loadtests")
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]


# -- benchmark report -----------------------------------------------------------------------------
def test_report_merges_benchmarks_into_tables_and_plots(tmp_path: Path) -> None:
    machine = {"cpu": "Test CPU", "cores": 2, "mlx_device": "Device(cpu, 0)", "mlx": "0.32.4"}
    engine = {"benchmark": "bench_engine", "machine": machine,
              "model": {"name": "demo-bench", "params": 101_000_000, "dtype": "float32"},
              "settings": {"max_tokens": 128},
              "results": {"engine": {str(c): {"concurrency": c, "requests": 2 * c, "tokens_per_s": 10.0 * c,
                                              "ttft_ms": {"p50": 5.0 * c, "p99": 9.0 * c}} for c in (1, 8, 32)},
                          "sequential": {"all": {"concurrency": None, "requests": 8, "tokens_per_s": 9.5,
                                                 "ttft_ms": {"p50": 4.0, "p99": 6.0}}}}}
    http = {"machine": machine, "model": "/somewhere/demo-bench", "settings": {"max_tokens": 128},
            "results": [{"path": "http", "concurrency": 8, "tokens_per_s": 70.0, "ttft_p50_ms": 44.0,
                         "ttft_p99_ms": 80.0, "requests": 16}]}
    (tmp_path / "engine.json").write_text(json.dumps(engine))
    (tmp_path / "http.json").write_text(json.dumps(http))
    out = tmp_path / "docs" / "benchmarks.md"
    out.parent.mkdir()
    out.write_text("# Benchmarks\n\nProse we keep.\n\n<!-- report:begin -->\nold\n<!-- report:end -->\n\nTrailer.\n")
    proc = subprocess.run([sys.executable, str(ROOT / "loadtests" / "report.py"), str(tmp_path / "engine.json"),
                           str(tmp_path / "http.json"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nProse we keep.") and text.rstrip().endswith("Trailer.") and "old" not in text
    assert "### CPU: Test CPU / demo-bench (101M params, float32)" in text  # one group for both files
    assert "| engine (in-process) | 10.0 | 80.0 | 320.0 | - |" in text
    assert "| mlx-serving over HTTP | - | 70.0 | - | - |" in text
    assert "| sequential stream_generate | - | - | - | 9.5 |" in text
    pngs = sorted((out.parent / "benchmarks").glob("*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in pngs] == ["throughput.png", "ttft.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and f"](benchmarks/{p.name})" in text for p in pngs)
