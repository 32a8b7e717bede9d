"""QoS on a real Serve cluster: interactive requests overtake queued batch ones, a request whose
deadline passes in the queue gets 504 without reaching the engine, keys' rate and concurrency limits
answer 429 with OpenAI's headers, a key's priority ceiling holds, SLOs are measured from the
replicas' timing and a burning one sheds batch requests, and autoscaling adds a replica on an
allowed simulated host under load and removes it when the load stops.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from conftest import ray_log_lines, replica_info
from deployments.app import build_app
from deployments.http.auth import hash_key
from deployments.qos.slo import MIN_EVENTS as MIN_SHED_EVENTS

APP, PREFIX = "qos", "/qos"
OPEN, LIMITED, SINGLE, NIGHTLY = "sk-qos-open", "sk-qos-limited", "sk-qos-single", "sk-qos-nightly"
ONE_AT_A_TIME = {"max_batch_size": 1, "admission_window_ms": 0}


@pytest.fixture(scope="module")
def base(app_url: str, tiny_model_dir: Path) -> str:
    tiny = str(tiny_model_dir)
    models = [
        # One request at a time: everything else waits at the ingress's gate.
        {"name": "q-one", "source": tiny, "num_cpus": 0, "max_ongoing_requests": 1, "engine": ONE_AT_A_TIME,
         "qos": {"interactive_reserve": 0, "slo": {"ttft_p95_s": 60, "availability": 0.5}}},
        {"name": "q-free", "source": tiny, "num_cpus": 0},
        # Every token is delivered late (a drill): its time-per-token SLO burns, and batch traffic is shed.
        {"name": "q-slow", "source": tiny, "num_cpus": 0, "fault": {"added_latency_per_token_s": 0.05},
         "qos": {"slo": {"tpot_p95_s": 0.01}, "shed_batch_on_burn": True}},
    ]
    keys = [{"key": hash_key(LIMITED), "name": "limited", "requests_per_minute": 2},
            {"key": hash_key(SINGLE), "name": "single", "max_concurrent": 1},
            {"key": hash_key(NIGHTLY), "name": "nightly", "max_priority": "batch"}]
    serve.run(build_app({"models": models, "auth": {"api_keys": [hash_key(OPEN)], "keys": keys}}),
              name=APP, route_prefix=PREFIX)
    yield app_url + PREFIX
    serve.delete(APP)


def auth(key: str = OPEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(model: str, max_tokens: int, bias: dict[str, float], **kw: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "qos", "max_tokens": max_tokens, "logit_bias": bias, "temperature": 0, **kw}


def _bias(base: str) -> dict[str, float]:
    tok = httpx.post(base + "/tokenize", json={"model": "q-free", "prompt": "<|im_end|>"}, headers=auth()).json()
    return {str(tok["tokens"][0]): -100.0}


class Holder:
    """A long streaming request that holds q-one's only slot until released."""

    def __init__(self, base: str, eos_bias: dict[str, float]) -> None:
        self.started = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base, eos_bias), daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the holding request never started"

    def _run(self, base: str, eos_bias: dict[str, float]) -> None:
        with httpx.stream("POST", base + "/v1/completions", headers=auth(), timeout=120,
                          json=body("q-one", 3000, eos_bias, stream=True, priority="batch")) as r:
            for _ in r.iter_lines():
                self.started.set()
                if self.stop.is_set():
                    return  # closing the stream cancels the generation

    def release(self) -> None:
        self.stop.set()
        self.thread.join(60)


