"""The solo lane: a lone sequence decoded at the speed of mlx-lm's own loop, not the batch's.

When a model has one request and nothing else, batching buys nothing and costs per-step work (the
batched cache's masks, per-row splits of the logits). On CUDA ``BatchGenerator`` decoding a single
sequence ran at about 0.6x of ``stream_generate``. A lone user is the commonest case of all, so a
sequence that starts with nothing beside it decodes here instead: a plain KV cache, one forward per
token, the next step queued before the current token is read (as ``generate_step`` does). When a
second request arrives, the step in flight is finished and delivered, and the sequence joins the
batch with its cache (``hand_over``), like an interactive first token does: no token is lost or
computed twice, and sampling, logits processors and logprobs are the batch path's. A greedy
sequence that asked for no logprobs takes the argmax of its logits: no normalisation over the vocabulary
that nobody reads (``stream_generate`` always pays for it). Like ``generate_step``, the lane hands MLX's
buffer cache back every ``CLEAR_CACHE_EVERY`` tokens (mlx-lm's batch loop does so every 512 steps):
without it, a long-lived server's cache holds every size of buffer its answers ever needed.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .sampling import LogitsProcessor, Sampler

CLEAR_CACHE_EVERY = 256  # tokens, as mlx-lm's generate_step


class SoloRun:
    """GPU thread only. ``first`` (already delivered) was sampled from ``cache`` after ``prompt``."""

    def __init__(self, model: Any, cache: list[Any], prompt: list[int], first: int, *, max_tokens: int,
                 sampler: Sampler | None, processors: list[LogitsProcessor], stream: Any, logprobs: bool) -> None:
        self.model, self.cache, self.stream = model, cache, stream
        self.sampler, self.processors = sampler, processors
        self._normalise = logprobs or sampler is not None  # else only the argmax is needed
        self.max_tokens = max_tokens  # including ``first``
        self.tokens = list(prompt) + [first]  # every token so far; the cache holds all but the pending input
        self.generated = 1
        self._context = mx.array(self.tokens, dtype=mx.int32) if processors else None
        self._pending: tuple[mx.array, mx.array | None] | None = self._forward(mx.array([first], dtype=mx.int32))

    def _forward(self, y: mx.array) -> tuple[mx.array, mx.array | None] | None:
        """Queue the step that feeds ``y`` (the last token, maybe not evaluated yet)."""
        if self.generated >= self.max_tokens:
            return None
        with mx.stream(self.stream):
            logits = self.model(y[None], cache=self.cache)[:, -1, :]
            if self._context is not None:
                self._context = mx.concatenate([self._context, y])
                for processor in self.processors:
                    logits = processor(self._context, logits)
            if self._normalise:
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                token = self.sampler(logprobs) if self.sampler is not None else mx.argmax(logprobs, axis=-1)
            else:
                logprobs, token = None, mx.argmax(logits, axis=-1)
        mx.async_eval([token] if logprobs is None else [token, logprobs])
        return token, logprobs

    def step(self, queue_next: bool = True) -> tuple[int, mx.array | None]:
        """The next token and its logprobs (None when neither asked for nor sampled from); unless told
        not to (before ``hand_over``), the step after it is queued before this one is read."""
        assert self._pending is not None, "stepped past max_tokens"
        token, logprobs = self._pending
        self.generated += 1
        self._pending = self._forward(token) if queue_next else None
        out = int(token.item())
        self.tokens.append(out)
        if self.generated % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        return out, None if logprobs is None else logprobs[0]

    def cache_tokens(self) -> list[int]:
        """The tokens whose keys and values the cache holds (for the prompt cache at the end)."""
        return self.tokens if self._pending is not None else self.tokens[:-1]

    def hand_over(self) -> tuple[list[Any], list[int], int]:
        """For the batch, after a last ``step(queue_next=False)``: (cache, the tokens it holds, the next
        input token, already delivered)."""
        assert self._pending is None
        return self.cache, self.tokens[:-1], self.tokens[-1]
