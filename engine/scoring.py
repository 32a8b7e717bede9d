"""Prompt logprobs: what the model thinks of every prompt token, for evaluation clients.

``/v1/completions`` with ``echo`` and ``logprobs`` returns them (the first is null: nothing predicts
the first token), as OpenAI's legacy completions and vLLM do; lm-evaluation-harness scores
log-likelihood tasks with them. The prompt runs through the model in chunks on the GPU thread,
keeping only each position's logprob of the actual next token and its top ones (never a whole
position-by-vocabulary matrix), and the KV cache it fills is the one generation continues from.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .request import TokenLogprob, TopLogprob

SCORE_STEP = 256  # prompt tokens per chunk: bounds the logits held at once (chunk x vocabulary)


def score_prompt(model: Any, tokens: list[int], top: int, stream: Any, decode: Any) -> tuple[list[Any], list[TokenLogprob]]:
    """(the KV cache of all of ``tokens``, each token's logprob with its ``top`` alternatives; the first
    token's logprob is None)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [TokenLogprob.model_construct(token_id=tokens[0], token=decode(tokens[:1]), logprob=None, top_logprobs=[])]
    previous: mx.array | None = None  # the last position's logprobs of the previous chunk
    with mx.stream(stream):
        for start in range(0, len(tokens), SCORE_STEP):
            chunk = tokens[start:start + SCORE_STEP]
            logits = model(mx.array(chunk)[None], cache=cache)[0].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            # Row j predicts token j + 1: the rows for this chunk's tokens are the previous chunk's last
            # row and all but this chunk's last row.
            rows = logprobs[:-1] if previous is None else mx.concatenate([previous, logprobs[:-1]])
            targets = chunk[1:] if previous is None else chunk
            previous = logprobs[-1:]
            if targets:
                out.extend(_entries(rows, targets, top, decode))
            mx.eval([c.state for c in cache])
    return cache, out


def _entries(rows: mx.array, targets: list[int], top: int, decode: Any) -> list[TokenLogprob]:
    ids = mx.array(targets)[:, None]
    values = mx.take_along_axis(rows, ids, axis=1)[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in targets]
    if top > 0:
        idx = mx.argpartition(-rows, top - 1, axis=1)[:, :top]
        vals = mx.take_along_axis(rows, idx, axis=1)
        order = mx.argsort(-vals, axis=1)
        idx, vals = mx.take_along_axis(idx, order, axis=1).tolist(), mx.take_along_axis(vals, order, axis=1).tolist()
        tops = [list(zip(i, v)) for i, v in zip(idx, vals)]
    return [TokenLogprob.model_construct(
        token_id=t, token=decode([t]), logprob=v,
        top_logprobs=[TopLogprob.model_construct(token_id=i, token=decode([i]), logprob=lv) for i, lv in alts])
        for t, v, alts in zip(targets, values, tops)]
