"""Agents and real OpenAI clients against the demo model: tool calls (forced, named, auto, none),
reasoning split from the answer, n choices, template options; with the official ``openai`` client
and its stream helpers.

The demo model has random weights, so what it says is gibberish; what is checked is the shape the
server guarantees: calls that parse and validate against their schema, whole and streamed alike,
each choice reproducible with a seed, the thought never in the answer.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from conftest import token_id

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}},
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def check_call(call: Any, names: set[str] | None = None) -> dict[str, Any]:
    """A call as OpenAI returns it: an id, type function, a known name, arguments valid for its schema."""
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in (names or set(SCHEMAS))
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def streamed(client: openai.OpenAI, **kw: Any) -> Any:
    """The final completion the client's own stream helpers assemble from the deltas."""
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion()


def test_an_agent_loop_with_a_required_call_whole_and_streamed(client: openai.OpenAI) -> None:
    kw = dict(model="demo", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=0.8, seed=11, max_tokens=200)
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    args = check_call(choice.message.tool_calls[0])

    final = streamed(client, **kw)  # the same seed: the same call, assembled from deltas by the client
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (choice.message.tool_calls[0].function.name, args)
    assert final.choices[0].finish_reason == "tool_calls"

    # the tool's result goes back; the model answers in text
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": '{"forecast": "sunny"}'},
    ]
    answer = client.chat.completions.create(model="demo", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=16, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")
    # the history (the call and its result) reached the template
    rendered = httpx.post(str(client.base_url).removesuffix("/v1/") + "/tokenize",
                          json={"model": "demo", "messages": history, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(str(client.base_url).removesuffix("/v1/") + "/detokenize",
                      json={"model": "demo", "tokens": rendered}).json()["prompt"]
    assert '"name": "get_weather"' in text and '{"forecast": "sunny"}' in text and "<tools>" in text


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    for stream in (False, True):
        kw = dict(model="demo", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0.9, seed=5,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
        result = streamed(client, **kw) if stream else client.chat.completions.create(**kw)
        calls = result.choices[0].message.tool_calls
        assert calls and all(c.function.name == "get_time" for c in calls)
        for c in calls:
            assert check_call(c, {"get_time"})["zone"] in ("UTC", "CET", "PST")


def test_parallel_calls_each_parse(client: openai.OpenAI, app_url: str) -> None:
    end = token_id(app_url, "<|im_end|>")
    result = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=400, temperature=0.9, seed=3, logit_bias={str(end): -100})
    calls = result.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)  # the grammar allows more than one
    for c in calls:
        check_call(c)


def test_auto_calls_are_well_formed_once_the_model_opens_one(client: openai.OpenAI, app_url: str) -> None:
    opener = token_id(app_url, "<tool_call>")
    kw = dict(model="demo", messages=ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=200,
              temperature=0.7, seed=2, logit_bias={str(opener): 100})  # the model opens a call at once
    whole = client.chat.completions.create(**kw)
    [call] = whole.choices[0].message.tool_calls  # one: parallel_tool_calls is off
    args = check_call(call)
    final = streamed(client, **kw)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final.choices[0].message.tool_calls] == \
        [(call.function.name, args)]
    none = client.chat.completions.create(**{**kw, "tool_choice": "none"})  # the marker is masked
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"


def test_n_choices_are_indexed_reproducible_and_counted(client: openai.OpenAI) -> None:
    kw = dict(model="demo", messages=[{"role": "user", "content": "Tell me a story"}], n=3, temperature=1.0,
              seed=42, max_tokens=12)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice samples on its own
    assert a.usage.completion_tokens == 3 * 12 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        usage = chunk.usage or usage
    assert [texts[i] for i in range(3)] == [c.message.content for c in a.choices]
    assert usage is not None and usage.completion_tokens == 36


def test_reasoning_is_returned_apart_from_the_answer(client: openai.OpenAI, app_url: str) -> None:
    end_thought, eos = token_id(app_url, "</think>"), token_id(app_url, "<|im_end|>")
    kw = dict(model="demo", messages=[{"role": "user", "content": "Why is the sky blue?"}], reasoning_effort="low",
              max_tokens=40, temperature=0, logit_bias={str(end_thought): 14, str(eos): -100})
    whole = client.chat.completions.create(**kw).choices[0].message
    reasoning = whole.model_extra["reasoning_content"]
    assert reasoning and whole.content
    for text in (reasoning, whole.content):
        assert "<think>" not in text and "</think>" not in text
    thought, answer = "", ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            thought += (c.delta.model_extra or {}).get("reasoning_content") or ""
            answer += c.delta.content or ""
    assert (thought, answer) == (reasoning, whole.content)


def test_template_options_reach_the_template_or_are_refused(app_url: str) -> None:
    msgs = [{"role": "user", "content": "hi"}]

    def rendered(**extra: Any) -> httpx.Response:
        return httpx.post(app_url + "/tokenize", json={"model": "demo", "messages": msgs, **extra})

    plain = rendered().json()["tokens"]
    off = rendered(chat_template_kwargs={"enable_thinking": False}).json()["tokens"]
    text = httpx.post(app_url + "/detokenize", json={"model": "demo", "tokens": off}).json()["prompt"]
    assert len(off) > len(plain) and text.endswith("<think>\n\n</think>\n\n")
    r = rendered(chat_template_kwargs={"no_such_option": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    r = httpx.post(app_url + "/v1/chat/completions", json={"model": "vision", "messages": msgs, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["code"] == "tools_unsupported"


@pytest.mark.parametrize("body, code", [
    ({"tool_choice": "required"}, "invalid_request"),  # tool_choice without tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_request"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "unsupported_combination"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "invalid_request"),
])
def test_impossible_tool_requests_are_400(app_url: str, body: dict[str, Any], code: str) -> None:
    r = httpx.post(app_url + "/v1/chat/completions", json={"model": "demo", "messages": ASK, **body})
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


@pytest.mark.parametrize("path, extra, status", [
    ("/v1/chat/completions", {"verbosity": "low"}, 400),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, 400),
    ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, 400),
    ("/v1/chat/completions", {"web_search_options": {}}, 400),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, 400),
    ("/v1/chat/completions", {"some_vendor_knob": 3}, 400),
    ("/v1/completions", {"suffix": "tail"}, 400),
    ("/v1/completions", {"best_of": 3}, 400),
    ("/v1/chat/completions", {"metadata": {"team": "a"}, "store": False, "service_tier": "auto", "user": "u1",
                              "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"],
                              "verbosity": None}, 200),
    ("/v1/completions", {"best_of": 1, "suffix": "", "user": "u1", "metadata": {"x": "y"}}, 200),
])
def test_nothing_is_silently_ignored(app_url: str, path: str, extra: dict[str, Any], status: int) -> None:
    base = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    r = httpx.post(app_url + path, json={"model": "demo", "max_tokens": 2, **base, **extra})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] in ("unsupported_parameter", "invalid_request")
        assert r.json()["error"]["param"] in set(extra) | {"modalities.1", "suffix", "best_of"}
