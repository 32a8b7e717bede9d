"""vLLM's metric names, for the Serve LLM Grafana dashboard that ships inside Ray.

The dashboard's queries are read from the installed Ray at test time, so a Ray upgrade that queries
a new vLLM family fails here until it is exported or listed in ``NOT_EXPORTED`` with a reason.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

# Dashboard families (vLLM's name, no ``ray_vllm_`` prefix, no sample suffix) that are not exported,
# because no honest value exists here. Keep in step with engine/metrics.py and docs/observability.md.
NOT_EXPORTED: dict[str, str] = {
    "kv_cache_usage_perc": "share of vLLM's preallocated paged KV pool; MLX grows each sequence's cache, no pool",
    "num_requests_swapped": "vLLM V0 only; nothing here swaps or preempts a request",
    "request_prefill_time_seconds": "needs a request's admission time, which no observer hook carries",
}
# Whole feature areas of vLLM this engine does not have.
NOT_EXPORTED_PREFIXES: dict[str, str] = {
    "nixl_": "disaggregated prefill's KV transfers (NIXL)",
    "kv_offload_": "vLLM's CPU KV-cache offload tier",
    "external_prefix_cache_": "a KV connector's external prefix cache",
}
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def dashboard_names() -> set[str]:
    """Every ``ray_vllm_*`` sample name that Ray's Serve LLM dashboard queries: its panels' PromQL and
    its template variables (which list model names and worker ids)."""
    from ray.dashboard.modules.metrics.dashboards import serve_llm_dashboard_panels as panels

    cfg = panels.serve_llm_dashboard_config
    exprs = [t.expr for row in cfg.rows for p in row.panels for t in p.targets]
    exprs += [t.expr for p in cfg.panels for t in p.targets]
    base = json.loads((Path(panels.__file__).parent / cfg.base_json_file_name).read_text())
    exprs += [json.dumps(v.get("query")) for v in base.get("templating", {}).get("list", [])]
    return {n for e in exprs for n in re.findall(r"\bray_vllm_\w+", e)}


def family(name: str) -> str:
    """``ray_vllm_request_prompt_tokens_sum`` -> ``request_prompt_tokens``."""
    base = name.removeprefix("ray_vllm_")
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def skipped(name: str) -> bool:
    fam = family(name)
    return fam in NOT_EXPORTED or fam.startswith(tuple(NOT_EXPORTED_PREFIXES))


def exported_dashboard_names() -> list[str]:
    """The dashboard's ``ray_vllm_*`` sample names this project exports (for the Ray-level test too)."""
    return sorted(n for n in dashboard_names() if not skipped(n))


def _samples(obs: Any) -> list[Any]:
    return [s for metric in obs.registry.collect() for s in metric.samples]


def _traffic(model_dir: Path) -> tuple[Any, list[Any]]:
    """Real requests through an in-process engine: mixed lengths, and one prompt sent twice (a
    prefix-cache hit)."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.metrics import PrometheusObserver

    obs = PrometheusObserver(memory_interval_s=0.0)
    engine = Engine(EngineConfig(max_batch_size=2), observer=obs)
    obs.attach(engine)

    async def scenario() -> list[Any]:
        await engine.load_model("m", str(model_dir))
        bias = {t: -100.0 for t in engine.tokenize("m", "<|im_end|>")}
        same = "A system prompt that every turn of this chat starts with, and a question"
        reqs = [{"model": "m", "prompt": f"Request {i} " + "more " * i,
                 "sampling": {"max_tokens": 3 + i, "temperature": 0, "logit_bias": bias}} for i in range(4)]
        first = await engine.complete({"model": "m", "prompt": same, "sampling": {"max_tokens": 4, "logit_bias": bias}})
        rest = await asyncio.gather(*[engine.complete(r) for r in reqs])
        again = await engine.complete({"model": "m", "prompt": same, "sampling": {"max_tokens": 4, "logit_bias": bias}})
        return [first, *rest, again]

    try:
        results = asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown(5))
    return obs, results


@pytest.fixture(scope="module")
def traffic(tiny_model_dir: Path) -> tuple[Any, list[Any]]:
    return _traffic(tiny_model_dir)


def test_the_skip_list_is_short_and_still_queried() -> None:
    """Every skipped family is one the dashboard queries (no stale excuses) and none is exported."""
    from engine.metrics import VLLM_METRICS

    families = {family(n) for n in dashboard_names()}
    assert len(families) >= 20, sorted(families)  # the parse found the dashboard
    assert set(NOT_EXPORTED) <= families, sorted(set(NOT_EXPORTED) - families)
    for prefix in NOT_EXPORTED_PREFIXES:
        assert any(f.startswith(prefix) for f in families), prefix
    ours = {s.name for s in VLLM_METRICS.values()}
    assert not {f for f in families if f in ours and skipped("ray_vllm_" + f)}
    kept = {family(n) for n in exported_dashboard_names()}
    assert {"time_to_first_token_seconds", "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
            "num_requests_running", "num_requests_waiting", "prompt_tokens", "generation_tokens",
            "prefix_cache_hits", "prefix_cache_queries", "request_success", "request_prompt_tokens"} <= kept


def test_ray_names_match_the_dashboard_exactly() -> None:
    """Under Ray every exported dashboard sample name is ``ray_`` + the name our Ray backend registers
    + Prometheus's suffix for its kind."""
    from deployments.metrics import ray_metric_name
    from engine.metrics import VLLM_METRICS

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    ray_names = {"ray_" + ray_metric_name(s) + x for s in VLLM_METRICS.values() for x in suffixes[s.kind]}
    missing = [n for n in exported_dashboard_names() if n not in ray_names]
    assert not missing, missing
    assert all(s.labels[0] == "model_name" for s in VLLM_METRICS.values())


