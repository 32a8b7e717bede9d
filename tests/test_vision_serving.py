"""Vision-language requests through the engine and the OpenAI API, on the offline qwen2_vl demo."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.request import ChatMessage


def png_data_uri(size: tuple[int, int], seed: int) -> str:
    w, h = size
    pixels = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(uri: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]}]


def test_engine_serves_images_and_text_in_one_batch(vision_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))

    async def go() -> None:
        info = await e.load_model("vlm", str(vision_model_dir))
        assert info.kind == "vision"
        m = e._model("vlm")
        image_id = m.model.config.image_token_id
        a, b = png_data_uri((64, 64), 1), png_data_uri((64, 64), 2)
        def body(msgs: list[dict]) -> dict:
            return {"model": "vlm", "messages": msgs, "sampling": {"max_tokens": 8, "temperature": 0, "logprobs": True}}

        tokens = e.tokenize("vlm", messages=[ChatMessage.model_validate(x) for x in image_message(a)])
        assert tokens.count(image_id) == 4  # a 64x64 image is 4 merged patches in this demo
        alone = [await e.complete(body(image_message(u))) for u in (a, b)]
        text_only = await e.complete(body([{"role": "user", "content": "no picture"}]))
        together = await asyncio.gather(*[e.complete(body(image_message(u))) for u in (a, b)],
                                        e.complete(body([{"role": "user", "content": "no picture"}])))
        assert [x.token_ids for x in together] == [alone[0].token_ids, alone[1].token_ids, text_only.token_ids]
        # the image reached the model: the same prompt with another picture is scored differently
        assert [lp.logprob for lp in alone[0].logprobs] != [lp.logprob for lp in alone[1].logprobs]
        assert alone[0].usage.prompt_tokens == len(tokens) > text_only.usage.prompt_tokens
        with pytest.raises(InvalidRequestError) as bad:
            await e.complete(body(image_message("data:image/png;base64,not-an-image")))
        assert bad.value.code == "invalid_image"

    asyncio.run(go())
    asyncio.run(e.shutdown(1))


def test_text_model_refuses_images(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=image_message(png_data_uri((32, 32), 0)))
    assert "does not accept images" in str(info.value)


def test_openai_client_with_a_generated_png(client: openai.OpenAI, app_url: str) -> None:
    a, b = png_data_uri((64, 64), 11), png_data_uri((96, 64), 12)
    ra = client.chat.completions.create(model="vision", messages=image_message(a), max_tokens=8, temperature=0)
    rb = client.chat.completions.create(model="vision", messages=image_message(b), max_tokens=8, temperature=0)
    rt = client.chat.completions.create(model="vision", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                        temperature=0)
    assert rb.usage.prompt_tokens - ra.usage.prompt_tokens == 2  # 96x64 is 6 image tokens, 64x64 is 4
    assert rt.usage.prompt_tokens < ra.usage.prompt_tokens
    streamed = client.chat.completions.create(model="vision", messages=image_message(a), max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ra.choices[0].message.content
    tok = httpx.post(app_url + "/tokenize", json={"model": "vision", "messages": image_message(a)}).json()
    assert tok["count"] == ra.usage.prompt_tokens


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,AAAA", "invalid_image"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
    ("http://127.0.0.1:9/cat.png", "image_url_not_allowed"),
    ("file:///etc/passwd", "image_url_not_allowed"),
])
def test_bad_images_are_400(app_url: str, url: str, code: str) -> None:
    r = httpx.post(app_url + "/v1/chat/completions", json={"model": "vision", "messages": image_message(url)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == "messages"
