"""SSE events survive every common line splitter, whatever text the model writes."""

from __future__ import annotations

import json

import httpx
import openai

from deployments.http.errors import SSE_DONE, sse_event

# NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR: JSON writes them raw, str.splitlines breaks lines on them.
TEXT = "caf\u00e9 \x85 one\u2028two\u2029three \u4e16"


def chunk(content: str, finish_reason: str | None = None) -> str:
    delta = {"role": "assistant", "content": content}
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]},
                      ensure_ascii=False)


def client_for(body: bytes) -> httpx.Client:
    handler = lambda _: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_an_event_stays_one_line_for_httpx_iter_lines() -> None:
    body = (sse_event(chunk(TEXT)) + SSE_DONE).encode()
    assert "\u2028".encode() not in body and "\x85".encode() not in body
    with client_for(body) as http, http.stream("GET", "http://127.0.0.1/") as r:
        lines = [line for line in r.iter_lines() if line]
    assert len(lines) == 2 and lines[1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == TEXT


def test_the_openai_client_reads_the_same_text() -> None:
    body = (sse_event(chunk(TEXT[:6])) + sse_event(chunk(TEXT[6:], "stop")) + SSE_DONE).encode()
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1/v1", http_client=client_for(body))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == TEXT


def test_plain_ascii_and_values_are_written_as_they_are() -> None:
    assert sse_event('{"a":"b"}') == 'data: {"a":"b"}\n\n'
    assert sse_event({"error": {"message": "x\u2028y"}}) == 'data: {"error":{"message":"x\\u2028y"}}\n\n'
