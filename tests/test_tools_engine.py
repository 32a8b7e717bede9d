"""Tool calls, reasoning and n > 1 in the in-process engine: the markers found in the demo tokenizer,
the call parser, the grammars (every sampled call validates), the shared prefill of n choices, and
the 400s for what a model cannot do."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from engine import scheduler as scheduler_module
from engine.chat import ChatFormat
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.request import ToolDef
from engine.tools import ToolCallStream, assemble, check_tool_choice

TOOL = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object",
    "properties": {"room": {"enum": ["red", "blue"]}, "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                   "note": {"type": "string", "maxLength": 12}},
    "required": ["room", "nights"]}}}
CHAT = [{"role": "user", "content": "Book me a room"}]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("plain") / "plain", "tiny", markers=False)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, plain_model_dir: Path) -> Engine:
    e = Engine(EngineConfig(warmup=False, max_batch_size=32, prompt_cache_gb=0))
    run(e.load_model("tiny", str(tiny_model_dir)))
    run(e.load_model("plain", str(plain_model_dir)))
    yield e
    run(e.shutdown(1))


def test_the_demo_tokenizer_has_the_markers_mlx_lm_recognises(engine: Engine) -> None:
    fmt = engine._model("tiny").chat
    tok = engine._model("tiny").tokenizer
    assert fmt.has_tools and fmt.has_thinking and fmt.tool_format == "json_tools"
    assert [tok.decode([i]) for i in (fmt.tool_start, fmt.tool_end, fmt.think_start, fmt.think_end)] == \
        ["<tool_call>", "</tool_call>", "<think>", "</think>"]
    assert engine._model("plain").chat == ChatFormat(None, None, None, None, None)


def test_a_call_streams_as_a_name_then_argument_fragments() -> None:
    text = '\n{"name": "book", "arguments": {"room": "red", "nights": 3, "note": "x}y"}}\n'
    s = ToolCallStream(0, lambda t, tools: json.loads(t), None, incremental=True)
    deltas = [d for ch in text for d in s.feed(ch)] + s.finish(complete=True)
    assert deltas[0].id and deltas[0].name == "book" and deltas[0].arguments == ""
    assert all(d.id is None and d.name is None for d in deltas[1:])
    assert "".join(d.arguments for d in deltas) == '{"room": "red", "nights": 3, "note": "x}y"}'
    [whole] = assemble(deltas)
    assert whole["name"] == "book" and json.loads(whole["arguments"])["note"] == "x}y"
    other = ToolCallStream(1, lambda t, tools: {"name": "f", "arguments": {"a": 1}}, None, incremental=False)
    assert other.feed("f(a=1)") == [] and assemble(other.finish(complete=True))[0]["arguments"] == '{"a": 1}'


def test_every_sampled_call_validates(engine: Engine) -> None:
    """Twenty sampled choices of a forced call, batched together: each parses and fits the schema."""
    schema = TOOL["function"]["parameters"]
    results = run(engine.complete_all({"model": "tiny", "messages": CHAT, "tools": [TOOL], "tool_choice": "required",
                                       "parallel_tool_calls": False, "n": 8,
                                       "sampling": {"temperature": 1.0, "seed": 1, "max_tokens": 120}}))
    more = run(engine.complete_all({"model": "tiny", "messages": CHAT, "tools": [TOOL], "n": 8,
                                    "tool_choice": {"type": "function", "function": {"name": "book"}},
                                    "sampling": {"temperature": 1.0, "seed": 99, "max_tokens": 120}}))
    for r in results + more:
        assert r.finish_reason == "tool_calls" and r.text == ""
        for call in assemble(r.tool_calls or []):
            assert call["name"] == "book"
            jsonschema.validate(json.loads(call["arguments"]), schema)


def test_n_choices_share_one_prefill_and_match_single_runs(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = scheduler_module.prefill

    def counting(model: Any, tokens: list[int], cache: Any, stream: Any, step: int) -> Any:
        calls.append(len(tokens))
        return real(model, tokens, cache, stream, step)

    monkeypatch.setattr(scheduler_module, "prefill", counting)
    body = {"model": "tiny", "prompt": "The harbour was quiet that morning, and the lighthouse keeper", "n": 4,
            "sampling": {"temperature": 0.0, "max_tokens": 10}}
    four = run(engine.complete_all(body))
    one = run(engine.complete_all({**body, "n": 1}))
    prompt_len = four[0].usage.prompt_tokens
    assert calls == [prompt_len - 1]  # the prompt, once, for all four choices
    assert [c.index for c in four] == [0, 1, 2, 3]
    assert all(c.token_ids == one[0].token_ids for c in four)  # each decodes from an exact copy of that cache
    seeded = {**body, "sampling": {"temperature": 1.0, "seed": 3, "max_tokens": 10}}
    assert [c.token_ids for c in run(engine.complete_all(seeded))] == [c.token_ids for c in run(engine.complete_all(seeded))]


@pytest.mark.parametrize("body, code, param", [
    ({"model": "plain", "messages": CHAT, "tools": [TOOL]}, "tools_unsupported", "tools"),
    ({"model": "plain", "messages": CHAT, "chat_template_kwargs": {"reasoning_effort": "low"}},
     "unsupported_parameter", "reasoning_effort"),
    ({"model": "tiny", "messages": CHAT, "chat_template_kwargs": {"tools": []}}, "invalid_request",
     "chat_template_kwargs"),
    ({"model": "tiny", "prompt": "x", "n": 9}, "invalid_request", "n"),
    ({"model": "tiny", "messages": CHAT, "tools": [TOOL], "response_format": {"type": "json_object"}},
     "unsupported_combination", "response_format"),
])
def test_what_a_model_cannot_do_is_refused(engine: Engine, body: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        run(engine.complete(body))
    assert (info.value.code, info.value.param) == (code, param)


def test_forced_calls_need_a_format_with_a_grammar() -> None:
    from mlx_lm.tool_parsers import pythonic

    fmt = ChatFormat(None, None, 10, 11, pythonic.parse_tool_call)
    with pytest.raises(InvalidRequestError) as info:
        check_tool_choice(fmt, "required")
    assert info.value.code == "tool_choice_unsupported"
    check_tool_choice(fmt, "auto")  # auto works for any format: calls are parsed when they end
    assert ToolDef.model_validate(TOOL).function.name == "book"


def test_a_thought_the_prompt_opened_comes_before_the_grammar(engine: Engine) -> None:
    """With the thought open, a constrained answer follows it: the JSON is the answer, not the thought."""
    end_thought = engine._model("tiny").chat.think_end
    r = run(engine.complete({"model": "tiny", "messages": CHAT, "chat_template_kwargs": {"reasoning_effort": "low"},
                             "response_format": {"type": "json_schema", "json_schema": {"schema": {
                                 "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}},
                             "sampling": {"temperature": 0.0, "max_tokens": 60, "logit_bias": {end_thought: 14}}}))
    assert r.reasoning and json.loads(r.text) in ({"ok": True}, {"ok": False})
