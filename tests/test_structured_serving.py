"""Structured output end to end: engine batches and the OpenAI API's ``response_format``.

The demo model has random weights, so every valid output here is the grammar's doing. Schemas with
free-form parts (json_object) get a bias toward closing punctuation, as a trained model's habits
would; the grammar mask still decides what is valid.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from conftest import token_id
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from test_structured import CHOICES, NESTED, OPTIONAL, PERSON, REFS

SCHEMAS = {"person": PERSON, "nested": NESTED, "refs": REFS, "optional": OPTIONAL}


def json_schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_engine_batches_constrained_and_free_requests_together(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))

    def body(i: int, constrained: bool) -> dict[str, Any]:
        b: dict[str, Any] = {"model": "tiny", "prompt": f"request {i}", "sampling": {
            "max_tokens": 200, "temperature": 0.0 if i % 2 else 1.0, "seed": i}}
        if constrained:
            b["response_format"] = json_schema_format(list(SCHEMAS)[i % len(SCHEMAS)])
        return b

    async def go() -> tuple[list[str], list[str], list[str]]:
        await e.load_model("tiny", str(tiny_model_dir))
        free_alone = [(await e.complete(body(i, False))).text for i in range(8, 16)]

        async def stream(b: dict[str, Any]) -> tuple[str, str | None]:
            text, finish = "", None
            async for c in e.generate(b):
                text += c.text
                finish = c.finish_reason
            return text, finish

        results = await asyncio.gather(*[stream(body(i, i < 8)) for i in range(16)])
        assert all(f == "stop" for _, f in results[:8]), "constrained rows must end because the grammar completed"
        return [t for t, _ in results[:8]], [t for t, _ in results[8:]], free_alone

    constrained, free_batched, free_alone = asyncio.run(go())
    asyncio.run(e.shutdown(1))
    for i, text in enumerate(constrained):
        jsonschema.validate(json.loads(text), SCHEMAS[list(SCHEMAS)[i % len(SCHEMAS)]])
    assert free_batched == free_alone  # sharing the batch with constrained rows changes nothing


def test_bad_schema_is_rejected_before_the_gpu_thread(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))

    async def go() -> None:
        await e.load_model("tiny", str(tiny_model_dir))
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}}
        with pytest.raises(InvalidRequestError) as info:
            await e.complete({"model": "tiny", "prompt": "x", "response_format": bad})
        assert info.value.param == "response_format"
        assert e.health().active == 0 and e.health().waiting == 0

    asyncio.run(go())
    asyncio.run(e.shutdown(1))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("stream", [False, True])
def test_openai_response_format_json_schema(client: openai.OpenAI, name: str, stream: bool) -> None:
    kw = dict(model="demo", messages=[{"role": "user", "content": f"give me {name}"}], max_tokens=250,
              temperature=0.8, seed=7, response_format=json_schema_format(name))
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    else:
        r = client.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_openai_json_object_regex_and_choice(client: openai.OpenAI, app_url: str) -> None:
    closing = {str(token_id(app_url, t)): 6.0 for t in ("}", '"')}
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "json please"}],
                                       max_tokens=300, temperature=0, logit_bias=closing,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    r = client.completions.create(model="demo", prompt="code:", max_tokens=40, temperature=1.0, seed=3,
                                  extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2,5}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", r.choices[0].text), r.choices[0].text

    picks = {client.completions.create(model="demo", prompt=f"pick {i}", max_tokens=20, temperature=1.0, seed=i,
                                       extra_body={"guided_choice": CHOICES}).choices[0].text for i in range(6)}
    assert picks <= set(CHOICES) and picks


def test_openai_invalid_schema_is_400(app_url: str) -> None:
    bad = {"model": "demo", "messages": [{"role": "user", "content": "x"}],
           "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                            "uniqueItems": "yes"}}}}
    for body in (bad, {**bad, "response_format": {"type": "xml"}},
                 {"model": "demo", "prompt": "x", "guided_regex": "([a-z"}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = httpx.post(app_url + path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"


def test_sixteen_concurrent_mixed_requests_through_http(app_url: str) -> None:
    async def go() -> list[tuple[bool, str]]:
        c = openai.AsyncOpenAI(base_url=app_url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def one(i: int) -> tuple[bool, str]:
            constrained = i % 2 == 0
            extra = {"response_format": json_schema_format(list(SCHEMAS)[i % 4])} if constrained else {}
            stream = await c.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"#{i}"}],
                                                     max_tokens=200, temperature=0.7, seed=i, stream=True, **extra)
            return constrained, "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        return await asyncio.gather(*[one(i) for i in range(16)])

    for i, (constrained, text) in enumerate(asyncio.run(go())):
        if constrained:
            jsonschema.validate(json.loads(text), SCHEMAS[list(SCHEMAS)[i % 4]])
        else:
            assert text  # free rows produce their own (gibberish) text
