"""The ``Engine`` facade: what a replica (or any process) uses to serve models.

Validation, tokenization, chat templates, images and grammar compiles run on a bounded pool of
preparation threads (``BoundedPool``: 429 when full), so a bad request fails before it reaches the
GPU thread and the caller's event loop only relays; only validated sequences reach the scheduler.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from .config import EngineConfig
from .errors import (
    EngineError, EngineFailureError, InvalidRequestError, ModelNotFoundError, NotReadyError,
)
from .models import LoadedModel
from .observer import EngineObserver
from .pool import BoundedPool
from .request import ChatMessage, GenerationChunk, GenerationRequest, ImagePart, ModelInfo
from .sampling import RowGuard, make_processors, make_sampler
from .scheduler import GpuScheduler, Sequence
from .streams import StreamRegistry, Waker
from .vision import prepare_vision_inputs

T = TypeVar("T")


class EngineHealth(BaseModel):
    alive: bool
    stuck: bool
    healthy: bool
    detail: str
    models: list[str]
    active: int
    waiting: int
    cancelled_total: int
    seconds_since_tick: float


class Engine:
    def __init__(self, config: EngineConfig | None = None, observer: EngineObserver | None = None) -> None:
        self.config = config or EngineConfig()
        waker = Waker()
        self._scheduler = GpuScheduler(self.config, observer, waker)
        self._registry = StreamRegistry(
            on_close=lambda rid: self._scheduler.post("cancel", rid),
            max_items=self.config.stream_buffer_items, waker=waker,
        )
        self._loading: dict[str, Future] = {}
        self._load_lock = threading.Lock()
        self._accepting = True
        self._prepare = BoundedPool(self.config.prepare_workers, self.config.prepare_queue)

    def on_death(self, listener: Callable[[BaseException], None]) -> None:
        """Call ``listener`` the moment the GPU thread dies (from that thread): a replica uses it to
        take itself out of service at once instead of at its next health check."""
        self._scheduler.on_death(listener)

    def crash_gpu_thread(self) -> None:
        """Fault drills only: kill the GPU thread the way an MLX abort would, between two steps."""
        self._scheduler.post("crash")

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a preparation thread (429 when they are all taken)."""
        return await asyncio.wrap_future(self._prepare.submit(fn, *args))

    # -- models ---------------------------------------------------------------------------------
    async def load_model(self, name: str, source: str, draft_source: str | None = None) -> ModelInfo:
        """Load (and warm up) ``source`` as ``name``; concurrent calls for one name load it once."""
        m: LoadedModel = await asyncio.wrap_future(self._load_future(name, source, draft_source))
        return m.info()

    def load_model_blocking(self, name: str, source: str, draft_source: str | None = None) -> ModelInfo:
        """``load_model`` for synchronous callers (a replica's constructor)."""
        return self._load_future(name, source, draft_source).result().info()

    def _load_future(self, name: str, source: str, draft_source: str | None) -> Future:
        with self._load_lock:
            fut = self._loading.get(name)
            if fut is not None:
                return fut
            fut = self._scheduler.call(lambda: self._scheduler.load(name, source, draft_source))
            self._loading[name] = fut
        # Outside the lock: a future already done (a dead engine fails it at once) runs the callback
        # right here, and the callback takes the lock.
        fut.add_done_callback(lambda _f: self._forget_load(name, _f))
        return fut

    def _forget_load(self, name: str, fut: Future) -> None:
        with self._load_lock:
            if self._loading.get(name) is fut:
                del self._loading[name]

    async def unload_model(self, name: str) -> bool:
        return await asyncio.wrap_future(self._scheduler.call(lambda: self._scheduler.unload(name)))

    def list_models(self) -> list[ModelInfo]:
        return [m.info() for m in list(self._scheduler.models.values())]

    def _model(self, name: str) -> LoadedModel:
        m = self._scheduler.models.get(name)
        if m is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded", param="model")
        return m

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, model: str, text: str | None = None, messages: list[ChatMessage] | None = None,
                 add_generation_prompt: bool = True) -> list[int]:
        m = self._model(model)
        if messages is not None:
            if m.kind == "vision":
                return list(prepare_vision_inputs(m.processor, m.model.config, messages, self.config.images,
                                                  add_generation_prompt=add_generation_prompt).input_ids)
            return self._render_chat(m, messages, add_generation_prompt)
        return list(m.tokenizer.encode(text or ""))

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        m = self._model(model)
        _check_ids(token_ids, m.token_limit, "tokens")
        return m.tokenizer.decode(token_ids)

    def _render_chat(self, m: LoadedModel, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        if any(isinstance(p, ImagePart) for msg in messages if isinstance(msg.content, list) for p in msg.content):
            raise InvalidRequestError(f"model {m.name!r} does not accept images", param="messages")
        dicts = [msg.model_dump(exclude_none=True) for msg in messages]
        for d, msg in zip(dicts, messages):
            d["content"] = msg.text()
        try:
            return list(m.tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt))
        except Exception as e:  # jinja templates raise for roles or orders they do not support
            raise InvalidRequestError(f"the model's chat template rejected the messages: {e}", param="messages") from e

    # -- generation -----------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest, stream_loop: asyncio.AbstractEventLoop) -> Sequence:
        """Validate against the model and build the sequence; raises ``EngineError`` on bad input."""
        if not self._accepting:
            raise NotReadyError("engine is shutting down")
        if not self._scheduler.alive:
            raise EngineFailureError("the engine's GPU thread died", code="engine_dead")
        m = self._model(request.model)
        p = request.sampling
        vision = None
        if request.messages is not None and m.kind == "vision":
            vision = prepare_vision_inputs(m.processor, m.model.config, request.messages, self.config.images,
                                           context_length=m.context_length, max_tokens=p.max_tokens)
            prompt = list(vision.input_ids)
        elif request.messages is not None:
            prompt = self._render_chat(m, request.messages, True)
        elif request.prompt is not None:
            prompt = list(m.tokenizer.encode(request.prompt))
        else:
            prompt = list(request.prompt_token_ids or [])
        if not prompt:
            raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
        _check_ids(prompt, m.token_limit, "prompt")
        if len(prompt) + p.max_tokens > m.context_length:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({p.max_tokens}) exceeds the model's context of {m.context_length} tokens",
                param="max_tokens", code="context_length_exceeded")
        if p.logit_bias:
            _check_ids(list(p.logit_bias), m.token_limit, "logit_bias")
        if p.top_k >= m.vocab_size:  # keeping every token is what a top_k past the vocabulary means
            p = p.model_copy(update={"top_k": 0})
        processors = make_processors(p)
        spec = None
        if request.response_format is not None:  # compiled here, off the GPU thread: a bad schema is a 400 now
            from .grammar import spec_from_response_format
            from .structured import compiler_for

            spec = spec_from_response_format(request.response_format)
        if spec is not None:
            processors.append(compiler_for(m.tokenizer, m.vocab_size).compile(spec).make_processor())
        deadline = time.monotonic() + request.timeout_s if request.timeout_s else None
        num_draft = 0
        if m.draft is not None and spec is None:  # constrained requests stay in the batch
            wanted = self.config.num_draft_tokens if request.num_draft_tokens is None else request.num_draft_tokens
            if wanted > self.config.max_draft_tokens:
                raise InvalidRequestError(f"num_draft_tokens may be at most {self.config.max_draft_tokens}",
                                          param="num_draft_tokens")
            num_draft = wanted
        guard = RowGuard()  # this request's sampler and processors fail it alone, not its batch
        stream = self._registry.open(request.request_id, stream_loop)
        return Sequence(request=request, prompt=prompt, stream=stream, sampler=guard.sampler(make_sampler(p)),
                        processors=[guard.processor(f) for f in processors], deadline=deadline,
                        num_draft=num_draft, vision=vision, guard=guard)

    async def generate(self, request: GenerationRequest | dict[str, Any]) -> AsyncIterator[GenerationChunk]:
        """Stream a request's output; closing the iterator cancels the generation."""
        if not isinstance(request, GenerationRequest):
            try:
                request = GenerationRequest.model_validate(request)
            except ValidationError as e:
                raise InvalidRequestError(_first_error(e)) from e
        rid = request.request_id
        prepared = self._prepare.submit(self.prepare, request, asyncio.get_running_loop())
        try:
            seq = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:  # the caller left while a worker prepared: drop what it opens
            prepared.add_done_callback(lambda f: self._registry.close(rid) if _succeeded(f) else None)
            raise
        self._scheduler.submit(seq)
        try:
            while True:
                chunk = await seq.stream.next()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self._registry.close(request.request_id)

    async def complete(self, request: GenerationRequest | dict[str, Any]) -> GenerationChunk:
        """The whole output as one chunk (non-streaming callers)."""
        result: GenerationChunk | None = None
        async for chunk in self.generate(request):
            result = chunk if result is None else result.merge(chunk)
        assert result is not None
        return result

    # -- health and lifecycle -------------------------------------------------------------------
    def health(self) -> EngineHealth:
        s = self._scheduler
        models = list(s.models.values())
        busy = any(m.busy for m in models)
        since = time.monotonic() - s.heartbeat
        stuck = busy and since > self.config.stuck_after_s
        alive = s.alive
        detail = "ok" if alive and not stuck else (f"GPU thread dead: {s.dead!r}" if not alive else f"GPU thread has not ticked for {since:.0f}s")
        return EngineHealth(
            alive=alive, stuck=stuck, healthy=alive and not stuck, detail=detail,
            models=[m.name for m in models], active=sum(len(m.running) + len(m.speculative) for m in models),
            waiting=sum(len(m.waiting) for m in models), cancelled_total=s.cancelled_total,
            seconds_since_tick=since,
        )

    @property
    def open_streams(self) -> int:
        return len(self._registry)

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, let in-flight streams finish (up to the timeout), stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while len(self._registry) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._scheduler.stop)
        self._prepare.shutdown()


def _check_ids(ids: list[int], limit: int, param: str) -> None:
    """Token ids a client sends must name tokens of the tokenizer (a padded embedding is wider)."""
    if not ids:
        return
    low, high = min(ids), max(ids)
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {limit})", param=param,
                                  code="token_id_out_of_range")


def _succeeded(f: Future) -> bool:
    return not f.cancelled() and f.exception() is None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


__all__ = ["Engine", "EngineError", "EngineHealth"]
