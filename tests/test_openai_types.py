"""The suite-wide openai-types checker (tests/openai_types.py), on canned answers: no server needed."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest

import openai_types
from openai_types import capture

BASE = "http://mock/v1"
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}}
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "demo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "length",
                     "logprobs": None}], "usage": USAGE}
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "demo",
              "choices": [{"index": 0, "text": "Once upon a time", "finish_reason": "length", "logprobs": {
                  "tokens": ["Once", " upon", " a", " time"], "token_logprobs": [None, -1.5, -0.25, -3.0],
                  "top_logprobs": [None, {" upon": -1.5}, {" a": -0.25}, {" day": -1.0}],
                  "text_offset": [0, 4, 9, 11]}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def chat_chunks() -> list[dict]:
    head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1700000000, "model": "demo"}
    return [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": USAGE},
    ]


def completion_chunks() -> list[dict]:
    head = {"id": "cmpl-2", "object": "text_completion", "created": 1700000000, "model": "demo"}
    return [{**head, "choices": [{"index": 0, "text": "Once"}]},  # finish_reason omitted: allowed in a chunk
            {**head, "choices": [{"index": 0, "text": " upon", "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}]


def sse(events: list[Any], done: bool = True) -> list[bytes]:
    out = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def answering(status: int, body: Any = None, events: list[bytes] | None = None) -> Callable:
    """A MockTransport handler: a JSON body, or SSE events sent in pieces that split lines."""
    def handler(request: httpx.Request) -> httpx.Response:
        if events is not None:
            raw = b"".join(events)
            pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]
            return httpx.Response(status, headers={"content-type": "text/event-stream"}, content=iter(pieces))
        return httpx.Response(status, json=body)
    return handler


def post_sync(handler: Callable, path: str, payload: dict) -> None:
    with httpx.Client(transport=httpx.MockTransport(handler), base_url=BASE) as h:
        if payload.get("stream"):
            with h.stream("POST", path, json=payload) as r:
                for _ in r.iter_lines():
                    pass
        else:
            h.post(path, json=payload)


CHAT_REQ = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
COMP_REQ = {"model": "demo", "prompt": "Once"}


@pytest.mark.parametrize("path, payload, handler", [
    ("/chat/completions", CHAT_REQ, answering(200, CHAT)),
    ("/chat/completions", {**CHAT_REQ, "stream": True}, answering(200, events=sse(chat_chunks()))),
    ("/completions", {**COMP_REQ, "echo": True, "logprobs": 1}, answering(200, COMPLETION)),
    ("/completions", {**COMP_REQ, "stream": True}, answering(200, events=sse(completion_chunks()))),
    ("/completions", COMP_REQ, answering(400, {"error": {"message": "bad", "type": "invalid_request_error",
                                                         "param": "prompt", "code": "invalid_request"}})),
    ("/chat/completions", {**CHAT_REQ, "stream": True}, answering(200, events=sse(chat_chunks()[:2] + [
        {"error": {"message": "replica died", "type": "server_error", "param": None, "code": "replica_died"}}]))),
])
def test_good_answers_pass(path: str, payload: dict, handler: Callable) -> None:
    with capture() as rec:
        post_sync(handler, path, payload)
    assert rec.violations == [] and rec.responses == 1 and rec.bodies >= 1


def bad(fn: Callable[[Any], None], base: Any) -> Any:
    obj = copy.deepcopy(base)
    fn(obj)
    return obj


def _set(path: str, value: Any) -> Callable[[Any], None]:
    def fn(obj: Any) -> None:
        *head, last = path.split(".")
        for k in head:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        obj[int(last) if last.isdigit() else last] = value
    return fn


WHOLE_CASES = [
    ("chat", _set("choices.0.index", "0"), "choices.0.index"),
    ("chat", _set("object", "chat.completion.chunk"), "object"),
    ("chat", _set("choices.0.finish_reason", "done"), "finish_reason"),
    ("chat", _set("choices.0.finish_reason", None), "finish_reason"),
    ("chat", _set("created", 1.5), "created"),
    ("chat", _set("choices.0.message.role", "user"), "role"),
    ("chat", _set("usage.total_tokens", 8), "total_tokens"),
    ("chat", _set("usage", None), "usage missing"),
    ("chat", _set("choices.0.index", 1), "0..k-1"),
    ("chat", _set("choices.0.finish_reasons", "stop"), "choices[].finish_reasons: field not in the openai type"),
    ("completion", _set("choices.0.logprobs.token_logprobs.2", None), "only the first prompt token"),
    ("completion", _set("choices.0.logprobs.tokens", ["Once"]), "differ in length"),
    ("completion", _set("choices.0.logprobs.token_logprobs.1", "-1.5"), "token_logprobs"),
    ("completion", _set("object", "completion"), "object"),
]


@pytest.mark.parametrize("which, mutate, needle", WHOLE_CASES)
def test_malformed_whole_answers_fail(which: str, mutate: Callable, needle: str) -> None:
    chat = which == "chat"
    path, payload, good = ("/chat/completions", CHAT_REQ, CHAT) if chat else ("/completions", COMP_REQ, COMPLETION)
    with capture() as rec:
        post_sync(answering(200, bad(mutate, good)), path, payload)
    assert any(needle in v for v in rec.violations), rec.violations


def chunks_with(i: int, mutate: Callable[[Any], None]) -> list[dict]:
    chunks = chat_chunks()
    mutate(chunks[i])
    return chunks


STREAM_CASES = [
    (sse(chunks_with(1, _set("choices.0.index", "0"))), "choices.0.index"),
    (sse(chunks_with(1, _set("object", "chat.completion"))), "object"),
    (sse(chunks_with(2, _set("choices.0.finish_reason", "eos"))), "finish_reason"),
    (sse(chunks_with(0, _set("choices.0.delta", {"content": "x"}))), "delta.role"),
    (sse(chunks_with(1, _set("id", "other"))), "differs from the stream's first"),
    (sse(chunks_with(3, _set("choices", [{"index": 0, "delta": {}, "finish_reason": None}]))),
     "usage must have no choices"),
    (sse(chat_chunks(), done=False), "without data: [DONE]"),
    (sse(chat_chunks()) + [b'data: {"late": 1}\n\n'], "after data: [DONE]"),
    (sse(chat_chunks()[:1] + ["{not json"]), "not JSON"),
    (sse(chat_chunks()[:1] + ['{"x": NaN}']), "not JSON"),
    (sse(chat_chunks()[:1] + [{"error": {"message": "boom"}}]), "error keys"),
    (sse(chat_chunks()[:1]), "no finish_reason for choice(s) [0]"),
    ([b"event: chunk\n"] + sse(chat_chunks()), "unexpected SSE line"),
]


@pytest.mark.parametrize("events, needle", STREAM_CASES)
def test_malformed_chunks_fail(events: list[bytes], needle: str) -> None:
    with capture() as rec:
        post_sync(answering(200, events=events), "/chat/completions", {**CHAT_REQ, "stream": True})
    assert any(needle in v for v in rec.violations), rec.violations


@pytest.mark.parametrize("body, needle", [
    ({"detail": "Not Found"}, "error body is not"),
    ({"error": {"message": "x", "type": "invalid_request_error", "code": None}}, "error keys"),
    ({"error": {"message": "", "type": "t", "param": None, "code": None}}, "error.message"),
    ({"error": {"message": "m", "type": "t", "param": None, "code": 400}}, "error.code"),
])
def test_malformed_errors_fail(body: dict, needle: str) -> None:
    with capture() as rec:
        post_sync(answering(422, body), "/chat/completions", CHAT_REQ)
    assert any(needle in v for v in rec.violations), rec.violations


def test_choice_count_follows_the_request() -> None:
    with capture() as rec:  # two prompts, one choice back
        post_sync(answering(200, COMPLETION), "/completions", {**COMP_REQ, "prompt": [[1, 2], [3]]})
    assert any("the request asks for 2" in v for v in rec.violations), rec.violations


def test_stream_answered_as_json_fails() -> None:
    with capture() as rec:
        post_sync(answering(200, CHAT), "/chat/completions", {**CHAT_REQ, "stream": True})
    assert any("stream=true answered with content-type" in v for v in rec.violations), rec.violations


def test_partly_read_stream_checks_only_what_was_read() -> None:
    events = sse(chat_chunks()[:2] + [{"object": "bad"}])
    with capture() as rec:
        with httpx.Client(transport=httpx.MockTransport(answering(200, events=events)), base_url=BASE) as h:
            with h.stream("POST", "/chat/completions", json={**CHAT_REQ, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
    assert rec.violations == [] and rec.bodies == 1


def test_async_client_streams_are_checked() -> None:
    events = sse(chunks_with(1, _set("choices.0.index", "0")))

    async def handler(request: httpx.Request) -> httpx.Response:
        if not json.loads(request.content).get("stream"):
            return httpx.Response(200, json=CHAT)

        async def body():
            for e in events:
                yield e
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=BASE) as h:
            async with h.stream("POST", "/chat/completions", json={**CHAT_REQ, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    pass
            r = await h.post("/chat/completions", json=CHAT_REQ)  # a good whole one too

    with capture() as rec:
        asyncio.run(go())
    assert rec.responses == 2 and len(rec.violations) == 1 and "choices.0.index" in rec.violations[0], rec.violations


def openai_client(handler: Callable) -> openai.OpenAI:
    """The official client over its own transport (httpx2 in openai 3.x, httpx before)."""
    try:
        import httpx2 as transport_lib
    except ImportError:
        transport_lib = httpx

    def adapted(request: Any) -> Any:
        r = handler(httpx.Request(request.method, str(request.url), content=request.read()))
        return transport_lib.Response(r.status_code, headers=dict(r.headers), content=r.read())

    return openai.OpenAI(base_url=BASE, api_key="x", max_retries=0,
                         http_client=transport_lib.Client(transport=transport_lib.MockTransport(adapted)))


def test_openai_client_traffic_is_checked_though_the_client_accepts_it() -> None:
    events = sse(chunks_with(1, _set("choices.0.finish_reason", "eos")))
    client = openai_client(answering(200, events=events))
    with capture() as rec:
        chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][1] == "eos"  # the client took it as it was
    assert any("finish_reason" in v for v in rec.violations), rec.violations

    client = openai_client(answering(200, bad(_set("choices.0.index", "0"), COMPLETION)))
    with capture() as rec:
        client.completions.create(model="demo", prompt="Once", echo=True, logprobs=1)
    assert any("choices.0.index" in v for v in rec.violations), rec.violations


def test_a_violation_fails_the_test_even_when_the_test_swallows_errors(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import openai_types

        def pytest_configure(config):
            openai_types.install()
            config.pluginmanager.register(openai_types, "openai-types")
    """))
    (tmp_path / "test_swallow.py").write_text(textwrap.dedent("""
        import httpx

        def handler(request):
            return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                                             "choices": [{"index": "0", "message": {"role": "assistant",
                                             "content": "a"}, "finish_reason": "stop"}]})

        def test_swallows():
            try:
                httpx.Client(transport=httpx.MockTransport(handler)).post(
                    "http://m/v1/chat/completions", json={"model": "m", "messages": []})
            except Exception:
                pass

        def test_clean():
            pass
    """))
    tests_dir = Path(openai_types.__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(tests_dir)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out and "test_swallows" in out and "choices.0.index" in out, out
    assert "openai types: 1 responses" in out, out
