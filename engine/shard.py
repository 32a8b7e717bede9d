"""A model sharded across processes: rank 0 runs the engine, the other ranks follow its steps (SPMD).

Every rank holds only its shard (mlx-lm's ``sharded_load``: whole layers in pipeline mode, slices of
every layer in tensor mode), so each forward pass needs all of them at once, meeting in the model's
own collectives. Rank 0 runs the whole engine: scheduler, admission, samplers, grammars, stop strings,
cancellation. Its batch (``ShardedBatch``) records each change it makes to mlx-lm's
``BatchGenerator`` (a sequence inserted, some removed) and sends them, with the order to step, before
each step; the other ranks (``follow``) apply them to a ``BatchGenerator`` of their own and step with
it. Both batches then hold the same rows in the same order and run the same forward passes.

Only rank 0 samples. After each step its next tokens reach the others through one ``all_sum``
(``distributed.share_tokens``), so the followers need no samplers, logits processors or grammars,
and nothing about a request but its prompt tokens and token budget.

An idle group costs nothing: MLX's ring polls while a rank waits in a collective (a core each), so
after ``IDLE_AFTER_S`` without a step rank 0 sends "idle" and the others stop waiting in MLX. They wait
on a bell instead, which the owner of the group provides (a replica: a Ray call to each rank actor),
and rank 0 rings it before its next message. Without a bell, rank 0 sends a keepalive every
``keepalive_s`` and the others keep waiting in the ring.

What a sharded model leaves out, because it would run a forward pass outside the batch: the solo lane,
the interactive first token alone, the prefix cache, a shared prefill for ``n`` choices (each choice
prefills its own prompt), prompt logprobs (refused with a 400), draft models, adapters and vision.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .batch import StepResult, TextBatch
from .distributed import ShardLost, ShardSpec, Watchdog, init_group, receive, send, share_tokens
from .errors import ModelLoadError
from .memory import kv_bytes_per_token
from .models import LoadedModel
from .sampling import LogitsProcessor, Sampler

log = logging.getLogger("mlx_serving.engine")

IDLE_AFTER_S = 2.0  # rank 0 without a step this long lets the other ranks leave the ring (with a bell)
Bell = Callable[[], None]  # rank 0: wake the other ranks; the others: wait until woken


class ShardedBatch(TextBatch):
    """Rank 0's batch: a ``TextBatch`` whose changes and steps are replayed by the other ranks."""

    def __init__(self, model: Any, eos_ids: Sequence[int], *, group: Any, spec: ShardSpec, watchdog: Watchdog,
                 wake: Bell | None = None, **batch_kwargs: Any) -> None:
        super().__init__(model, eos_ids, **batch_kwargs)
        self._group, self._spec, self._watchdog, self._wake = group, spec, watchdog, wake
        self._ops: list[list[Any]] = [["batch", sorted(eos_ids), batch_kwargs]]
        self._sent = self._stepped = time.monotonic()
        self._closed = False
        self._idle = False  # the other ranks wait on the bell, not in the ring

    def insert(self, prompt: list[int], max_tokens: int, sampler: Sampler | None,
               processors: list[LogitsProcessor], cache: list[Any] | None = None,
               cached_tokens: list[int] | None = None, *, first: bool = False) -> int:
        if cache is not None or cached_tokens:
            raise ValueError("a sharded batch starts every sequence from its whole prompt")
        uid = super().insert(prompt, max_tokens, sampler, processors, first=first)
        self._ops.append(["insert", uid, [int(t) for t in prompt], max_tokens, first])
        return uid

    def remove(self, uids: Sequence[int], keep_caches: bool = False) -> dict[int, tuple[list[Any], list[int]]]:
        live = [u for u in uids if u in self._live]
        out = super().remove(uids, keep_caches)
        if live:
            self._ops.append(["remove", live])
        return out

    def step(self) -> list[StepResult]:
        self._ops.append(["step"])
        with self._collective("a step"):
            self._flush()
            results = super().step()
            _share_next_tokens(self._gen, self._group, self.stream, source=True)
        self._stepped = time.monotonic()
        return results

    def keepalive(self) -> None:
        """Between steps (the GPU thread's idle turns). With a bell: after ``IDLE_AFTER_S`` the other
        ranks are sent to wait on it. Without: an empty message every ``keepalive_s``, so they can tell
        an idle rank 0 from a lost one."""
        if self._closed or self._idle:
            return
        now = time.monotonic()
        if self._wake is not None and now - self._stepped >= IDLE_AFTER_S:
            self._ops.append(["idle"])
            with self._collective("sending the other ranks idle"):
                self._flush()
            self._idle = True
        elif now - self._sent >= self._spec.keepalive_s:
            with self._collective("a keepalive"):
                self._flush()

    def close(self) -> None:
        if not self._closed:
            self._ops.append(["stop"])
            try:
                with self._collective("stopping the other ranks"):
                    self._flush()
            finally:
                self._closed = True
        super().close()

    def _flush(self) -> None:
        if self._idle:  # the other ranks are back in the ring once they hear the bell
            assert self._wake is not None
            self._wake()
            self._idle = False
        ops, self._ops = self._ops, []
        send(self._group, ops, self.stream)
        self._sent = time.monotonic()

    def _collective(self, what: str) -> AbstractContextManager[None]:
        return _collective(self._watchdog, what)


