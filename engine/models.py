"""Loading models and accounting for their memory. Runs on the GPU thread only.

A source is a local directory or a Hugging Face repo id (``mlx-community/...``); mlx-lm's own
``load`` resolves both, so what works with ``mlx_lm.generate`` works here.
"""

from __future__ import annotations

import gc
import importlib.util
import heapq
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
from mlx.utils import tree_flatten

from .batch import TextBatch
from .chat import ChatFormat, chat_format
from .distributed import ShardSpec
from .errors import ModelLoadError
from .prompt_cache import PromptCache
from .request import ModelInfo


@dataclass
class LoadedModel:
    name: str
    source: str
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    nbytes: int
    vocab_size: int
    context_length: int
    eos_ids: set[int]
    batch: TextBatch
    prompt_cache: PromptCache | None = None
    kind: Literal["text", "vision"] = "text"
    processor: Any = None  # vision models: the mlx-vlm processor (chat template, image preprocessing)
    draft: Any = None  # a small model with the same vocabulary, for speculative decoding
    speculative: dict[str, Any] = field(default_factory=dict)  # request id -> scheduler.Sequence
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    waiting: list = field(default_factory=list)  # heap of scheduler.Sequence
    running: dict[int, Any] = field(default_factory=dict)  # batch uid -> scheduler.Sequence
    lane_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # GPU time: [batch, speculative]
    kv_per_token: int | None = None  # KV cache bytes per token (engine.memory), for memory admission
    solo: dict[str, Any] = field(default_factory=dict)  # request id -> the sequence decoding alone (engine.solo)
    shard: ShardSpec | None = None  # this rank's part when the model is sharded across processes (engine.shard)

    @property
    def sharded(self) -> bool:
        """Every forward pass of a sharded model must go through its batch (the other ranks replay it)."""
        return self.shard is not None

    @cached_property
    def chat(self) -> ChatFormat:
        """The model's tool-call and thinking markers."""
        return chat_format(self.tokenizer)

    @cached_property
    def token_limit(self) -> int:
        """Ids a client may name: tokens of the tokenizer (real checkpoints pad the embedding wider)."""
        return min(self.vocab_size, len(self.tokenizer))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.speculative or self.solo)

    def active(self) -> list[Any]:
        """Every admitted sequence: the batch's, the speculative lane's and the solo lane's."""
        return [*self.running.values(), *self.speculative.values(), *self.solo.values()]

    def new_batch(self, batch_kwargs: dict[str, Any]) -> Any:
        """A fresh, empty batch of the right kind (after a failed step threw the old one away)."""
        if self.kind == "vision":
            from .vision import VisionBatch

            return VisionBatch(self.model, self.processor, sorted(self.eos_ids), **batch_kwargs)
        return TextBatch(self.model, sorted(self.eos_ids), **batch_kwargs)

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name, source=self.source, kind=self.kind, nbytes=self.nbytes, vocab_size=self.vocab_size,
            loaded_at=self.loaded_at, active=len(self.active()), waiting=len(self.waiting),
            draft=self.draft is not None, prompt_cache_bytes=self.prompt_cache.nbytes if self.prompt_cache else 0,
            shard=f"{self.shard.mode}, {self.shard.size} ranks" if self.shard is not None else None,
        )


def detect_kind(source: str) -> Literal["text", "vision"]:
    """A checkpoint with a ``vision_config`` is served through mlx-vlm; anything else through mlx-lm."""
    import json

    config = Path(source).expanduser() / "config.json"
    try:
        return "vision" if "vision_config" in json.loads(config.read_text()) else "text"
    except (OSError, ValueError):
        return "text"


def estimate_bytes(source: str) -> int | None:
    """Weight bytes of a local checkpoint, from file sizes (known before loading anything)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def load_text_model(name: str, source: str, batch_kwargs: dict[str, Any], adapter_path: str | None = None) -> LoadedModel:
    import mlx_lm

    try:
        model, tokenizer, config = mlx_lm.load(source, return_config=True, adapter_path=adapter_path)
    except Exception as e:  # bad path, unknown architecture, hub unreachable, corrupt weights
        raise ModelLoadError(f"could not load model {name!r} from {source!r}: {e}") from e
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    text_cfg = config.get("text_config", config)
    vocab_size = int(text_cfg.get("vocab_size") or len(tokenizer))
    context = int(text_cfg.get("max_position_embeddings") or 0) or 1 << 20
    eos_ids = set(tokenizer.eos_token_ids)
    batch = TextBatch(model, sorted(eos_ids), **batch_kwargs)
    return LoadedModel(
        name=name, source=source, model=model, tokenizer=tokenizer, config=config, nbytes=nbytes,
        vocab_size=vocab_size, context_length=context, eos_ids=eos_ids, batch=batch,
    )


def load_draft_model(m: LoadedModel, source: str) -> Any:
    """The draft must share the target's tokenizer: its tokens are verified by id."""
    import mlx_lm

    try:
        draft, tokenizer, config = mlx_lm.load(source, return_config=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load draft model for {m.name!r} from {source!r}: {e}") from e
    if tokenizer.vocab_size != m.tokenizer.vocab_size or tokenizer.get_vocab() != m.tokenizer.get_vocab():
        raise ModelLoadError(f"draft model {source!r} does not share the vocabulary of {m.name!r}")
    return draft


def warmup(m: LoadedModel) -> None:
    """One short real generation, and the grammar tokenizer built, so the first client pays for neither."""
    if importlib.util.find_spec("llguidance") is not None:  # absent only in stripped-down benchmark installs
        from .structured import compiler_for

        compiler_for(m.tokenizer, m.vocab_size)
    uid = m.batch.insert([0, 1], 2, None, [])
    for _ in range(8):
        if any(r.finish_reason for r in m.batch.step() if r.uid == uid):
            break
    m.batch.remove([uid])


def release(m: LoadedModel) -> None:
    m.batch.close()
    m.model = None
    gc.collect()
    mx.clear_cache()


def lru_victims(models: dict[str, LoadedModel], need: int, budget: int) -> list[str]:
    """Idle models to unload, least recently used first, so ``need`` more bytes fit in ``budget``."""
    used = sum(m.nbytes for m in models.values())
    idle = [(m.last_used, m.name) for m in models.values() if not m.busy]
    heapq.heapify(idle)
    victims = []
    while used + need > budget and idle:
        _, name = heapq.heappop(idle)
        victims.append(name)
        used -= models[name].nbytes
    return victims if used + need <= budget else []
