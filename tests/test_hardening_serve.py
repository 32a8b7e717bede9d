"""Hardening on a real Serve cluster: poison requests get OpenAI 4xx errors while a bystander streams
untouched, every error body is an OpenAI error object, a client that leaves cancels its GPU work, a
replica whose GPU thread dies leaves at once and its unstarted requests are served elsewhere, a
request that kills every replica it reaches gets 503 once and is logged as suspect, and prefix-cache
hits never cross tenants.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from conftest import MAX_BODY, no_eos, ray_log_lines, wait_for
from deployments.app import build_app
from deployments.http.auth import hash_key

APP, PREFIX = "hardening", "/hardening"
KEY_A, KEY_B = "sk-hardening-tenant-a", "sk-hardening-tenant-b"
LONG = 3500  # tokens: long enough to still run while a test acts (the tiny model's context is 4096)


@pytest.fixture(scope="module")
def base(app_url: str, tiny_model_dir: Path) -> str:
    tiny = str(tiny_model_dir)
    single = {"max_batch_size": 1, "max_waiting": 8, "admission_window_ms": 0}
    models = [
        {"name": "h-demo", "source": tiny, "num_cpus": 0},
        {"name": "h-single", "source": tiny, "num_cpus": 0, "engine": single},
        {"name": "h-crashy", "source": tiny, "num_cpus": 0, "num_replicas": 2, "max_ongoing_requests": 2,
         "health_check_period_s": 60, "engine": single},
        {"name": "h-poisoned", "source": tiny, "num_cpus": 0, "num_replicas": 2,
         "fault": {"crash_process_on": "KILL-PROCESS"}},
    ]
    serve.run(build_app({"models": models, "auth": {"api_keys": [hash_key(KEY_A), hash_key(KEY_B)]}}),
              name=APP, route_prefix=PREFIX)
    yield app_url + PREFIX
    serve.delete(APP)


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return body["error"]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def stream_text(url: str, body: dict[str, Any], key: str = KEY_A, timeout: float = 180) -> tuple[str, list[dict], float]:
    """(text, every parsed event, time the stream ended) of one streamed chat completion."""
    text, events = "", []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth(key),
                      timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            for c in event.get("choices") or []:
                text += c["delta"].get("content") or ""
    return text, events, time.monotonic()


# -- poison requests -----------------------------------------------------------------------------------
def poisons(app_url: str) -> list[tuple[str, dict[str, Any], int, str]]:
    chat = {"model": "h-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cmpl = {"model": "h-demo", "prompt": "hi", "max_tokens": 4}
    huge_enum = {"type": "string", "enum": [f"value-{i:05d}-" + "x" * 60 for i in range(20_000)]}
    return [
        ("/v1/chat/completions", {**chat, "logit_bias": {"1024": 1.0}}, 400, "token_id_out_of_range"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"5": float("nan")}}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"5": float("inf")}}, 400, "invalid_request"),
        ("/v1/completions", {**cmpl, "prompt": [5, -1]}, 400, "invalid_request"),
        ("/v1/completions", {**cmpl, "prompt": [5, 5000]}, 400, "token_id_out_of_range"),
        ("/detokenize", {"model": "h-demo", "tokens": [1, 99_999]}, 400, "token_id_out_of_range"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": nested(200)}}}, 400, "json_too_deep"),
        ("/v1/chat/completions", {**chat, "metadata": nested(100)}, 400, "json_too_deep"),
        ("/v1/chat/completions", {**chat, "stop": ["s"] * 17}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "stop": "s" * 300}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x"}] * 3000}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "guided_choice": ["a"] * 300}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "huge", "schema": huge_enum}}}, 400, "grammar_too_complex"),
        ("/v1/chat/completions", {**chat, "max_tokens": 10**9}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "max_tokens": 5000}, 400, "context_length_exceeded"),
        ("/v1/chat/completions", {**chat, "seed": 2**64}, 400, "invalid_request"),
        ("/v1/chat/completions", {**chat, "top_k": 10**30}, 200, ""),  # clamped to the vocabulary, as it means
        ("/v1/chat/completions", {**chat, "seed": -(2**63)}, 200, ""),  # any int64 seed, as OpenAI takes
    ]


def test_poison_requests_get_4xx_while_a_bystander_streams_untouched(base: str, app_url: str) -> None:
    bystander = {"model": "h-demo", "messages": [{"role": "user", "content": "Tell me about lighthouses"}],
                 "max_tokens": 1500, "temperature": 0, "logit_bias": no_eos(app_url)}
    solo = httpx.post(base + "/v1/chat/completions", json=bystander, headers=auth(), timeout=180).json()
    solo_text = solo["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream_text, base, bystander)
        time.sleep(0.5)
        for path, body, status, code in poisons(app_url):
            r = httpx.post(base + path, content=json.dumps(body), headers={**auth(), "content-type": "application/json"},
                           timeout=120)
            if status == 200:
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, (path, r.text[:300])
            else:
                assert_openai_error(r, status, code)
        last_poison = time.monotonic()
        text, events, ended = running.result(timeout=300)
    assert ended > last_poison  # the bystander was still streaming when the last poison landed
    assert text == solo_text and events[-1]["choices"][0]["finish_reason"] == "length"


def test_every_error_is_an_openai_error_object(app_url: str) -> None:
    url = app_url + "/v1/chat/completions"
    json_type = {"content-type": "application/json"}
    assert_openai_error(httpx.post(url, content=b'\xff\xfe{"model": "demo"}', headers=json_type), 400, "invalid_json")
    assert_openai_error(httpx.post(url, content=b"hello there", headers=json_type), 400, "invalid_json")
    assert_openai_error(httpx.post(url, content=b'{"model": "demo", ', headers=json_type), 400, "invalid_json")
    assert_openai_error(httpx.post(url, content=b"[]", headers=json_type), 400)
    assert_openai_error(httpx.post(url, content=b"", headers=json_type), 400)
    assert_openai_error(httpx.post(url, content=b"[" * 30_000 + b"]" * 30_000, headers=json_type), 400, "json_too_deep")
    assert_openai_error(httpx.post(url, content=b"x" * (MAX_BODY + 1), headers=json_type), 413, "request_too_large")
    assert_openai_error(httpx.get(app_url + "/v1/no-such-route"), 404, "not_found")
    assert_openai_error(httpx.get(url), 405, "method_not_allowed")
    assert_openai_error(httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404,
                        "model_not_found")


# -- clients that leave --------------------------------------------------------------------------------
def single_info() -> Any:
    return serve.get_deployment_handle("model-h-single", app_name=APP).info.remote().result()


def test_leaving_during_a_whole_answer_cancels_its_gpu_work(base: str, app_url: str) -> None:
    before = single_info().cancelled_total
    body = {"model": "h-single", "prompt": "Once upon a time", "max_tokens": LONG, "logit_bias": no_eos(app_url)}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(base + "/v1/completions", json=body, headers=auth(), timeout=httpx.Timeout(60, read=1.0))
    info = wait_for(lambda: (i := single_info()).cancelled_total > before and i.active == 0 and i, timeout=30)
    assert info.waiting == 0


def test_leaving_before_the_first_chunk_cancels_a_queued_request(base: str, app_url: str) -> None:
    before = single_info().cancelled_total
    body = {"model": "h-single", "messages": [{"role": "user", "content": "go on"}], "max_tokens": LONG,
            "logit_bias": no_eos(app_url)}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hog = pool.submit(stream_text, base, body)  # takes the only batch slot
        wait_for(lambda: single_info().active == 1)
        with pytest.raises(httpx.ReadTimeout):  # queued behind it: no chunk, not even headers, before it leaves
            with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, headers=auth(),
                              timeout=httpx.Timeout(60, read=1.5)) as r:
                r.read()
        info = wait_for(lambda: (i := single_info()).cancelled_total > before and i.waiting == 0 and i, timeout=30)
        assert info.active == 1  # the hog still runs: only the one that left was dropped
        text, _, _ = hog.result(timeout=300)
    assert text


# -- a replica's GPU thread dies -----------------------------------------------------------------------
def _replica_actors(deployment: str) -> list[Any]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")]
    return [ray.get_actor(n, namespace="serve") for n in names]


def _engine_of(actor: Any, fn: Any) -> Any:
    """Run ``fn(engine)`` inside a replica process (the way to reach one chosen replica)."""
    return ray.get(actor.__ray_call__.remote(
        lambda replica_actor: fn(replica_actor._replica_impl._user_callable_wrapper.user_callable.engine)), timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def test_a_dead_gpu_thread_takes_its_replica_out_at_once_and_its_queued_request_is_served_elsewhere(
        base: str, app_url: str) -> None:
    actors = _replica_actors("model-h-crashy")
    assert len(actors) == 2
    body = {"model": "h-crashy", "messages": [{"role": "user", "content": "keep going"}], "max_tokens": 600,
            "temperature": 0, "logit_bias": no_eos(app_url)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_text, base, body, KEY_A, 300) for _ in range(4)]
        # two requests per replica: one decoding, one queued behind it (batch of one)
        loads = wait_for(lambda: (h := [_engine_of(a, lambda e: (e.health().active, e.health().waiting)) for a in actors])
                         == [(1, 1), (1, 1)] and h, timeout=60)
        assert loads == [(1, 1), (1, 1)]
        victim = actors[0]
        pid = ray.get(victim.__ray_call__.remote(lambda _: os.getpid()))
        t0 = time.monotonic()
        try:
            _engine_of(victim, lambda e: e.crash_gpu_thread())
        except ray.exceptions.ActorDiedError:
            pass  # the process may exit before this call's reply leaves it: the point of the drill
        wait_for(lambda: not _alive(pid), timeout=15, every=0.1)
        gone_after = time.monotonic() - t0
        results = [s.result(timeout=300) for s in streams]
    assert gone_after < 10  # at once: not at the next health check (60 s)
    failed = [events for _, events, _ in results if "error" in events[-1]]
    served = [events for _, events, _ in results if "error" not in events[-1]]
    assert len(failed) == 1 and failed[0][-1]["error"]["code"] == "replica_died"  # it was mid-stream: not retried
    assert len(served) == 3 and all(e[-1]["choices"][0]["finish_reason"] == "length" for e in served)
    wait_for(lambda: len(_replica_actors("model-h-crashy")) == 2 and httpx.post(
        base + "/v1/chat/completions", json={**body, "max_tokens": 4}, headers=auth(), timeout=60).status_code == 200,
        timeout=120, every=1.0)


def test_a_request_that_kills_every_replica_it_reaches_gets_503_once_and_is_logged_suspect(base: str) -> None:
    rid = f"suspect-{time.time_ns()}"
    r = httpx.post(base + "/v1/completions", json={"model": "h-poisoned", "prompt": "KILL-PROCESS now", "max_tokens": 4},
                   headers={**auth(), "x-request-id": rid}, timeout=120)
    err = assert_openai_error(r, 503, "replica_died")
    assert "not retried again" in err["message"]
    lines = wait_for(lambda: [x for x in ray_log_lines(rid) if x.get("event") == "suspect_request"], timeout=30)
    assert lines[0]["completion_id"].startswith("cmpl-")
    ok = wait_for(lambda: httpx.post(base + "/v1/completions", json={"model": "h-poisoned", "prompt": "hello",
                                                                      "max_tokens": 4}, headers=auth(),
                                     timeout=60).status_code == 200, timeout=120, every=1.0)
    assert ok


# -- tenants -------------------------------------------------------------------------------------------
def test_prefix_cache_hits_stay_within_a_key_and_a_cache_salt(base: str) -> None:
    prompt = "A long shared preamble about the sea. " * 40

    def cached(key: str, salt: str | None = None) -> int:
        body = {"model": "h-demo", "prompt": prompt, "max_tokens": 2, **({"cache_salt": salt} if salt else {})}
        r = httpx.post(base + "/v1/completions", json=body, headers=auth(key), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEY_A) == 0
    assert cached(KEY_A) > 100  # the same tenant finds its own prompt
    assert cached(KEY_B) == 0  # another key learns nothing from it
    assert cached(KEY_A, "per-user-salt") == 0
    assert cached(KEY_A, "per-user-salt") > 100
    assert_openai_error(httpx.post(base + "/v1/completions", json={"model": "h-demo", "prompt": "x"},
                                   headers=auth("sk-wrong")), 401, "invalid_api_key")


# -- /ready ---------------------------------------------------------------------------------------------
def test_ready_answers_from_a_cache_refreshed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments import readiness
    from deployments.config import AppConfig
    from deployments.protocol import ModelStatus

    reads: list[int] = []

    def read(self, config):  # noqa: ANN001 - stands in for the blocking controller call
        reads.append(threading.get_ident())
        time.sleep(0.2)
        return [ModelStatus(name="m", ready=True)]

    monkeypatch.setattr(readiness.Readiness, "_read", read)
    config = AppConfig.model_validate({"models": [{"name": "m", "source": "demo:tiny"}]})
    r = readiness.Readiness("app")

    async def go() -> tuple[int, list[list[ModelStatus]], list[ModelStatus]]:
        loop_thread = threading.get_ident()
        first = await asyncio.gather(*[r.statuses(config) for _ in range(50)])
        await asyncio.sleep(readiness.MAX_AGE_S + 0.1)
        return loop_thread, first, await r.statuses(config)

    loop_thread, first, later = asyncio.run(go())
    assert all(s[0].ready for s in first) and later[0].ready
    assert len(reads) == 2 and loop_thread not in reads  # 50 callers, one read; a stale cache, one more


def test_tokens_a_grammar_rules_out_report_finite_logprobs(base: str) -> None:
    """Found by fuzzing: a masked token's logprob is -inf, which JSON cannot carry (it was a 500)."""
    body = {"model": "h-demo", "prompt": "f", "max_tokens": 4, "logprobs": 5, "guided_choice": ["yes", "no"]}
    r = httpx.post(base + "/v1/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    values = lp["token_logprobs"] + [v for top in lp["top_logprobs"] for v in top.values()]
    assert values and all(-9999.0 <= v <= 0.0 for v in values) and min(values) == -9999.0
    chat = {"model": "h-demo", "messages": [{"role": "user", "content": "f"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 5, "guided_choice": ["yes", "no"]}
    _, events, _ = stream_text(base, chat)
    tops = [t["logprob"] for e in events for c in e["choices"] if c.get("logprobs")
            for x in c["logprobs"]["content"] for t in x["top_logprobs"]]
    assert tops and min(tops) == -9999.0
    r = httpx.post(base + "/detokenize", json={"model": "h-demo", "tokens": []}, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.json() == {"prompt": ""}