@contextmanager
def _collective(watchdog: Watchdog, what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Watchdog armed around a collective; a failure inside it means the group is lost."""
    with watchdog.armed(what, timeout_s):
        try:
            yield
        except ShardLost:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. "[ring] connection to a peer was lost"
            raise ShardLost(f"sharded model: {what} failed: {type(e).__name__}: {e}") from e


def _share_next_tokens(gen: Any, group: Any, stream: Any, *, source: bool) -> None:
    """Make the tokens the next step feeds in rank 0's on every rank (pinned mlx-lm 0.32.2: after
    ``next()`` the generation batch's ``_next_tokens`` holds every row's next input, new rows included)."""
    batch = gen._generation_batch
    if batch._next_tokens is not None and len(batch.uids):
        with mx.stream(stream):
            batch._next_tokens = share_tokens(batch._next_tokens, group, stream, source=source)
        mx.async_eval(batch._next_tokens)


def load_sharded(source: str, spec: ShardSpec, watchdog: Watchdog) -> tuple[Any, Any, dict[str, Any], Any, int | None]:
    """Join the group and load this rank's shard: (model, tokenizer, config, group, KV bytes per token).
    Every rank runs exactly this, in this order: each step of it meets the other ranks."""
    from mlx_lm.utils import sharded_load

    with _collective(watchdog, f"joining the group as rank {spec.rank} of {spec.size}"):
        group = init_group(spec)
    try:
        with _collective(watchdog, "loading the shard", spec.load_timeout_s):
            model, tokenizer, config = sharded_load(
                source, pipeline_group=group if spec.mode == "pipeline" else None,
                tensor_group=group if spec.mode == "tensor" else None, return_config=True)
            kv = kv_bytes_per_token(model)  # a forward pass: every rank runs it
    except ShardLost as e:
        if isinstance(e.__cause__, ValueError):  # the architecture lacks the mode: a config error, not a lost rank
            raise ModelLoadError(f"could not load {source!r} sharded ({spec.mode}): {e.__cause__}") from e.__cause__
        raise
    return model, tokenizer, config, group, kv


def shard_nbytes(model: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_rank0(name: str, source: str, spec: ShardSpec, watchdog: Watchdog, batch_kwargs: dict[str, Any],
               wake: Bell | None = None) -> LoadedModel:
    """Rank 0's side of ``load_sharded``: the model the scheduler serves, with a ``ShardedBatch``."""
    model, tokenizer, config, group, kv = load_sharded(source, spec, watchdog)
    text_cfg = config.get("text_config", config)
    eos_ids = set(tokenizer.eos_token_ids)
    batch = ShardedBatch(model, sorted(eos_ids), group=group, spec=spec, watchdog=watchdog, wake=wake,
                         **batch_kwargs)
    log.info("rank 0 of %d holds its %s shard of %s", spec.size, spec.mode, name)
    return LoadedModel(
        name=name, source=source, model=model, tokenizer=tokenizer, config=config, nbytes=shard_nbytes(model),
        vocab_size=int(text_cfg.get("vocab_size") or len(tokenizer)),
        context_length=int(text_cfg.get("max_position_embeddings") or 0) or 1 << 20,
        eos_ids=eos_ids, batch=batch, kv_per_token=kv, shard=spec)