def test_every_dashboard_family_is_present_after_traffic(traffic: tuple[Any, list[Any]]) -> None:
    """The test the issue asks for: after real traffic, every vLLM sample the dashboard queries is in
    the in-process exposition (``vllm:NAME``, vLLM's spelling), labelled with the model's name."""
    obs, _ = traffic
    present = {s.name for s in _samples(obs) if s.labels.get("model_name") == "m"}
    wanted = {"vllm:" + n.removeprefix("ray_vllm_") for n in exported_dashboard_names()}
    assert wanted and not wanted - present, sorted(wanted - present)
    text = obs.exposition().decode()
    # the query behind the dashboard's model_name and WorkerId pickers
    assert re.search(r'^vllm:request_prompt_tokens_sum\{model_name="m"\} ', text, re.M)
    assert not re.search(r'^vllm:\w+\{[^}]*\bmodel="', text, re.M)  # vLLM's label name only


def test_vllm_names_carry_the_engine_metrics_values(traffic: tuple[Any, list[Any]]) -> None:
    """Each vLLM family holds exactly the values of the engine metric it mirrors (labels renamed)."""
    from engine.metrics import ENGINE_METRICS, VLLM_LABELS, VLLM_METRICS

    obs, results = traffic
    samples = _samples(obs)
    by_key = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples if not s.name.endswith("_created")}
    compared = 0
    for source, twin in VLLM_METRICS.items():
        ours = ENGINE_METRICS[source].full_name
        for (name, labels), value in by_key.items():
            if not name.startswith(ours) or name[len(ours):] not in ("", *SUFFIXES):
                continue
            renamed = tuple(sorted((VLLM_LABELS.get(k, k), v) for k, v in labels))
            assert by_key.get((twin.full_name + name[len(ours):], renamed)) == value, (name, labels)
            compared += 1
    assert compared > 50

    v = obs.value
    m = {"model_name": "m"}
    prompt_tokens = sum(r.usage.prompt_tokens for r in results)
    assert v("vllm:prompt_tokens_total", m) == prompt_tokens
    assert v("vllm:generation_tokens_total", m) == sum(r.usage.completion_tokens for r in results) == 4 + 18 + 4
    assert v("vllm:request_success_total", {**m, "finished_reason": "length"}) == len(results) == 6
    assert v("vllm:request_prompt_tokens_count", m) == 6 and v("vllm:request_prompt_tokens_sum", m) == prompt_tokens
    assert v("vllm:request_generation_tokens_bucket", {**m, "le": "5.0"}) == 5  # 4, 3, 4, 5, 6, 4 tokens
    # the prefix cache: every prompt looked up, the repeated one found all but its last token
    hits = results[-1].usage.cached_tokens
    assert hits == results[-1].usage.prompt_tokens - 1 > 0
    assert v("vllm:prefix_cache_queries_total", m) == prompt_tokens
    assert v("vllm:prefix_cache_hits_total", m) == sum(r.usage.cached_tokens for r in results) >= hits
    decode = v("vllm:request_decode_time_seconds_sum", m)
    assert 0 < decode < v("vllm:e2e_request_latency_seconds_sum", m)
    assert v("vllm:num_requests_running", m) == 0 and v("vllm:num_requests_waiting", m) == 0


def test_queue_gauges_and_the_switch() -> None:
    from engine.metrics import PrometheusObserver

    on, off = PrometheusObserver(), PrometheusObserver(vllm_names=False)
    for obs in (on, off):
        obs.on_step("x", 3, 0.01, 3, 2)  # not attached: running / waiting from the last step
        obs.on_prefix_lookup("x", 10, 7)
        obs.on_finish("x", 10, 5, 7, 1.0, "stop", ttft_s=0.2)
    assert on.value("vllm:num_requests_running", {"model_name": "x"}) == 3
    assert on.value("vllm:num_requests_waiting", {"model_name": "x"}) == 2
    assert on.value("vllm:prefix_cache_hits_total", {"model_name": "x"}) == 7
    assert on.value("vllm:request_decode_time_seconds_sum", {"model_name": "x"}) == pytest.approx(0.8)
    assert off.value("mlx_serving_prompt_cache_hit_tokens_total", {"model": "x"}) == 7
    assert not [s for s in _samples(off) if s.name.startswith("vllm:")]
