"""The GPU scheduler: one thread that makes every MLX call of an engine.

MLX streams are bound to the thread that created them, so loading, prefill, decode and unload all
happen here. Callers talk to it through a thread-safe inbox; results leave through the stream
registry. Each loop turn: take commands, drop expired or abandoned work, then for every model with
work admit waiting requests (interactive before batch, earlier deadline first) into its continuous
batch and run one step.

Failures stay as small as they can: an error while handling one sequence (enqueue, expire, admit,
its sampler or logits processors inside a step, delivering or detokenizing its token) ends that
sequence alone, with an error event, and its batch mates carry on; a step that raises fails only
that model's batch; anything escaping the loop kills the thread, every waiter is told (requests not
yet started with ``engine_dead``, which the ingress retries on another replica) and the death
listeners are called at once.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .batch import StepResult, first_logits, prefill
from .chat import Channel
from .config import EngineConfig
from .distributed import ShardLost, Watchdog
from .errors import (
    DeadlineExceededError, EngineError, EngineFailureError, ModelLoadError, ModelNotFoundError,
    OverCapacityError, RequestTooLargeError,
)
from .memory import MemoryBudget, apply_limits, kv_bytes_per_token, restore_limits
from .models import (
    LoadedModel, detect_kind, estimate_bytes, load_draft_model, load_text_model, lru_victims, release, warmup,
)
from .observer import EngineObserver
from .output import SequenceOutput
from .prompt_cache import PromptCache
from .request import GenerationChunk, GenerationRequest, Usage
from .sampling import LogitsProcessor, RowGuard, Sampler
from .scoring import score_prompt
from .shard import load_rank0
from .solo import SoloRun
from .speculative import SpeculativeRun
from .streams import RequestStream, Waker
from .structured import GrammarProcessor
from .sources import ModelSource
from .vision import VisionInputs, load_vision_model, warmup_vision

log = logging.getLogger("mlx_serving.engine")

_PRIORITY = {"interactive": 0, "batch": 1}
_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request on its way through the scheduler (built off-thread, fully validated)."""

    request: GenerationRequest
    prompt: list[int]
    stream: RequestStream
    sampler: Sampler | None
    processors: list[LogitsProcessor]
    deadline: float | None
    submitted: float = field(default_factory=time.monotonic)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    uid: int | None = None
    output: SequenceOutput | None = None
    first_token_at: float | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_draft: int = 0  # > 0: speculative decoding with the model's draft
    spec: SpeculativeRun | None = None
    solo: SoloRun | None = None  # decoding alone (engine.solo) until a second request arrives
    vision: VisionInputs | None = None  # images and rendered prompt, for vision models
    guard: RowGuard = field(default_factory=RowGuard)  # this row's sampler / processor errors
    channel: Channel = "content"  # where the output starts: a thought the prompt opened, or the answer
    tools: list[dict] | None = None  # the request's tools when calls are parsed (tool_choice is not none)
    index: int = 0  # which choice of its request
    group: list[Sequence] | None = None  # the leader of n > 1 choices: all of them, itself first
    prompt_text: str | None = None  # with echo: returned with the first chunk
    prompt_lps: list[Any] | None = None  # the prompt's logprobs, when asked for: with the first chunk

    @property
    def members(self) -> list[Sequence]:
        return self.group or [self]

    @property
    def key(self) -> str:
        """This sequence's own id (its stream's): the request id, plus ``/i`` for choice i > 0."""
        return self.stream.request_id

    def __lt__(self, other: Sequence) -> bool:
        return self._key() < other._key()

    def _key(self) -> tuple[int, float, int]:
        return (_PRIORITY[self.request.priority], self.deadline or float("inf"), self.arrival)


class _Stop(BaseException):
    """Posted to end the loop cleanly."""


class GpuThreadCrash(BaseException):
    """Raised by a fault drill to kill the GPU thread (``Engine.crash_gpu_thread``)."""


def _batch_work_runs(m: LoadedModel) -> bool:
    """Whether batch-priority sequences decode: only then do interactive ones skip the admission window
    and take their first token alone (with every request interactive, they share prefill passes)."""
    return any(s.request.priority == "batch" for s in m.active())


def _speculative(seq: Sequence, m: LoadedModel) -> bool:
    """Whether ``seq`` takes the speculative lane of ``m`` (it asked for drafts and ``m`` has a draft)."""
    return seq.num_draft > 0 and m.draft is not None