def follow(source: str, spec: ShardSpec, watchdog: Watchdog, wait_bell: Bell | None = None) -> None:
    """A rank other than 0: load the shard, then replay rank 0's batch until it says stop.
    Returns when rank 0 stops the model; raises ``ShardLost`` when the group breaks. ``wait_bell``
    returns when rank 0 rings (needed only if rank 0 has a bell: it then sends "idle")."""
    if spec.rank == 0:
        raise ValueError("rank 0 runs the engine, not a follower")
    model, _tokenizer, _config, group, _kv = load_sharded(source, spec, watchdog)
    log.info("rank %d of %d holds its %s shard (%.2f GB)", spec.rank, spec.size, spec.mode, shard_nbytes(model) / 1e9)
    stream = mx.new_stream(mx.default_device())
    batch: TextBatch | None = None
    uids: dict[int, int] = {}  # rank 0's uid -> this batch's
    while True:
        with _collective(watchdog, "waiting for rank 0"):
            ops = receive(group, stream)
        for op in ops:
            kind = op[0]
            if kind == "batch":
                eos, kwargs = op[1], op[2]
                batch = TextBatch(model, eos, sampler=_placeholder, **kwargs)
                stream = batch.stream
            elif kind == "insert":
                assert batch is not None
                uids[op[1]] = batch.insert(op[2], op[3], None, [], first=op[4])
            elif kind == "remove":
                assert batch is not None
                batch.remove([uids.pop(u) for u in op[1] if u in uids])
            elif kind == "step":
                assert batch is not None
                with _collective(watchdog, "a step"):
                    for r in batch.step():
                        if r.finish_reason is not None:
                            uids = {k: v for k, v in uids.items() if v != r.uid}
                    _share_next_tokens(batch._gen, group, batch.stream, source=False)
            elif kind == "idle":
                assert wait_bell is not None, "rank 0 went idle with a bell this rank does not have"
                wait_bell()  # outside MLX: no core spent polling the ring
            elif kind == "stop":
                if batch is not None:
                    batch.close()
                return


def _placeholder(logprobs: mx.array) -> mx.array:
    """A follower's 'sampler': its tokens are replaced by rank 0's before they are used."""
    return mx.zeros((logprobs.shape[0],), dtype=mx.uint32)


def supported_modes(model_dir: str) -> set[str]:
    """The shard modes the checkpoint's mlx-lm architecture offers (from its config, without loading
    or allocating anything): ``pipeline`` needs ``model.model.pipeline``, ``tensor`` needs ``model.shard``."""
    import inspect
    import json
    from pathlib import Path

    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import _get_classes  # pinned mlx-lm 0.32.2: the architecture a config names

    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_class, _ = _get_classes(config)
    module = inspect.getmodule(model_class)
    modes = set()
    if any(isinstance(v, type) and issubclass(v, PipelineMixin) and v is not PipelineMixin for v in vars(module).values()):
        modes.add("pipeline")
    if hasattr(model_class, "shard"):
        modes.add("tensor")
    return modes
