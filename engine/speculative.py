"""Speculative decoding lane: one request at a time per run, interleaved with the continuous batch.

mlx-lm's ``speculative_generate_step`` drafts ``k`` tokens with the small model and verifies them in
one forward pass of the large one. Its caches are per sequence, so speculative requests cannot join
the shared batch; the scheduler gives each one draft-and-verify round per loop turn, between batch
steps, so neither side starves the other. GPU thread only.
"""

from __future__ import annotations

from typing import Any, Iterator

import mlx.core as mx
from mlx_lm.generate import speculative_generate_step

from .sampling import LogitsProcessor, Sampler


class SpeculativeRun:
    def __init__(self, model: Any, draft: Any, prompt: list[int], *, max_tokens: int, num_draft: int,
                 sampler: Sampler | None, processors: list[LogitsProcessor], stream: Any,
                 prefill_step_size: int) -> None:
        self.max_tokens = max_tokens
        self.num_draft = num_draft
        self.generated = 0
        self.proposed = 0
        self.accepted = 0
        self._gen: Iterator[tuple[int, mx.array, bool]] = speculative_generate_step(
            mx.array(prompt), model, draft, stream, num_draft_tokens=num_draft, max_tokens=max_tokens,
            sampler=sampler, logits_processors=processors or None, prefill_step_size=prefill_step_size,
        )

    def round(self) -> list[tuple[int, mx.array]]:
        """The tokens of one draft-and-verify round: accepted drafts, then the target's own token."""
        self.proposed += min(self.num_draft, self.max_tokens - self.generated)
        out: list[tuple[int, mx.array]] = []
        for token, logprobs, from_draft in self._gen:
            out.append((int(token), logprobs))
            self.generated += 1
            if from_draft:
                self.accepted += 1
            if not from_draft or self.generated >= self.max_tokens:
                break
        return out

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]  # rewinds the caches in the generator's finally