class GpuScheduler:
    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None,
                 waker: Waker | None = None) -> None:
        self.config = config
        self.waker = waker or Waker()  # tokens are pushed deferred; each loop turn wakes their consumers once
        self.models: dict[str, LoadedModel] = {}
        self.dead: BaseException | None = None
        self.heartbeat = time.monotonic()
        self.cancelled_total = 0  # sequences dropped because their consumer went away
        self.submitted_total = 0  # requests handed to this thread (the ingress's QoS tests count on it)
        self.first_tokens_alone = 0  # interactive first tokens answered from a prefill of their own (_first_token_alone)
        self.solo_started = 0  # sequences that began in the solo lane (engine.solo)
        self.solo_handovers = 0  # ... and moved to the batch when another request came
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._by_request: dict[str, Sequence] = {}
        self._death_listeners: list[Callable[[BaseException], None]] = []
        self._dying = threading.Lock()
        self.shard_bell: Callable[[], None] | None = None  # wakes a sharded model's idle ranks (engine.shard)
        self.observer = observer or EngineObserver()
        self.memory = MemoryBudget(config.memory_limit_bytes)
        self._thread = threading.Thread(target=self._run, name="mlx-gpu-scheduler", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------------
    def post(self, command: str, payload: Any = None) -> None:
        self._inbox.put((command, payload))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the GPU thread (between steps) and get its result as a future."""
        fut: Future = Future()
        self.post("call", (fn, fut))
        if self.dead is not None:  # the thread may have died between the check and the post
            self._fail_future(fut)
        return fut

    def submit(self, seq: Sequence) -> None:
        self.submitted_total += 1
        self.post("submit", seq)
        if self.dead is not None:
            seq.stream.push(EngineFailureError("the engine's GPU thread died", code="engine_dead"))

    def on_death(self, listener: Callable[[BaseException], None]) -> None:
        """Call ``listener`` (on the dying thread) the moment the loop dies; at once if it already has."""
        self._death_listeners.append(listener)
        if self.dead is not None:
            listener(self.dead)

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self.post("stop")
        self._thread.join(timeout)

    # -- the loop (GPU thread) ------------------------------------------------------------------
    def _run(self) -> None:
        limits: dict[str, tuple[int, int]] = {}
        switch_interval = sys.getswitchinterval()
        try:
            limits = apply_limits(self.memory.limit)
            if self.config.switch_interval_ms is not None:
                sys.setswitchinterval(self.config.switch_interval_ms / 1000)
            while True:
                self._take_commands(block=not any(m.busy for m in self.models.values()))
                now = time.monotonic()
                for m in list(self.models.values()):
                    if m.busy:
                        self._expire(m, now)
                        self._admit(m)
                        self._step(m)
                    elif m.sharded:
                        m.batch.keepalive()  # keepalives, or the other ranks sent to idle outside the ring
                self.waker.flush()
                self.heartbeat = time.monotonic()
        except _Stop:
            self._fail_all(EngineFailureError("engine is shutting down"))
            self._stop_shards()
        except BaseException as e:  # noqa: BLE001 - whatever killed the loop, every waiter must hear
            log.exception("GPU scheduler thread died")
            self._die(e)
        finally:
            restore_limits(limits)
            sys.setswitchinterval(switch_interval)

    def _die(self, e: BaseException) -> None:
        """Fail every waiter and call the death listeners, once: from the dying loop, or from a sharded
        model's watchdog while this thread hangs in a collective that will never complete."""
        with self._dying:
            if self.dead is not None:
                return
            self.dead = e
        self._fail_all(EngineFailureError("the engine's GPU thread died", code="engine_dead"))
        for listener in self._death_listeners:
            try:
                listener(e)
            except Exception:  # noqa: BLE001
                log.exception("engine death listener failed")

    def _stop_shards(self) -> None:
        """Tell the other ranks of a sharded model that it stops (they would otherwise take rank 0's
        silence for a lost group)."""
        for m in self.models.values():
            if m.sharded:
                try:
                    m.batch.close()
                except BaseException:  # noqa: BLE001 - a group already lost has no one left to tell
                    log.warning("model %s: the other ranks could not be told to stop", m.name, exc_info=True)

    def _shard_expired(self, what: str) -> None:
        self._die(ShardLost(f"sharded model: {what} took longer than its timeout"))

    def _take_commands(self, block: bool) -> None:
        try:
            cmd, payload = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd, payload)
            try:
                cmd, payload = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: str, payload: Any) -> None:
        if cmd == "submit":
            try:
                self._enqueue(payload)
            except Exception as e:  # noqa: BLE001 - this request only
                self._fail_seq(self.models.get(payload.request.model), payload, e, "enqueue")
        elif cmd == "cancel":
            seq = self._by_request.get(payload)
            try:
                self._cancel(payload)
            except Exception as e:  # noqa: BLE001
                if seq is not None:
                    self._fail_seq(self.models.get(seq.request.model), seq, e, "cancel")
        elif cmd == "call":
            fn, fut = payload
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
        elif cmd == "stop":
            raise _Stop()
        elif cmd == "crash":
            raise GpuThreadCrash("fault drill: GPU thread crash")

    def _enqueue(self, seq: Sequence) -> None:
        m = self.models.get(seq.request.model)
        if m is None:
            seq.stream.push(ModelNotFoundError(f"model {seq.request.model!r} is not loaded", param="model"))
            return
        if seq.stream.closed:
            return
        free_slots = max(0, self.config.max_batch_size - len(m.running) - len(m.solo))
        if len(m.waiting) >= self.config.max_waiting + free_slots:
            seq.stream.push(OverCapacityError(
                f"model {m.name!r} has {len(m.waiting)} requests waiting", retry_after=1.0))
            return
        for member in seq.members:
            self._by_request[member.key] = member
        heapq.heappush(m.waiting, seq)  # a group waits as its leader and starts as a whole
        m.last_used = time.monotonic()

    def _cancel(self, request_id: str) -> None:
        seq = self._by_request.pop(request_id, None)
        if seq is None:
            return
        m = self.models.get(seq.request.model)
        if m is None:
            return
        self.cancelled_total += 1
        self.observer.on_cancel(m.name)
        if seq.uid is not None:
            m.batch.remove([seq.uid])
            m.running.pop(seq.uid, None)
        elif seq.spec is not None or seq.solo is not None:
            self._finish(m, seq)
        elif seq in m.waiting:
            m.waiting.remove(seq)
            heapq.heapify(m.waiting)

    def _finish(self, m: LoadedModel, seq: Sequence, error: EngineError | None = None) -> None:
        self._by_request.pop(seq.key, None)
        if seq.uid is not None:
            m.running.pop(seq.uid, None)
        if seq.spec is not None and m.speculative.pop(seq.key, None) is not None:
            seq.spec.close()
        if seq.solo is not None:
            m.solo.pop(seq.key, None)
            seq.solo = None
        if error is not None:
            self.observer.on_error(m.name, error.code)
            seq.stream.push(error)

    def _fail_seq(self, m: LoadedModel | None, seq: Sequence, exc: BaseException, stage: str) -> None:
        """End one sequence after an unexpected error while handling it; the rest of the batch goes on.

        The client learns that its request failed, not why (the reason is logged with its id)."""
        rid = seq.request.request_id
        log.error("request %s failed while %s: %r", rid, stage, exc, exc_info=exc)
        err = EngineFailureError(f"generation failed for this request (request id {rid})", code="sequence_failed")
        if m is None:
            self._by_request.pop(seq.key, None)
            seq.stream.push(err)
            return
        try:
            if seq.uid is not None and seq.uid in m.running:
                m.batch.remove([seq.uid])
        except Exception:  # noqa: BLE001 - the batch may be the thing that failed; the step path rebuilds it
            log.exception("removing failed request %s from the batch", rid)
        if seq in m.waiting:
            m.waiting.remove(seq)
            heapq.heapify(m.waiting)
        self._finish(m, seq, err)

    def _expire(self, m: LoadedModel, now: float) -> None:
        stall = self.config.stall_timeout_s
        for seq in [s for s in m.waiting if (s.deadline and s.deadline <= now) or s.stream.closed]:
            m.waiting.remove(seq)
            heapq.heapify(m.waiting)
            self._finish(m, seq, DeadlineExceededError("deadline passed while the request waited in the queue"))
        dropped = []
        for seq in m.active():
            try:
                if seq.deadline and seq.deadline <= now:
                    dropped.append((seq, DeadlineExceededError("deadline passed during generation")))
                elif seq.stream.closed:
                    self.cancelled_total += 1
                    self.observer.on_cancel(m.name)
                    dropped.append((seq, None))
                elif seq.stream.stalled(stall, now):
                    dropped.append((seq, EngineFailureError(f"consumer read nothing for {stall:.0f}s",
                                                            code="consumer_stalled")))
            except Exception as e:  # noqa: BLE001
                self._fail_seq(m, seq, e, "expiring")
        if dropped:
            m.batch.remove([s.uid for s, _ in dropped if s.uid is not None])
            for seq, err in dropped:
                self._finish(m, seq, err)

    def _admit(self, m: LoadedModel) -> None:
        """Admit in priority order; a request whose lane is full waits without blocking the other lane."""
        free = self.config.max_batch_size - len(m.running) - len(m.solo)  # a solo sequence holds its batch slot
        free_spec = self.config.max_speculative - len(m.speculative) if m.draft is not None else 0
        hold = self._hold_prefill(m, free)
        deferred = []
        while (free > 0 or free_spec > 0) and m.waiting:
            seq = heapq.heappop(m.waiting)
            speculative = _speculative(seq, m)
            needed = len(seq.members)  # a group of n choices needs n free slots at once
            if (free_spec if speculative else free) < needed or (hold and not speculative):
                deferred.append(seq)
                continue
            verdict = self._memory_verdict(m, seq)
            if verdict == "failed":
                continue
            if verdict == "wait":
                deferred.append(seq)
                deferred += m.waiting  # no overtaking: a large request is not starved by smaller ones
                m.waiting = []
                break
            try:  # a vision model runs its vision tower here: a failure fails this request only
                self._start(m, seq, speculative)
            except Exception as e:  # noqa: BLE001
                self._fail_seq(m, seq, e, "admitting")
                continue
            if speculative:
                free_spec -= 1
            else:
                free -= needed
            self.observer.on_admit(m.name, time.monotonic() - seq.submitted)
        for seq in deferred:
            heapq.heappush(m.waiting, seq)

    def _kv_tokens(self, seq: Sequence) -> int:
        return len(seq.prompt) + seq.request.sampling.max_tokens

    def _memory_verdict(self, m: LoadedModel, seq: Sequence) -> Literal["admit", "wait", "failed"]:
        """Whether ``seq``'s KV cache fits beside the weights and what is admitted (engine.memory).
        One that could never fit is answered with 413 here ("failed")."""
        if self.memory.limit is None:
            return "admit"
        weights = sum(x.nbytes for x in self.models.values())
        need = self.memory.need(self._kv_tokens(seq) * len(seq.members), m.kv_per_token)
        if self.memory.never_fits(weights, need):
            self._finish(m, seq, RequestTooLargeError(
                f"this request may need {need / 2**30:.2f} GiB of KV cache ({len(seq.prompt)} prompt tokens + "
                f"max_tokens {seq.request.sampling.max_tokens}), more than this replica's memory limit of "
                f"{self.memory.limit / 2**30:.2f} GiB leaves beside its weights; lower max_tokens or shorten the prompt",
                param="max_tokens"))
            return "failed"
        reserved = sum(self.memory.need(self._kv_tokens(s), x.kv_per_token) for x in self.models.values()
                       for s in x.active())
        cached = sum(x.prompt_cache.nbytes for x in self.models.values() if x.prompt_cache is not None)
        return "admit" if self.memory.fits(weights, cached, reserved, need) else "wait"

    def _start(self, m: LoadedModel, seq: Sequence, speculative: bool) -> None:
        """Put ``seq`` into the speculative lane or the batch."""
        p = seq.request.sampling
        seq.output = SequenceOutput(m.tokenizer, p, m.eos_ids, m.chat, seq.channel, seq.tools)
        if speculative:
            seq.spec = SpeculativeRun(
                m.model, m.draft, seq.prompt, max_tokens=p.max_tokens, num_draft=seq.num_draft,
                sampler=seq.sampler, processors=seq.processors, stream=m.batch.stream,
                prefill_step_size=self.config.prefill_step_size)
            m.speculative[seq.key] = seq
            return
        cache, cached = self._prefix(m, seq)
        if p.max_tokens == 0 or len(seq.members) > 1:
            self._start_group(m, seq, cache, cached)
            return
        seq.cached_tokens = self._reused(seq, cached)
        if not m.sharded and (self._start_solo(m, seq, cache, cached) or self._first_token_alone(m, seq, cache, cached)):
            return
        prompt = seq.vision if seq.vision is not None else seq.prompt[cached:]
        seq.uid = m.batch.insert(prompt, p.max_tokens, seq.sampler, seq.processors, cache=cache,
                                 cached_tokens=seq.prompt[:cached], first=seq.request.priority == "interactive")
        seq.vision = None  # the batch holds what it needs; drop the decoded images
        m.running[seq.uid] = seq

    def _first_token_alone(self, m: LoadedModel, seq: Sequence, cache: list[Any] | None, cached: int) -> bool:
        """An interactive prompt arriving while batch-priority sequences decode is prefilled on its own
        and its first token answered at once; the sequence then joins the batch for the rest. Its time to
        first token so waits for the step in flight only, not for steps of the whole batch that its
        prefill and first decode would otherwise ride in. True when done this way (the sequence now runs
        in the batch, or has already ended).

        Only beside batch-priority work: when every request is interactive (the default) there is no
        one to overtake, and prompts keep sharing prefill passes. Grammar-constrained rows keep the
        batch path too: their matcher advances with the batch's mask pass."""
        p = seq.request.sampling
        if (seq.request.priority != "interactive" or m.kind != "text" or seq.vision is not None
                or not _batch_work_runs(m)
                or any(isinstance(getattr(x, "inner", x), GrammarProcessor) for x in seq.processors)):
            return False
        cache, first, logprobs = self._first_token(m, seq, cache, cached)
        reason = "stop" if first in m.eos_ids else "length" if p.max_tokens <= 1 else None
        self.first_tokens_alone += 1
        done = self._deliver(m, seq, StepResult(-1, first, logprobs, reason), time.monotonic())
        self.waker.flush()  # its reader wakes now, not after the batch step this turn still runs
        if not done:
            seq.uid = m.batch.insert([first], p.max_tokens - 1, seq.sampler, seq.processors, cache=cache,
                                     cached_tokens=seq.prompt)
            m.running[seq.uid] = seq
        return True

    def _first_token(self, m: LoadedModel, seq: Sequence, cache: list[Any] | None,
                     cached: int) -> tuple[list[Any], int, mx.array]:
        """Prefill ``seq``'s prompt on its own and sample its first token: (cache, token, logprobs)."""
        stream = m.batch.stream
        cache, logits = first_logits(m.model, seq.prompt[cached:], cache, stream, self.config.prefill_step_size)
        with mx.stream(stream):
            context = mx.array(seq.prompt, dtype=mx.int32)
            for processor in seq.processors:  # as mlx-lm's batch applies them: on the logits, with the history
                logits = processor(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = seq.sampler(logprobs) if seq.sampler is not None else mx.argmax(logprobs, axis=-1)
            mx.eval(token, logprobs)
        if seq.guard.error is not None:
            raise seq.guard.error
        return cache, int(token.item()), logprobs[0]

    def _start_solo(self, m: LoadedModel, seq: Sequence, cache: list[Any] | None, cached: int) -> bool:
        """A request with nothing beside it decodes in the solo lane (engine.solo) until another one
        arrives. True when started this way (or already ended with its first token)."""
        p = seq.request.sampling
        if (m.kind != "text" or seq.vision is not None or p.max_tokens <= 1 or m.waiting or m.active()
                or any(isinstance(getattr(x, "inner", x), GrammarProcessor) for x in seq.processors)):
            return False
        cache, first, logprobs = self._first_token(m, seq, cache, cached)
        reason = "stop" if first in m.eos_ids else None
        if self._deliver(m, seq, StepResult(-1, first, logprobs, reason, cache, list(seq.prompt)), time.monotonic()):
            return True
        self.waker.flush()  # the first token leaves before the next step is even queued
        seq.solo = SoloRun(m.model, cache, seq.prompt, first, max_tokens=p.max_tokens, sampler=seq.sampler,
                           processors=seq.processors, stream=m.batch.stream, logprobs=p.logprobs)
        m.solo[seq.key] = seq
        self.solo_started += 1
        return True

    def _step_solo(self, m: LoadedModel) -> None:
        """One token for the solo sequence; once another request is admitted, the token in flight is
        delivered and the sequence joins the batch (first in its prefill queue: one token to feed)."""
        for seq in list(m.solo.values()):
            run = seq.solo
            assert run is not None
            join = bool(m.running or m.speculative)  # a newcomer was admitted (one held by the window is not yet)
            t0 = time.monotonic()
            try:
                token, logprobs = run.step(queue_next=not join)
                if seq.guard.error is not None:
                    raise seq.guard.error
                reason = "stop" if token in m.eos_ids else "length" if run.generated >= run.max_tokens else None
                now = time.monotonic()
                done = self._deliver(m, seq, StepResult(-1, token, logprobs, reason, run.cache, run.cache_tokens()), now)
                self.observer.on_step(m.name, 1, now - t0, len(m.active()), len(m.waiting))
                if done or not join:
                    continue
                cache, held, nxt = run.hand_over()
                m.solo.pop(seq.key)
                seq.solo = None
                seq.uid = m.batch.insert([nxt], run.max_tokens - run.generated, seq.sampler, seq.processors,
                                         cache=cache, cached_tokens=held, first=True)
                m.running[seq.uid] = seq
                self.solo_handovers += 1
            except Exception as e:  # noqa: BLE001 - fail this request only
                m.solo.pop(seq.key, None)
                seq.solo = None
                self._fail_seq(m, seq, e, "decoding alone")

    def _prefix(self, m: LoadedModel, seq: Sequence) -> tuple[list[Any] | None, int]:
        """A KV cache of the prompt's first tokens and how many it holds: from scoring the prompt when its
        logprobs are asked for (the cache scoring fills is kept), else from the prefix cache."""
        request = seq.request
        if request.prompt_logprobs is not None:
            cache, seq.prompt_lps = score_prompt(m.model, seq.prompt, request.prompt_logprobs, m.batch.stream,
                                                 m.tokenizer.decode)
            if can_trim_prompt_cache(cache):  # the last prompt token is fed again to start generation
                trim_prompt_cache(cache, 1)
                return cache, len(seq.prompt) - 1
            return None, 0
        if m.prompt_cache is None:
            return None, 0
        cache, cached = m.prompt_cache.lookup(seq.prompt, request.cache_scope)
        self.observer.on_prefix_lookup(m.name, len(seq.prompt), cached)
        return cache, cached

    @staticmethod
    def _reused(seq: Sequence, cached: int) -> int:
        """Prompt tokens served from the prefix cache (a cache that scoring just filled reuses nothing)."""
        return 0 if seq.request.prompt_logprobs is not None else cached

    def _start_group(self, m: LoadedModel, leader: Sequence, cache: list[Any] | None, cached: int) -> None:
        """The n choices of one request: the prompt is prefilled once, each choice decodes from a copy
        of that cache. With ``max_tokens`` 0 (scoring only) each choice ends at once."""
        prompt, p = leader.prompt, leader.request.sampling
        if p.max_tokens == 0:
            for member in leader.members:
                member.prompt_lps = leader.prompt_lps
                self._score_only(m, member, self._reused(leader, cached))
            return
        shared = not m.sharded  # a sharded model: each choice prefills its own prompt
        if shared:
            cache = prefill(m.model, prompt[cached:-1], cache, m.batch.stream, self.config.prefill_step_size)
        for member in leader.members:
            member.cached_tokens, member.prompt_lps = self._reused(leader, cached), leader.prompt_lps
            if member is not leader:
                member.output = SequenceOutput(m.tokenizer, p, m.eos_ids, m.chat, member.channel, member.tools)
            if shared:
                member.uid = m.batch.insert(prompt[-1:], p.max_tokens, member.sampler, member.processors,
                                            cache=copy.deepcopy(cache) if cache is not None else None,
                                            cached_tokens=prompt[:-1])
            else:
                member.uid = m.batch.insert(prompt, p.max_tokens, member.sampler, member.processors)
            m.running[member.uid] = member

    def _score_only(self, m: LoadedModel, seq: Sequence, cached: int) -> None:
        """``max_tokens`` 0: the answer is the prompt (and its logprobs), nothing is generated."""
        usage = Usage.model_construct(prompt_tokens=len(seq.prompt), completion_tokens=0,
                                      total_tokens=len(seq.prompt), cached_tokens=cached)
        self._finish(m, seq)
        self.observer.on_finish(m.name, usage.prompt_tokens, 0, cached, time.monotonic() - seq.submitted, "length")
        seq.stream.push(GenerationChunk.model_construct(
            request_id=seq.request.request_id, index=seq.index, finish_reason="length", usage=usage,
            prompt_text=seq.prompt_text, prompt_logprobs=seq.prompt_lps))

    def _hold_prefill(self, m: LoadedModel, free: int) -> bool:
        """Whether the waiting text requests should wait a little for more to join their prefill pass.

        A prefill pass costs nearly the same for a few prompts as for a group, and closed-loop clients
        send their next requests a few at a time just after their previous ones end. Only while other
        sequences decode (an idle batch admits at once), never past ``admission_window_ms``, and never
        for an interactive request beside batch-priority work (its time to first token is what its user
        waits on; with only interactive work, the default, there is no one to overtake).
        """
        window = self.config.admission_window_ms / 1000.0
        if window <= 0 or not (m.running or m.solo) or free <= 0:
            return False
        text = [s for s in m.waiting if not _speculative(s, m)]
        if not text or len(text) >= min(self.config.prefill_batch_size, free) or (
                any(s.request.priority == "interactive" for s in text) and _batch_work_runs(m)):
            return False
        return time.monotonic() - min(s.submitted for s in text) < window

    def _step(self, m: LoadedModel) -> None:
        if m.solo:
            self._step_solo(m)
        if not (m.speculative and m.running):  # shares count only while both lanes have work
            m.lane_seconds[:] = [0.0, 0.0]
        if m.speculative and self._speculative_turn(m):
            t0 = time.monotonic()
            self._speculate(m)
            m.lane_seconds[1] += time.monotonic() - t0
        if not m.running:
            return
        t0 = time.monotonic()
        try:
            results = m.batch.step()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail this batch, keep serving
            log.exception("generation step failed for model %s", m.name)
            err = EngineFailureError(f"generation step failed: {e}")
            for seq in list(m.running.values()):
                self._finish(m, seq, err)
            m.batch.close()
            m.batch = m.new_batch(self._batch_kwargs())
            return
        now = time.monotonic()
        m.lane_seconds[0] += now - t0
        for seq in [s for s in m.running.values() if s.guard.error is not None]:
            self._fail_seq(m, seq, seq.guard.error, "sampling")  # type: ignore[arg-type]
        for r in results:
            seq = m.running.get(r.uid)
            if seq is not None:
                try:
                    self._deliver(m, seq, r, now)
                except Exception as e:  # noqa: BLE001
                    self._fail_seq(m, seq, e, "delivering a token")
        m.last_used = now
        self.observer.on_step(m.name, len(results), now - t0, len(m.running), len(m.waiting))

    def _speculative_turn(self, m: LoadedModel) -> bool:
        """Whether the speculative lane runs a round now: it may take ``speculative_share`` of the GPU
        thread's time while batched requests decode (all of it when none do)."""
        if not m.running:
            return True
        batch, spec = m.lane_seconds
        share = self.config.speculative_share
        return spec * (1.0 - share) <= batch * share

    def _speculate(self, m: LoadedModel) -> None:
        """One draft-and-verify round for every speculative sequence of ``m``."""
        for seq in list(m.speculative.values()):
            run = seq.spec
            assert run is not None
            try:
                tokens = run.round()
            except Exception as e:  # noqa: BLE001 - fail this request only
                self._fail_seq(m, seq, e, "speculating")
                continue
            if seq.guard.error is not None:
                self._fail_seq(m, seq, seq.guard.error, "sampling")
                continue
            now = time.monotonic()
            if not tokens:
                self._finish(m, seq, EngineFailureError("speculative decoding ended before max_tokens"))
            try:
                for i, (token, logprobs) in enumerate(tokens):
                    last = i == len(tokens) - 1 and run.generated >= run.max_tokens
                    reason = "stop" if token in m.eos_ids else ("length" if last else None)
                    if self._deliver(m, seq, StepResult(-1, token, logprobs, reason), now):
                        break
            except Exception as e:  # noqa: BLE001
                self._fail_seq(m, seq, e, "delivering a token")
        m.last_used = time.monotonic()

    def _deliver(self, m: LoadedModel, seq: Sequence, r: StepResult, now: float) -> bool:
        """Emit one token of ``seq``; True when that token finished it."""
        out = seq.output
        assert out is not None
        piece = out.add(r.token, r.logprobs)
        finish = "stop" if piece.stop_hit or r.finish_reason == "stop" else r.finish_reason
        first = seq.first_token_at is None
        if finish is None and not first and piece.logprob is None and not piece.reasoning and not piece.tool_calls:
            seq.stream.push_token(piece.text, r.token)  # the common case: answer text, nothing else
            return False
        if first:
            seq.first_token_at = now
            self.observer.on_first_token(m.name, now - seq.submitted)
        usage = None
        if finish is not None:
            if piece.stop_hit and seq.uid is not None:
                kept = m.batch.remove([r.uid], keep_caches=m.prompt_cache is not None)
                r.cache, r.all_tokens = kept.get(r.uid, (None, None))
            else:
                tail = out.finish()
                piece.text += tail.text
                piece.reasoning += tail.reasoning
                piece.tool_calls += tail.tool_calls
            if finish == "stop" and out.calls:
                finish = "tool_calls"
            if m.prompt_cache is not None and r.cache is not None and r.all_tokens:
                try:  # the answer is complete: a cache that cannot be kept costs only a later hit
                    m.prompt_cache.store(r.all_tokens, r.cache, seq.request.cache_scope)
                except Exception:  # noqa: BLE001
                    log.exception("storing the prompt cache of request %s failed", seq.request.request_id)
            decoded = out.completion_tokens - 1
            usage = Usage.model_construct(
                prompt_tokens=len(seq.prompt), completion_tokens=out.completion_tokens,
                total_tokens=len(seq.prompt) + out.completion_tokens, cached_tokens=seq.cached_tokens,
                draft_tokens=seq.spec.proposed if seq.spec else None,
                accepted_draft_tokens=seq.spec.accepted if seq.spec else None,
                ttft_s=seq.first_token_at - seq.submitted,
                tpot_s=(now - seq.first_token_at) / decoded if decoded > 0 else None,
            )
            if seq.spec is not None:
                self.observer.on_speculative(m.name, seq.spec.proposed, seq.spec.accepted)
            self._finish(m, seq)
            self.observer.on_finish(m.name, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                                    now - seq.submitted, finish, ttft_s=seq.first_token_at - seq.submitted)
        seq.stream.push(GenerationChunk.model_construct(
            request_id=seq.request.request_id, text=piece.text, reasoning=piece.reasoning,
            tool_calls=piece.tool_calls or None, token_ids=[r.token],
            logprobs=[piece.logprob] if piece.logprob is not None else None, finish_reason=finish, usage=usage,
            index=seq.index, prompt_text=seq.prompt_text if first else None,
            prompt_logprobs=seq.prompt_lps if first else None,
        ), deferred=True)
        return finish is not None

    def _fail_all(self, err: EngineError) -> None:
        self.waker.flush()  # a consumer with a wake-up still due would never hear the error otherwise
        for m in self.models.values():
            for seq in [*m.waiting, *m.active()]:
                seq.stream.push(err)  # a stream that got tokens already ends with this error event
            m.waiting.clear()
            m.running.clear()
            m.speculative.clear()
            m.solo.clear()
        self._by_request.clear()
        while True:
            try:
                cmd, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd == "submit":
                payload.stream.push(err)
            elif cmd == "call":
                self._fail_future(payload[1])

    def _fail_future(self, fut: Future) -> None:
        if not fut.done() and fut.set_running_or_notify_cancel():
            fut.set_exception(EngineFailureError("the engine's GPU thread died", code="engine_dead"))

    # -- model management (run through call(), so on the GPU thread) -----------------------------
    def _batch_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {"max_batch_size": c.max_batch_size, "prefill_batch_size": c.prefill_batch_size,
                "prefill_step_size": c.prefill_step_size}

    def load(self, name: str, source: str | ModelSource, draft_source: str | None = None) -> LoadedModel:
        """Load ``source`` (mlx-lm, or mlx-vlm when it has a vision config), evicting idle models to fit."""
        if name in self.models:
            return self.models[name]
        spec = source if isinstance(source, ModelSource) else ModelSource(source)
        try:  # a hub id becomes its local snapshot first: what it is (text or vision) is read from there
            source, adapter = spec.local_dir(), spec.local_adapter()
        except Exception as e:  # noqa: BLE001 - hub unreachable, unknown repo or revision, not in the cache offline
            raise ModelLoadError(f"could not fetch model {name!r} ({spec}): {type(e).__name__}: {e}") from e
        budget = self.config.memory_budget_bytes
        if budget is not None:
            need = estimate_bytes(source)
            if need is not None:
                if need > budget:
                    raise ModelLoadError(
                        f"model {name!r} needs {need / 1e9:.2f} GB, more than the engine's memory budget of {budget / 1e9:.2f} GB")
                victims = lru_victims(self.models, need, budget)
                if not victims and sum(m.nbytes for m in self.models.values()) + need > budget:
                    raise OverCapacityError(
                        f"loading {name!r} needs {need / 1e9:.2f} GB and every loaded model is busy", retry_after=5.0)
                for victim in victims:
                    log.info("unloading %s (least recently used) to make room for %s", victim, name)
                    self.unload(victim)
        t0 = time.monotonic()
        shard = self.config.shard
        if shard is not None:
            if draft_source is not None or adapter is not None or detect_kind(source) == "vision":
                raise ModelLoadError(f"model {name!r}: a sharded model takes no draft model, adapter or vision tower")
            if any(x.sharded for x in self.models.values()):
                raise ModelLoadError(f"model {name!r}: this engine already serves its one sharded model")
            watchdog = Watchdog(shard.step_timeout_s, self._shard_expired)
            m = load_rank0(name, source, shard, watchdog, self._batch_kwargs(), wake=self.shard_bell)
        elif detect_kind(source) == "vision":
            m = load_vision_model(name, source, self._batch_kwargs(), adapter)
            if self.config.warmup:
                warmup_vision(m, self.config.images)
        else:
            m = load_text_model(name, source, self._batch_kwargs(), adapter)
        m.source = str(spec)
        if self.memory.limit is not None and not m.sharded:  # a shard measured it on every rank as it loaded
            m.kv_per_token = kv_bytes_per_token(m.model if m.kind == "text" else m.model.language_model)
        if draft_source is not None:
            m.draft = load_draft_model(m, draft_source)
        if self.config.warmup:
            warmup(m)
        if self.config.prompt_cache_gb > 0 and m.kind == "text" and not m.sharded:
            m.prompt_cache = PromptCache(int(self.config.prompt_cache_gb * 1e9), self.config.prompt_cache_entries)
        self.models[name] = m
        self.observer.on_load(name, time.monotonic() - t0, m.nbytes)
        return m

    def unload(self, name: str) -> bool:
        m = self.models.pop(name, None)
        if m is None:
            return False
        err = ModelNotFoundError(f"model {name!r} was unloaded", param="model")
        for seq in [*m.waiting, *m.active()]:
            self._finish(m, seq, err)
        release(m)
        self.observer.on_unload(name)
        return True