def qos_report(base: str, key: str = OPEN) -> dict[str, Any]:
    r = httpx.get(base + "/qos", headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_waiting(base: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = qos_report(base)["models"]["q-one"]["waiting"]
        if sum(waiting.values()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests never waited at the gate: {qos_report(base)}")


def published_demand(model: str) -> int:
    """The most of ``model``'s requests that an ingress of the app held at its last tick (Ray's internal KV)."""
    from deployments.gcs_kv import RayInternalKV
    from deployments.qos.shares import NAMESPACE, IngressDemand

    kv = RayInternalKV()
    entries = [IngressDemand.model_validate_json(kv.get(k, NAMESPACE) or b"") for k in kv.keys(f"{APP}/", NAMESPACE)]
    return max((e.demand.get(model, 0) for e in entries), default=0)


def test_interactive_overtakes_queued_batch_requests(base: str) -> None:
    eos = _bias(base)
    holder = Holder(base, eos)
    finished: list[str] = []

    async def one(client: httpx.AsyncClient, name: str, priority: str) -> None:
        r = await client.post(base + "/v1/completions", headers=auth(), json=body("q-one", 4, eos, priority=priority))
        assert r.status_code == 200, r.text
        finished.append(name)

    async def go() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = []
            for i in range(3):  # batch requests queue first...
                tasks.append(asyncio.create_task(one(client, f"batch-{i}", "batch")))
                await asyncio.to_thread(wait_waiting, base, i + 1)
            tasks.append(asyncio.create_task(one(client, "interactive", "interactive")))  # ...then one interactive
            await asyncio.to_thread(wait_waiting, base, 4)
            # What the ingress publishes for the split between ingresses: the holder and the four waiting.
            assert await asyncio.to_thread(wait_for, "the demand published", lambda: published_demand("q-one") == 5, 30)
            holder.release()
            await asyncio.gather(*tasks)

    asyncio.run(go())
    assert finished == ["interactive", "batch-0", "batch-1", "batch-2"]


def test_a_deadline_that_passes_in_the_queue_is_504_and_never_reaches_the_engine(base: str) -> None:
    eos = _bias(base)
    before = replica_info(APP, "model-q-one").submitted_total
    holder = Holder(base, eos)
    availability = qos_report(base)["models"]["q-one"]["slos"]["availability"]
    try:
        t0 = time.monotonic()
        r = httpx.post(base + "/v1/completions", headers=auth(), timeout=60,
                       json=body("q-one", 4, eos, timeout=0.5))
        waited = time.monotonic() - t0
    finally:
        holder.release()
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert "waited for a replica" in r.json()["error"]["message"]
    assert waited < 30  # it did not wait for the holder to end
    assert replica_info(APP, "model-q-one").submitted_total - before == 1  # the holder alone reached the engine
    report = qos_report(base)["models"]["q-one"]
    assert report["expired"] >= 1
    # A deadline that passes on the replica, during generation, comes back as the replica's 504.
    late = httpx.post(base + "/v1/completions", headers=auth(), timeout=60,
                      json=body("q-one", 4000, eos, timeout=0.5))
    assert late.status_code == 504 and "during generation" in late.json()["error"]["message"], late.text
    # The client chose deadlines shorter than the model's default: their 504s burn no SLO budget.
    after = qos_report(base)["models"]["q-one"]["slos"]["availability"]
    assert (after["bad_1h"], after["total_1h"]) == (availability["bad_1h"], availability["total_1h"])


def test_a_keys_request_rate_limit_answers_429_with_openai_headers(base: str) -> None:
    eos = _bias(base)
    seen = []
    for _ in range(3):
        seen.append(httpx.post(base + "/v1/completions", headers=auth(LIMITED), timeout=60,
                               json=body("q-free", 2, eos)))
    assert [r.status_code for r in seen] == [200, 200, 429], [r.text for r in seen]
    assert seen[0].headers["x-ratelimit-limit-requests"] == "2"
    assert seen[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert seen[1].headers["x-ratelimit-remaining-requests"] == "0"
    over = seen[2]
    assert over.json()["error"]["code"] == "rate_limit_exceeded" and over.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(over.headers["retry-after"]) <= 30
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.headers["x-ratelimit-reset-requests"].endswith("s")
    # The official client sees it as OpenAI's RateLimitError.
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="q-free", prompt="x", max_tokens=1)
    assert qos_report(base, LIMITED)["key"]["name"] == "limited"


def test_a_keys_concurrency_limit(base: str) -> None:
    eos = _bias(base)
    with httpx.stream("POST", base + "/v1/completions", headers=auth(SINGLE), timeout=120,
                      json=body("q-free", 3000, eos, stream=True)) as first:
        lines = first.iter_lines()  # kept: a dropped line iterator would close the stream
        next(lines)  # it runs
        second = httpx.post(base + "/v1/completions", headers=auth(SINGLE), timeout=60, json=body("q-free", 2, eos))
        assert second.status_code == 429 and "concurrency" in second.json()["error"]["message"], second.text
        assert second.headers["retry-after"]
    # The stream closed: the key may send again (its slot is freed once the stream ends).
    deadline = time.monotonic() + 30
    while True:
        again = httpx.post(base + "/v1/completions", headers=auth(SINGLE), timeout=60, json=body("q-free", 2, eos))
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.status_code == 200, again.text


def test_a_keys_priority_ceiling_and_the_slos_are_measured(base: str) -> None:
    eos = _bias(base)
    before = qos_report(base)["models"]["q-one"]["admitted"]["batch"]
    r = httpx.post(base + "/v1/completions", headers=auth(NIGHTLY), timeout=60,
                   json=body("q-one", 2, eos, priority="interactive"))
    assert r.status_code == 200, r.text
    report = qos_report(base)["models"]["q-one"]
    assert report["admitted"]["batch"] == before + 1  # lowered to the key's ceiling
    ttft = report["slos"]["ttft"]
    assert ttft["target"] == 60 and ttft["total_1h"] >= 1 and ttft["met"] is True
    assert report["slos"]["availability"]["total_1h"] >= 3


def test_a_burning_slo_sheds_batch_requests_with_retry_after(base: str) -> None:
    eos = _bias(base)

    async def slow_answers() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*(client.post(base + "/v1/completions", headers=auth(),
                                                    json=body("q-slow", 3, eos)) for _ in range(MIN_SHED_EVENTS)))
        return [r.status_code for r in rs]

    assert asyncio.run(slow_answers()) == [200] * MIN_SHED_EVENTS  # every one slower per token than the SLO
    deadline = time.monotonic() + 30  # the ingress re-evaluates every second
    while True:
        shed = httpx.post(base + "/v1/completions", headers=auth(), timeout=60,
                          json=body("q-slow", 2, eos, priority="batch"))
        if shed.status_code == 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shed.status_code == 429 and shed.json()["error"]["code"] == "load_shed", shed.text
    assert shed.headers["retry-after"] == "10"
    ok = httpx.post(base + "/v1/completions", headers=auth(), timeout=60, json=body("q-slow", 2, eos))
    assert ok.status_code == 200, ok.text  # interactive traffic still goes
    report = qos_report(base)["models"]["q-slow"]
    assert report["shedding"] is True and report["slos"]["tpot"]["met"] is False
    assert report["slos"]["tpot"]["burn_rate"]["5m"] > 2
    events = [e for e in ray_log_lines('"shed_batch_on"') if e.get("model") == "q-slow"]
    assert events and events[0]["event"] == "qos_action" and events[0]["burn_rates"]["tpot"] > 2


# -- autoscaling over simulated hosts ---------------------------------------------------------------
SCALE_APP = "qos-scale"


@pytest.fixture(scope="module")
def scaled(ray_cluster: Any, app_url: str, tiny_model_dir: Path) -> Any:
    nodes = {name: ray_cluster.add_node(num_cpus=1, labels={"host": name}, resources={f"host:{name}": 1000},
                                        node_ip_address="127.0.0.1") for name in ("qos-a", "qos-b", "qos-c")}
    model = {"name": "elastic", "source": str(tiny_model_dir), "num_cpus": 0, "max_ongoing_requests": 4,
             "hosts": ["qos-a", "qos-b"], "max_replicas_per_node": 1,  # qos-c is not allowed
             "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                    "metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 0,
                                    "downscale_delay_s": 3}}
    serve.run(build_app({"models": [model]}), name=SCALE_APP, route_prefix="/" + SCALE_APP)
    yield app_url + "/" + SCALE_APP
    serve.delete(SCALE_APP)
    for node in nodes.values():
        ray_cluster.remove_node(node)


def running_hosts() -> list[str]:
    import ray
    from ray.serve.context import _get_global_client

    hosts = {n["NodeID"]: n["Labels"].get("host") for n in ray.nodes() if n["Alive"]}
    details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    reps = details["applications"][SCALE_APP]["deployments"]["model-elastic"]["replicas"]
    return sorted(str(hosts.get(r["node_id"])) for r in reps if str(getattr(r["state"], "value", r["state"])) == "RUNNING")


def wait_for(what: str, cond: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def test_load_scales_out_onto_an_allowed_host_and_back_in(scaled: str) -> None:
    first = wait_for("one replica", lambda: (lambda h: h if len(h) == 1 else None)(running_hosts()))
    assert first[0] in ("qos-a", "qos-b")
    tok = httpx.post(scaled + "/tokenize", json={"model": "elastic", "prompt": "<|im_end|>"}).json()["tokens"][0]
    stop = threading.Event()
    sent = [0]

    def load() -> None:  # 4 closed-loop streams: 4 requests in flight against a target of 1 per replica
        deadline = time.monotonic() + 150
        while not stop.is_set() and time.monotonic() < deadline and sent[0] < 2000:
            sent[0] += 1
            httpx.post(scaled + "/v1/completions", timeout=120, json={
                "model": "elastic", "prompt": "scale", "max_tokens": 200, "logit_bias": {str(tok): -100.0}})

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        both = wait_for("a second replica", lambda: (lambda h: h if len(h) == 2 else None)(running_hosts()), 150)
    finally:
        stop.set()
        for w in workers:
            w.join(150)
    assert both == ["qos-a", "qos-b"]  # the new one went to the other allowed host, never to qos-c
    back = wait_for("scale-in to one replica", lambda: (lambda h: h if len(h) == 1 else None)(running_hosts()), 120)
    assert back[0] in ("qos-a", "qos-b")
    events = wait_for("the scale events in the ingress's log", lambda: (lambda e: e if {"scale_out", "scale_in"} <= {
        x.get("action") for x in e} else None)([x for x in ray_log_lines('"qos_action"') if x.get("model") == "elastic"]), 30)
    out = next(x for x in events if x["action"] == "scale_out")
    assert out["event"] == "qos_action" and out["from_replicas"] == 1 and out["to_replicas"] == 2
