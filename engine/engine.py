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

from .chat import render_chat
from .config import EngineConfig
from .constraints import constraint_processors
from .merge import merged
from .errors import (
    EngineError, EngineFailureError, InvalidRequestError, ModelNotFoundError, NotReadyError,
)
from .models import LoadedModel
from .observer import EngineObserver
from .pool import BoundedPool
from .request import ChatMessage, GenerationChunk, GenerationRequest, ModelInfo, ToolDef
from .sampling import RowGuard, make_processors, make_sampler
from .sources import ModelSource
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
    submitted_total: int
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

    def set_shard_bell(self, ring: Callable[[], None]) -> None:
        """Before loading a sharded model: how to wake its other ranks once they idle outside MLX's
        ring (engine.shard); a replica rings its rank actors."""
        self._scheduler.shard_bell = ring

    def crash_gpu_thread(self) -> None:
        """Fault drills only: kill the GPU thread the way an MLX abort would, between two steps."""
        self._scheduler.post("crash")

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a preparation thread (429 when they are all taken)."""
        return await asyncio.wrap_future(self._prepare.submit(fn, *args))

    # -- models ---------------------------------------------------------------------------------
    async def load_model(self, name: str, source: str | ModelSource, draft_source: str | None = None) -> ModelInfo:
        """Load (and warm up) ``source`` as ``name``; concurrent calls for one name load it once."""
        m: LoadedModel = await asyncio.wrap_future(self._load_future(name, source, draft_source))
        return m.info()

    def load_model_blocking(self, name: str, source: str | ModelSource, draft_source: str | None = None) -> ModelInfo:
        """``load_model`` for synchronous callers (a replica's constructor)."""
        return self._load_future(name, source, draft_source).result().info()

    def _load_future(self, name: str, source: str | ModelSource, draft_source: str | None) -> Future:
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
                 add_generation_prompt: bool = True, tools: list[ToolDef] | None = None,
                 template_kwargs: dict[str, Any] | None = None) -> list[int]:
        m = self._model(model)
        if messages is not None:
            if m.kind == "vision":
                _vision_chat_only(tools, template_kwargs)
                return list(prepare_vision_inputs(m.processor, m.model.config, messages, self.config.images,
                                                  add_generation_prompt=add_generation_prompt).input_ids)
            return render_chat(m.tokenizer, m.chat, messages, add_generation_prompt, tools, template_kwargs)
        return list(m.tokenizer.encode(text or ""))

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        m = self._model(model)
        _check_ids(token_ids, m.token_limit, "tokens")
        return m.tokenizer.decode(token_ids)

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
            _vision_chat_only(request.tools, request.chat_template_kwargs)
            vision = prepare_vision_inputs(m.processor, m.model.config, request.messages, self.config.images,
                                           context_length=m.context_length, max_tokens=p.max_tokens)
            prompt = list(vision.input_ids)
        elif request.messages is not None:
            prompt = render_chat(m.tokenizer, m.chat, request.messages, True, request.tools,
                                 request.chat_template_kwargs)
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
        self._check_n(m, request.n)
        if (request.prompt_logprobs is not None or p.max_tokens == 0) and vision is not None:
            raise InvalidRequestError("prompt logprobs and max_tokens 0 are not supported for vision models",
                                      param="max_tokens", code="unsupported_parameter")
        if request.prompt_logprobs is not None and m.sharded:  # scoring is a forward pass outside the batch
            raise InvalidRequestError("prompt logprobs are not supported for a model sharded across hosts",
                                      param="prompt_logprobs", code="unsupported_parameter")
        prompt_text = None
        if request.echo:
            prompt_text = request.prompt if request.prompt is not None else m.tokenizer.decode(prompt)
        channel = m.chat.first_channel(prompt) if request.messages is not None else "content"
        constraints = constraint_processors(m, request, channel)  # compiled here: a bad schema is a 400 now
        deadline = time.monotonic() + request.timeout_s if request.timeout_s else None
        num_draft = 0
        scoring = request.prompt_logprobs is not None or p.max_tokens == 0
        if m.draft is not None and not constraints and request.n == 1 and not scoring:  # the rest: the batch
            wanted = self.config.num_draft_tokens if request.num_draft_tokens is None else request.num_draft_tokens
            if wanted > self.config.max_draft_tokens:
                raise InvalidRequestError(f"num_draft_tokens may be at most {self.config.max_draft_tokens}",
                                          param="num_draft_tokens")
            num_draft = wanted
        tools = ([t.model_dump(exclude_none=True) for t in request.tools]
                 if request.tools and request.effective_tool_choice != "none" else None)
        members = []
        try:
            for i in range(request.n):
                # Each choice samples on its own (seed + i: reproducible) with its own grammar matchers.
                p_i = p if i == 0 or p.seed is None else p.model_copy(update={"seed": p.seed + i})
                processors = make_processors(p_i) + (constraints if i == 0 else
                                                     constraint_processors(m, request, channel))
                guard = RowGuard()  # this choice's sampler and processors fail it alone, not its batch
                stream = self._registry.open(request.request_id if i == 0 else f"{request.request_id}/{i}", stream_loop,
                                             chunk_id=request.request_id, index=i)
                members.append(Sequence(
                    request=request, prompt=prompt, stream=stream, sampler=guard.sampler(make_sampler(p_i)),
                    processors=[guard.processor(f) for f in processors], deadline=deadline, num_draft=num_draft,
                    vision=vision, guard=guard, channel=channel, tools=tools, index=i, prompt_text=prompt_text))
        except BaseException:
            for seq in members:
                self._registry.close(seq.key)
            raise
        if len(members) > 1:
            members[0].group = members
        return members[0]

    def _check_n(self, m: LoadedModel, n: int) -> None:
        if n > self.config.max_n:
            raise InvalidRequestError(f"n may be at most {self.config.max_n}", param="n")
        if n > 1 and m.kind == "vision":
            raise InvalidRequestError("n > 1 is not supported for vision models yet", param="n",
                                      code="unsupported_parameter")
        if n > self.config.max_batch_size:
            raise InvalidRequestError(f"n ({n}) is larger than the batch ({self.config.max_batch_size})", param="n")

    async def generate(self, request: GenerationRequest | dict[str, Any]) -> AsyncIterator[GenerationChunk]:
        """Stream a request's output; closing the iterator cancels the generation."""
        if not isinstance(request, GenerationRequest):
            try:
                request = GenerationRequest.model_validate(request)
            except ValidationError as e:
                raise InvalidRequestError(_first_error(e)) from e
        prepared = self._prepare.submit(self.prepare, request, asyncio.get_running_loop())
        try:
            leader = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:  # the caller left while a worker prepared: drop what it opens
            prepared.add_done_callback(lambda f: self._close(f.result()) if _succeeded(f) else None)
            raise
        self._scheduler.submit(leader)
        try:
            interval = self.config.stream_interval_ms / 1000
            async for chunk in merged([_chunks(seq.stream, interval) for seq in leader.members]):
                yield chunk
        finally:
            self._close(leader)

    def _close(self, leader: Sequence) -> None:
        for seq in leader.members:
            self._registry.close(seq.key)

    async def complete(self, request: GenerationRequest | dict[str, Any]) -> GenerationChunk:
        """The whole output as one chunk (non-streaming callers; the first choice when n > 1)."""
        return (await self.complete_all(request))[0]

    async def complete_all(self, request: GenerationRequest | dict[str, Any]) -> list[GenerationChunk]:
        """Each choice's whole output, in choice order."""
        return merge_by_index([chunk async for chunk in self.generate(request)])

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
            models=[m.name for m in models], active=sum(len(m.active()) for m in models),
            waiting=sum(len(m.waiting) for m in models), cancelled_total=s.cancelled_total,
            submitted_total=s.submitted_total,
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


