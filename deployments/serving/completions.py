"""``/v1/completions``: engine output as a text completion, whole or as chunks.

With ``echo`` a choice's text starts with the prompt (and, with ``logprobs``, its logprobs start
with the prompt's: the first is null); with several prompts, their choices come in prompt order.
"""

from __future__ import annotations

import time

from engine.request import GenerationChunk

from ..http.errors import sse_event
from ..protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from .generation import SseShape


def _choice(item: GenerationChunk, offset: int = 0) -> CompletionChoice:
    return CompletionChoice(index=item.index, text=(item.prompt_text or "") + item.text,
                            finish_reason=item.finish_reason, logprobs=CompletionLogprobs.of(item, offset))


def whole(body: CompletionRequest, rid: str, results: list[GenerationChunk]) -> CompletionResponse:
    return CompletionResponse(id=rid, model=body.model, usage=UsageInfo.total(results),
                              choices=[_choice(r) for r in results])


def stream_shape(body: CompletionRequest, rid: str) -> SseShape:
    created = int(time.time())
    sent: dict[int, int] = {}  # characters of each choice's text sent so far (logprobs' text_offset)

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        c = CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage)
        return sse_event(c.model_dump_json(exclude_none=True))

    def event(item: GenerationChunk) -> str:
        choice = _choice(item, sent.get(item.index, 0))
        sent[item.index] = sent.get(item.index, 0) + len(choice.text)
        return chunk([choice])

    return SseShape(opening=lambda index: None, event=event, usage=lambda usage: chunk([], usage=usage))
