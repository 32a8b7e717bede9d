"""``/v1/completions``: engine output as a text completion, whole or as chunks (``echo`` included)."""

from __future__ import annotations

import time

from engine.request import GenerationChunk

from ..http.errors import sse_event
from ..protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from .generation import SseShape


def whole(body: CompletionRequest, rid: str, result: GenerationChunk) -> CompletionResponse:
    text = (body.prompt if body.echo and isinstance(body.prompt, str) else "") + result.text
    return CompletionResponse(
        id=rid, model=body.model, usage=UsageInfo.of(result),
        choices=[CompletionChoice(text=text, finish_reason=result.finish_reason,
                                  logprobs=CompletionLogprobs.of(result.logprobs))])


def stream_shape(body: CompletionRequest, rid: str) -> SseShape:
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        c = CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage)
        return sse_event(c.model_dump_json(exclude_none=True))

    echo = chunk([CompletionChoice(text=body.prompt)]) if body.echo and isinstance(body.prompt, str) else None
    return SseShape(
        opening=echo,
        event=lambda item: chunk([CompletionChoice(text=item.text, finish_reason=item.finish_reason,
                                                   logprobs=CompletionLogprobs.of(item.logprobs))]),
        usage=lambda usage: chunk([], usage=usage))
