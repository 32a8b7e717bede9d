"""``/v1/chat/completions``: engine output as a chat completion, whole or as chunks.

The thought goes to ``reasoning_content``, calls to ``tool_calls`` (whole, or as OpenAI's deltas:
the first piece of a call carries its index, id, type and name, later ones fragments of its
arguments), the answer to ``content``; each choice of ``n`` under its own ``index``.
"""

from __future__ import annotations

import time

from engine.request import GenerationChunk

from ..http.errors import sse_event
from ..protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs, ToolCallDeltaOut, UsageInfo,
)
from .generation import SseShape


def whole(body: ChatCompletionRequest, rid: str, results: list[GenerationChunk]) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=rid, model=body.model, usage=UsageInfo.total(results),
        choices=[ChatChoice(index=r.index, message=AssistantMessage.of(r), finish_reason=r.finish_reason,
                            logprobs=ChatLogprobs.of(r.logprobs)) for r in results])


def stream_shape(body: ChatCompletionRequest, rid: str) -> SseShape:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        c = ChatCompletionChunk(id=rid, created=created, model=body.model, usage=usage, choices=choices)
        return sse_event(c.model_dump_json(exclude_none=True))

    def event(item: GenerationChunk) -> str:
        delta = ChatDelta(content=item.text or None, reasoning_content=item.reasoning or None,
                          tool_calls=[ToolCallDeltaOut.of(d) for d in item.tool_calls] if item.tool_calls else None)
        if delta.content is None and delta.reasoning_content is None and delta.tool_calls is None:
            delta.content = ""  # a final or logprobs-only chunk still names its choice's text
        return chunk([ChatChunkChoice(index=item.index, delta=delta, finish_reason=item.finish_reason,
                                      logprobs=ChatLogprobs.of(item.logprobs))])

    return SseShape(
        opening=lambda index: chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]),
        event=event,
        usage=lambda usage: chunk([], usage=usage))
