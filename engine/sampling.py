"""Per-request samplers and logits processors for the shared batch.

Each sampled request draws from its own key, derived from (seed, step), so a seed gives the same
tokens whatever else shares the batch; mlx_lm.server stops batching seeded requests instead.
Greedy requests get ``None`` so mlx-lm keeps its single batched argmax.
"""

from __future__ import annotations

import random
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from .request import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_MASK64 = (1 << 64) - 1


def _step_key(seed: int, step: int) -> mx.array:
    # splitmix-style mixing keeps neighbouring (seed, step) pairs far apart.
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0x94D049BB133111EB) & _MASK64
    return mx.random.key(z ^ (z >> 31))


def make_sampler(params: SamplingParams) -> Sampler | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    temp = params.temperature
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0.0 < params.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    step = 0

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal step
        for f in filters:
            logprobs = f(logprobs)
        key = _step_key(seed, step)
        step += 1
        return mx.random.categorical(logprobs * (1.0 / temp), key=key)

    return sample


def make_processors(params: SamplingParams) -> list[LogitsProcessor]:
    return make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


class RowGuard:
    """Keeps one sequence's failing sampler or logits processor from failing its batch mates.

    mlx-lm calls every row's sampler and processors inside one batch step, so an exception there
    would fail the whole step. Wrapped, the row's error is recorded and the row gets a harmless value
    (its logits unchanged, the argmax token); the scheduler then ends that sequence alone.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def sampler(self, fn: Sampler | None) -> Sampler | None:
        if fn is None:
            return None  # greedy rows keep mlx-lm's single batched argmax

        def guarded(logprobs: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return fn(logprobs)
                except Exception as e:  # noqa: BLE001 - recorded, this row ends after the step
                    self.error = e
            return mx.argmax(logprobs, axis=-1)

        return guarded

    def processor(self, fn: LogitsProcessor) -> LogitsProcessor:
        def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return fn(tokens, logits)
                except Exception as e:  # noqa: BLE001
                    self.error = e
            return logits

        guarded.inner = fn  # type: ignore[attr-defined]  # the batch finds grammar processors through it
        return guarded


def forbid(token_ids: list[int]) -> LogitsProcessor:
    """A processor that never lets these tokens be sampled (a tool-call marker under ``tool_choice: none``)."""
    ids = mx.array(token_ids)

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[..., ids] = -mx.inf
        return logits

    return processor
