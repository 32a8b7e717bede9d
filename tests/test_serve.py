"""The OpenAI API served by a real Ray Serve app, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

from conftest import MAX_BODY, no_eos, replica_info


def test_models_list(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["demo", "narrow", "victim", "vision"]


def test_health_and_ready(app_url: str) -> None:
    assert httpx.get(app_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(app_url + "/ready").json()
    assert ready["ready"] is True and {m["name"] for m in ready["models"]} == {"demo", "victim", "narrow", "vision"}


def test_chat_non_streaming_with_usage(client: openai.OpenAI, app_url: str) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=9, temperature=0,
                                       logit_bias=no_eos(app_url))
    prompt = httpx.post(app_url + "/tokenize", json={"model": "demo", "messages": messages}).json()
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.prompt_tokens == prompt["count"] > 5
    assert r.usage.completion_tokens == 9 and r.usage.total_tokens == prompt["count"] + 9
    back = httpx.post(app_url + "/detokenize", json={"model": "demo", "tokens": prompt["tokens"]}).json()["prompt"]
    assert "What is the capital of France?" in back


def test_chat_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(model="demo", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_streaming_and_not(client: openai.OpenAI, app_url: str) -> None:
    bias = no_eos(app_url)
    whole = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=0, logit_bias=bias)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    parts = list(client.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=0,
                                           logit_bias=bias, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    echoed = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=3, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith("Once upon a time")


def test_stop_string_is_honoured(client: openai.OpenAI, app_url: str) -> None:
    bias = no_eos(app_url)
    full = client.completions.create(model="demo", prompt="The weather", max_tokens=30, temperature=0, logit_bias=bias)
    text = full.choices[0].text
    stop = text[10:13]
    cut = client.completions.create(model="demo", prompt="The weather", max_tokens=30, temperature=0, logit_bias=bias, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


def test_sixteen_concurrent_streams_each_get_their_own_text(app_url: str) -> None:
    prompts = [f"Request number {i}: " + "lighthouse " * (i % 4) for i in range(16)]
    sync = openai.OpenAI(base_url=app_url + "/v1", api_key="x", max_retries=0)
    expected = [sync.completions.create(model="demo", prompt=p, max_tokens=16, temperature=0).choices[0].text for p in prompts]
    assert len(set(expected)) > 4

    async def go() -> list[str]:
        client = openai.AsyncOpenAI(base_url=app_url + "/v1", api_key="x", max_retries=0)

        async def one(p: str) -> str:
            stream = await client.completions.create(model="demo", prompt=p, max_tokens=16, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        return await asyncio.gather(*[one(p) for p in prompts])

    assert asyncio.run(go()) == expected


@pytest.mark.parametrize("body, param", [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"top_p": 7}, "top_p"),
    ({"n": 9}, "n"),  # over the engine's max_n (8)
])
def test_invalid_parameters_are_400(app_url: str, body: dict, param: str) -> None:
    payload = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(app_url + "/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"
    assert err["param"].startswith(param)


def test_openai_client_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert bad.value.code == "invalid_request"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert long.value.code == "context_length_exceeded"


def test_malformed_json_and_oversized_bodies(app_url: str) -> None:
    r = httpx.post(app_url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    r = httpx.post(app_url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit must hold while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = httpx.post(app_url + "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_over_capacity_is_429_with_retry_after(app_url: str) -> None:
    bias = no_eos(app_url, "narrow")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(base_url=app_url, timeout=120) as h:
            body = {"model": "narrow", "prompt": "hold the slot", "max_tokens": 3000, "logit_bias": bias, "stream": True}
            async with h.stream("POST", "/v1/completions", json=body) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()
                await lines.__anext__()
                second = await h.post("/v1/completions", json={"model": "narrow", "prompt": "me too", "max_tokens": 3})
                return second

    r = asyncio.run(go())
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "over_capacity" and int(r.headers["retry-after"]) >= 1


def test_auth_and_deadline_on_the_secure_app(app_url: str) -> None:
    base = app_url + "/secure"
    chat = {"model": "guarded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    assert httpx.get(base + "/health").status_code == 200
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    good = openai.OpenAI(base_url=base + "/v1", api_key="sk-test-key", max_retries=0)
    assert [m.id for m in good.models.list()] == ["guarded"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(**chat)
    r = httpx.post(base + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer sk-test-key"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    # auth off on the main app: no header needed
    assert httpx.get(app_url + "/v1/models").status_code == 200


def test_openapi_schema_describes_the_api(app_url: str) -> None:
    spec = httpx.get(app_url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/ready"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert "ChatCompletionRequest" in schemas and "ChatCompletionResponse" in schemas and "ErrorResponse" in schemas
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]


def test_client_disconnect_cancels_the_generation(app_url: str) -> None:
    bias = no_eos(app_url)
    before = replica_info("main", "model-demo").cancelled_total
    with httpx.Client(base_url=app_url, timeout=60) as h:
        body = {"model": "demo", "prompt": "a long one", "max_tokens": 4000, "logit_bias": bias, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 60
    info = replica_info("main", "model-demo")
    while time.monotonic() < deadline and not (info.cancelled_total > before and info.active == 0):
        time.sleep(0.2)
        info = replica_info("main", "model-demo")
    assert info.cancelled_total == before + 1, "the sequence was not cancelled in the engine"
    assert info.active == 0


def test_replica_killed_mid_stream_ends_with_an_error_event_then_recovers(app_url: str) -> None:
    bias = no_eos(app_url, "victim")
    old_pid = replica_info("main", "model-victim").pid
    events: list[str] = []
    with httpx.Client(base_url=app_url, timeout=120) as h:
        body = {"model": "victim", "prompt": "doomed", "max_tokens": 4000, "logit_bias": bias, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 2:
                    os.kill(old_pid, signal.SIGKILL)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["error"]["code"] == "replica_died", last
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        r = httpx.post(app_url + "/v1/completions", json={"model": "victim", "prompt": "again", "max_tokens": 4}, timeout=30)
        if r.status_code == 200:
            break
        assert r.status_code in (503, 429), r.text  # replica being replaced: never a 500
        time.sleep(1)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert replica_info("main", "model-victim").pid != old_pid
