"""Engine settings (one engine per replica process)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .distributed import ShardSpec
from .images import ImagePolicy


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=1024, description="Sequences decoded together per model.")
    prefill_batch_size: int = Field(8, ge=1, le=256, description="New prompts prefilled together.")
    prefill_step_size: int = Field(2048, ge=16, description="Prompt tokens per prefill chunk.")
    admission_window_ms: float = Field(
        20.0, ge=0.0, le=10_000.0,
        description="While others decode, fewer new prompts than a prefill group wait up to this long for "
                    "more to arrive, so they share one prefill pass; 0 admits at once.")
    max_waiting: int = Field(1024, ge=0, description="Queued requests per model before 429 over_capacity.")
    max_n: int = Field(8, ge=1, le=64, description="Choices one request may ask for (n).")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Weights of all loaded models; the least recently used idle model is unloaded to fit a new one."
    )
    memory_limit_gb: float | None = Field(
        None, gt=0, description="Unified memory this engine's process may use: MLX's memory limit (and on Metal the "
                                "wired limit), and admission keeps weights, the prompt cache and every admitted "
                                "request's KV cache (prompt + max_tokens) inside it, so an oversubscribed Mac answers "
                                "429 instead of swapping (engine/memory.py). A replica takes its memory_gb.")
    default_max_tokens: int = Field(512, ge=1)
    prompt_cache_gb: float = Field(0.5, ge=0.0, description="KV caches of earlier prompts kept for prefix reuse; 0 turns it off.")
    prompt_cache_entries: int = Field(64, ge=1)
    num_draft_tokens: int = Field(3, ge=1, le=32, description="Draft tokens per verify step when a draft model is loaded.")
    max_draft_tokens: int = Field(8, ge=1, le=64, description="Upper bound for a request's own num_draft_tokens.")
    max_speculative: int = Field(4, ge=0, description="Speculative requests served at once (their own lane).")
    speculative_share: float = Field(
        0.25, gt=0.0, lt=1.0,
        description="Most of the GPU thread's time the speculative lane takes while batched requests decode: "
                    "bounds the thread time speculative requests take from the batch. It does not bound their GPU cost: on an "
                    "H200 the batch kept 0.60 of its throughput at 0.25 (docs/benchmarks.md).")
    prepare_workers: int = Field(
        4, ge=1, le=64, description="Threads that prepare requests (tokenize, chat template, images, grammar "
                                    "compile) off the event loop.")
    prepare_queue: int = Field(64, ge=0, description="Requests waiting for a preparation thread before 429.")
    stream_buffer_items: int = Field(8, ge=1, description="Chunks buffered per stream before coalescing.")
    stream_interval_ms: float = Field(
        50.0, ge=0.0, le=1000.0,
        description="After a consumer reads a chunk, it reads again no sooner than this, so tokens decoded "
                    "meanwhile leave as one chunk: fewer wake-ups and, across Ray, fewer messages per token "
                    "(Ray Serve LLM batches streams the same way, every 50 ms). A first and a final chunk "
                    "never wait. 0 sends every token as it comes.")
    stall_timeout_s: float = Field(120.0, gt=0, description="A consumer that reads nothing this long is cut off.")
    stuck_after_s: float = Field(120.0, gt=0, description="Health fails when work waits and the GPU thread has not ticked this long.")
    switch_interval_ms: float | None = Field(
        None, gt=0.0, le=100.0,
        description="Python's thread switch interval for this process, set when the GPU thread starts (None: "
                    "leave it; Python's default is 5 ms). A thread coming back from MLX waits up to this long "
                    "for the GIL while an event loop relays chunks.")
    warmup: bool = True
    images: ImagePolicy = Field(default_factory=ImagePolicy, description="Limits and sources for image inputs.")
    shard: ShardSpec | None = Field(
        None, description="This process is rank 0 of a model sharded across processes (engine/shard.py): the "
                          "model it loads is its shard, and the other ranks replay its steps.")

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 1e9)

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit_gb is None else int(self.memory_limit_gb * 1e9)
