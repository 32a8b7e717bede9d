"""``/v1/chat/completions``: engine output as a chat completion, whole or as chunks."""

from __future__ import annotations

import time

from engine.request import GenerationChunk

from ..http.errors import sse_event
from ..protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs, UsageInfo,
)
from .generation import SseShape


def whole(body: ChatCompletionRequest, rid: str, result: GenerationChunk) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=rid, model=body.model, usage=UsageInfo.of(result),
        choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason,
                            logprobs=ChatLogprobs.of(result.logprobs))])


def stream_shape(body: ChatCompletionRequest, rid: str) -> SseShape:
    created = int(time.time())

    def chunk(delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None,
              usage: UsageInfo | None = None, choices: bool = True) -> str:
        c = ChatCompletionChunk(
            id=rid, created=created, model=body.model, usage=usage,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else [],
        )
        return sse_event(c.model_dump_json(exclude_none=True))

    return SseShape(
        opening=chunk(ChatDelta(role="assistant", content="")),
        event=lambda item: chunk(ChatDelta(content=item.text), item.finish_reason, ChatLogprobs.of(item.logprobs)),
        usage=lambda usage: chunk(ChatDelta(), usage=usage, choices=False))
