"""``/v1/completions`` for evaluation clients: every prompt form, echo with the prompt's logprobs,
``max_tokens: 0`` to score a prompt, choices in prompt order."""

from __future__ import annotations

from typing import Any

import httpx

PROMPTS = ["The lighthouse keeper counted", "Every night the ships", "A short story about the sea"]


def post(app_url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(app_url + "/v1/completions", json={"model": "demo", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(app_url: str, text: str) -> list[int]:
    return httpx.post(app_url + "/tokenize", json={"model": "demo", "prompt": text}).json()["tokens"]


def test_every_prompt_form_gives_choices_in_prompt_order(app_url: str) -> None:
    singles = [post(app_url, prompt=p, max_tokens=6)["choices"][0]["text"] for p in PROMPTS]
    as_strings = post(app_url, prompt=PROMPTS, max_tokens=6, n=2)
    assert [c["index"] for c in as_strings["choices"]] == list(range(6))
    assert [c["text"] for c in as_strings["choices"]] == [t for t in singles for _ in range(2)]  # greedy: n alike
    token_lists = [ids_of(app_url, p) for p in PROMPTS]
    as_ids = post(app_url, prompt=token_lists, max_tokens=6)
    assert [c["text"] for c in as_ids["choices"]] == singles
    assert post(app_url, prompt=token_lists[0], max_tokens=6)["choices"][0]["text"] == singles[0]
    usage = as_ids["usage"]
    assert usage["completion_tokens"] == 18 and usage["prompt_tokens"] == len(token_lists[0])  # per prompt: the first's


def test_echo_returns_the_prompt_and_its_logprobs(app_url: str) -> None:
    ids = ids_of(app_url, PROMPTS[0])
    scored = post(app_url, prompt=[ids], echo=True, logprobs=1, max_tokens=0)
    [choice] = scored["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"]) == PROMPTS[0] and lp["text_offset"][0] == 0
    assert scored["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                               "prompt_tokens_details": {"cached_tokens": 0}}
    # one generated token after the prompt, as lm-eval asks: the prompt's logprobs are the same
    one = post(app_url, prompt=[ids], echo=True, logprobs=1, max_tokens=1)["choices"][0]["logprobs"]
    assert one["token_logprobs"][:-1] == lp["token_logprobs"] and len(one["token_logprobs"]) == len(ids) + 1
    # streamed: the prompt comes first, then the generated text
    text = ""
    with httpx.stream("POST", app_url + "/v1/completions", timeout=60, json={
            "model": "demo", "prompt": PROMPTS[1], "echo": True, "max_tokens": 5, "temperature": 0,
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    assert text == PROMPTS[1] + post(app_url, prompt=PROMPTS[1], max_tokens=5)["choices"][0]["text"]


def test_max_tokens_zero_needs_echo(app_url: str) -> None:
    r = httpx.post(app_url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]
