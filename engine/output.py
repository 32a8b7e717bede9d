"""Token ids -> text for one sequence: streaming detokenization, stop strings, logprobs.

Stop strings are matched on text, so one split across several tokens is still caught; any tail of
the pending text that could begin a stop string is held back until it is resolved, so a stop string
is never emitted, not even in part.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .request import FinishReason, SamplingParams, TokenLogprob, TopLogprob


class SequenceOutput:
    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: set[int]) -> None:
        self._tok = tokenizer
        self._detok = tokenizer.detokenizer
        self._stops = params.stop
        self._want_logprobs = params.logprobs
        self._top = params.top_logprobs
        self._eos = eos_ids
        self._pending = ""
        self.completion_tokens = 0

    def add(self, token: int, logprobs: mx.array | None) -> tuple[str, TokenLogprob | None, bool]:
        """Consume one generated token: (text safe to emit, its logprob, whether a stop string hit)."""
        self.completion_tokens += 1
        lp = self._logprob(token, logprobs) if self._want_logprobs and logprobs is not None else None
        if token in self._eos:
            return "", lp, False
        self._detok.add_token(token)
        self._pending += self._detok.last_segment
        text, hit = self._release()
        return text, lp, hit

    def finish(self) -> str:
        """Flush what the detokenizer and the stop-string matcher held back."""
        self._detok.finalize()
        self._pending += self._detok.last_segment
        text, _ = self._release(final=True)
        return text

    def _release(self, final: bool = False) -> tuple[str, bool]:
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending, False
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        if final:
            self._pending = ""
            return pending, False
        hold = _longest_stop_prefix_suffix(pending, self._stops)
        self._pending = pending[len(pending) - hold:] if hold else ""
        return pending[: len(pending) - hold], False

    def _logprob(self, token: int, logprobs: mx.array) -> TokenLogprob:
        lp = logprobs.reshape(-1)
        entry = TokenLogprob.model_construct(
            token_id=token, token=self._tok.decode([token]), logprob=lp[token].item(), top_logprobs=[]
        )
        if self._top:
            idx = mx.argpartition(-lp, self._top - 1)[: self._top]
            vals = lp[idx]
            order = mx.argsort(-vals)
            for i, v in zip(idx[order].tolist(), vals[order].tolist()):
                entry.top_logprobs.append(
                    TopLogprob.model_construct(token_id=i, token=self._tok.decode([i]), logprob=v)
                )
        return entry


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string.

    Runs on the GPU thread for every token: only the places where a stop string's first character
    occurs are tried, each with one C-level comparison, so a long stop string costs no quadratic loop.
    """
    best = 0
    for s in stops:
        i = text.find(s[0], max(0, len(text) - len(s) + 1))
        while i != -1 and len(text) - i > best:
            if s.startswith(text[i:]):  # the earliest match is the longest tail
                best = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return best


def finish_reason_of(mlx_reason: str | None, stop_hit: bool) -> FinishReason | None:
    if stop_hit:
        return "stop"
    if mlx_reason == "length":
        return "length"
    if mlx_reason == "stop":
        return "stop"
    return None
