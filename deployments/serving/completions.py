"""``/v1/completions``: engine output as a text completion, whole or as chunks (``echo`` included)."""

from __future__ import annotations

import time

from engine.request import GenerationChunk

from ..http.errors import sse_event
from ..protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from .generation import SseShape


def _echo(body: CompletionRequest) -> str:
    return body.prompt if body.echo and isinstance(body.prompt, str) else ""


def whole(body: CompletionRequest, rid: str, results: list[GenerationChunk]) -> CompletionResponse:
    return CompletionResponse(
        id=rid, model=body.model, usage=UsageInfo.total(results),
        choices=[CompletionChoice(index=r.index, text=_echo(body) + r.text, finish_reason=r.finish_reason,
                                  logprobs=CompletionLogprobs.of(r.logprobs)) for r in results])


def stream_shape(body: CompletionRequest, rid: str) -> SseShape:
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        c = CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage)
        return sse_event(c.model_dump_json(exclude_none=True))

    return SseShape(
        opening=lambda index: chunk([CompletionChoice(index=index, text=_echo(body))]) if _echo(body) else None,
        event=lambda item: chunk([CompletionChoice(index=item.index, text=item.text, finish_reason=item.finish_reason,
                                                   logprobs=CompletionLogprobs.of(item.logprobs))]),
        usage=lambda usage: chunk([], usage=usage))
