"""Adapter over mlx-lm's ``BatchGenerator``: the one place that knows its API (pinned mlx-lm 0.32.2).

mlx-lm's batching API changed between 0.31 and 0.32; everything else in the engine talks to this
small surface: insert one sequence, remove some, step once, report what is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from .sampling import LogitsProcessor, Sampler
from .structured import GrammarProcessor, MaskPass


@dataclass(slots=True)
class StepResult:
    uid: int
    token: int
    logprobs: mx.array | None  # None from the solo lane when nothing reads them (engine.solo)
    finish_reason: str | None  # "stop" (EOS) or "length" from mlx-lm
    cache: list[Any] | None = None  # the finished sequence's KV cache, for the prompt cache
    all_tokens: list[int] | None = None  # the tokens that cache holds


def prefill(model: Any, tokens: list[int], cache: list[Any] | None, stream: Any, step: int) -> list[Any] | None:
    """The KV cache after ``tokens`` (continuing ``cache``, or a new one), in chunks of ``step``; on the
    batch's stream. None when there is nothing to prefill and no cache to continue. Each chunk's
    activations go back from MLX's buffer cache, as in mlx-lm's own prefill loops."""
    if not tokens:
        return cache
    from mlx_lm.models.cache import make_prompt_cache

    cache = cache if cache is not None else make_prompt_cache(model)
    with mx.stream(stream):
        for i in range(0, len(tokens), step):
            model(mx.array(tokens[i:i + step])[None], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
    return cache


def first_logits(model: Any, tokens: list[int], cache: list[Any] | None, stream: Any,
                 step: int) -> tuple[list[Any], mx.array]:
    """``prefill`` of all of ``tokens`` (at least one), and the logits after the last: shape (1, vocab)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = prefill(model, tokens[:-1], cache, stream, step)
    cache = cache if cache is not None else make_prompt_cache(model)
    with mx.stream(stream):
        logits = model(mx.array(tokens[-1:])[None], cache=cache)[:, -1, :]
    return cache, logits


class TextBatch:
    """Continuous batch for one text model. Must be created and used on the GPU thread."""

    def __init__(self, model: Any, eos_ids: Sequence[int], *, max_batch_size: int,
                 prefill_batch_size: int, prefill_step_size: int, sampler: Sampler | None = None) -> None:
        self._gen = BatchGenerator(
            model,
            sampler=sampler,  # rows inserted without a sampler of their own (None: greedy)
            stop_tokens=[[t] for t in eos_ids] or None,
            completion_batch_size=max_batch_size,
            prefill_batch_size=min(prefill_batch_size, max_batch_size),
            prefill_step_size=prefill_step_size,
            stream=mx.new_stream(mx.default_device()),
        )
        self.stream = self._gen.stream  # the GPU thread's stream, shared with the speculative lane
        self._live: set[int] = set()
        self._constrained: set[int] = set()  # live uids with a grammar: their masks are one pass a step
        self._masks = MaskPass()
        self._first: set[int] = set()  # uids put ahead of the prefill queue (interactive prompts)

    def insert(self, prompt: list[int], max_tokens: int, sampler: Sampler | None,
               processors: list[LogitsProcessor], cache: list[Any] | None = None,
               cached_tokens: list[int] | None = None, *, first: bool = False) -> int:
        """Queue a sequence; with ``cache`` (KV of ``cached_tokens``) only ``prompt`` is prefilled.

        ``first``: prefill it before the prompts already queued (after other ``first`` ones), so an
        interactive prompt does not wait for a row of batch prompts' prefill chunks."""
        (uid,) = self._gen.insert(
            [prompt], max_tokens=[max_tokens], samplers=[sampler], logits_processors=[processors],
            caches=[cache] if cache is not None else None,
            all_tokens=[list(cached_tokens)] if cached_tokens else None,
        )
        if first:
            self._to_front(uid)
        self._live.add(uid)
        if any(isinstance(getattr(p, "inner", p), GrammarProcessor) for p in processors):
            self._constrained.add(uid)
        return uid

    def _to_front(self, uid: int) -> None:
        queued = self._gen._unprocessed_sequences  # pinned 0.32.2: a deque of (uid, segments, ...), prefilled in order
        if not queued or queued[-1][0] != uid:
            return
        entry = queued.pop()
        self._first = {u for u in self._first if any(q[0] == u for q in queued)}  # those still queued
        at = 0
        while at < len(queued) and queued[at][0] in self._first:
            at += 1
        queued.insert(at, entry)
        self._first.add(uid)

    def remove(self, uids: Sequence[int], keep_caches: bool = False) -> dict[int, tuple[list[Any], list[int]]]:
        """Drop sequences; with ``keep_caches`` return each one's (KV cache, tokens it holds)."""
        uids = [u for u in uids if u in self._live]
        if not uids:
            return {}
        caches = self._gen.remove(uids, return_prompt_caches=keep_caches)
        self._live.difference_update(uids)
        self._constrained.difference_update(uids)
        return caches

    def step(self) -> list[StepResult]:
        """One scheduling step: a decode step for running sequences and a prefill chunk for new ones."""
        if self._constrained:
            decoding = self._gen._generation_batch  # pinned 0.32.2: the rows the next decode step samples
            self._masks.arm(decoding._next_tokens, decoding.logits_processors)
        try:
            _, responses = self._gen.next()
        finally:
            self._masks.disarm()
        out = []
        for r in responses:
            if r.uid not in self._live:
                continue
            if r.finish_reason is not None:
                self._live.discard(r.uid)
                self._constrained.discard(r.uid)
            out.append(StepResult(r.uid, r.token, r.logprobs, r.finish_reason, r.prompt_cache, r.all_tokens))
        return out

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        self._gen.close()