async def _chunks(stream: Any, interval_s: float) -> AsyncIterator[GenerationChunk]:
    """One stream's chunks until its final one (its errors raise); the next read waits until
    ``interval_s`` after the last, unless the consumer took that long itself."""
    loop = asyncio.get_running_loop()
    while True:
        chunk = await stream.next()
        read = loop.time()
        yield chunk
        if chunk.finish_reason is not None:
            return
        if interval_s:
            wait = read + interval_s - loop.time()
            if wait > 0:
                await stream.pause(wait)


def merge_by_index(chunks: list[GenerationChunk]) -> list[GenerationChunk]:
    """One whole chunk per choice, in choice order."""
    by_index: dict[int, list[GenerationChunk]] = {}
    for c in chunks:
        by_index.setdefault(c.index, []).append(c)
    return [GenerationChunk.concat(by_index[i]) for i in sorted(by_index)]


def _vision_chat_only(tools: list[ToolDef] | None, template_kwargs: dict[str, Any] | None) -> None:
    """What vision models do not honour yet: refused, not ignored."""
    if tools:
        raise InvalidRequestError("tools are not supported for vision models yet", param="tools",
                                  code="tools_unsupported")
    if template_kwargs:
        raise InvalidRequestError("chat_template_kwargs are not supported for vision models yet",
                                  param="chat_template_kwargs", code="unsupported_parameter")


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
