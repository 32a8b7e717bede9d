"""The model replica deployment: one engine (one GPU thread) per replica process.

It is a thin shell: Serve gives it a process, a host pin, health checks and shutdown; the engine
does the work. Errors travel as ``ReplicaError`` items so the ingress can answer with the right
status before it starts a response. The event loop only relays: request preparation runs on the
engine's bounded preparation threads, GPU work on its GPU thread.

A replica with ``shard:`` is rank 0 of a model across hosts (deployments/sharding.py): it starts the
other ranks, and exits when one of them is lost, as when its own GPU thread dies.

A replica whose GPU thread died takes itself out of service at once: its process exits, so every
handle stops routing to it on the first ``ActorDiedError`` and Serve replaces it, with no wait for
a health check. Its streams end with an error event; requests it had not started are retried on
another replica by the ingress (nothing of them was sent yet). A grace period would let the
ingress's retry land on this very replica again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, AsyncIterator

import psutil
import ray
from ray import serve

from engine import sources
from engine.engine import Engine, merge_by_index
from engine.merge import merged
from engine.errors import EngineError, EngineFailureError
from engine.request import ChatMessage, GenerationChunk, ToolDef

from . import logging as events
from .config import FaultInjection, ModelDeploymentConfig
from .load_progress import LoadReporter
from .messages import ReplicaError, ReplicaInfo
from .metrics import RayMetricsObserver
from . import sharding
from .statuses import status_of

log = logging.getLogger("mlx_serving.replica")


class DeliveryTiming:
    """A request's timing as this replica delivered it, written into each choice's final usage: the
    ingress judges SLOs on it. It covers what the engine's own figures do not (preparation, and
    whatever slowed delivery), from the moment the replica received the request."""

    def __init__(self) -> None:
        self.received = time.perf_counter()
        self.first: dict[int, float] = {}  # choice index -> when its first token left

    def restate(self, chunk: GenerationChunk) -> None:
        now = time.perf_counter()
        if chunk.token_ids:
            self.first.setdefault(chunk.index, now)
        u = chunk.usage
        if u is None or chunk.index not in self.first:
            return
        first = self.first[chunk.index]
        u.ttft_s = first - self.received
        u.tpot_s = (now - first) / (u.completion_tokens - 1) if u.completion_tokens > 1 else None


def low_priority_note(niceness: int) -> str | None:
    """Why a replica below normal priority is slow, and the fix. Ray starts workers at nice 15 unless
    ``RAY_worker_niceness`` says otherwise, and such a replica's GPU thread waits behind every normal
    process on its host; nodes that mlx-serving starts set 0 (``cluster.nodes.node_env``)."""
    if niceness <= 0:
        return None
    return (f"this model replica runs at niceness {niceness}: every normal-priority process on this host gets the "
            "CPU before its decoding does. Ray starts its workers at 15 unless RAY_worker_niceness is set; nodes "
            "started by mlx-serving set RAY_worker_niceness=0. Start this node the same way "
            "(RAY_worker_niceness=0 ray start ...).")


class ModelReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ModelDeploymentConfig.model_validate(config)
        events.setup("replica")
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        if (note := low_priority_note(niceness)) is not None:
            log.warning(note)
        self.observer = RayMetricsObserver()  # engine metrics through Ray (deployments.metrics)
        engine_config = self.config.engine_config()
        self.ranks: sharding.ShardRanks | None = None
        if self.config.shard is not None:  # this replica is rank 0 of a model across hosts (deployments.sharding)
            self.ranks = sharding.ShardRanks(self.config)
            specs = self.ranks.spec()
            engine_config = engine_config.model_copy(update={"shard": specs[0]})
            fetched = self.ranks.prepare()
        self.engine = Engine(engine_config, observer=self.observer)
        self.observer.attach(self.engine)
        if self.ranks is not None:
            self.engine.set_shard_bell(self.ranks.wake)
        t0 = time.monotonic()
        source = self.config.model_source()
        progress = LoadReporter(str(source))
        try:
            # A hub id is downloaded here, off the GPU thread, with progress for /ready and the log;
            # the engine's load then finds it in the cache.
            source.local_dir(progress=progress.downloading)
            source.local_adapter()
            draft = sources.resolve(self.config.draft_model) if self.config.draft_model else None
            if self.ranks is not None:
                self.ranks.start(fetched, specs)
            progress.loading()
            # Blocks this constructor until the weights are loaded and warmed up: Serve marks the
            # replica ready only then, so no request ever waits on a cold model.
            self.engine.load_model_blocking(self.config.name, source, draft)
        finally:
            progress.done()
        self.engine.on_death(self._engine_died)
        if self.ranks is not None:
            self.ranks.watch(self._rank_lost)
        events.replica_started(self.config.name, time.monotonic() - t0, source=str(source), niceness=niceness)

    def _engine_died(self, exc: BaseException) -> None:
        self._exit(f"GPU thread died: {type(exc).__name__}: {exc}; the replica exits")

    def _rank_lost(self, what: str) -> None:
        self._exit(f"sharded model: {what}; the replica exits and is rebuilt when its hosts allow")

    def _exit(self, detail: str) -> None:
        events.engine_dead(self.config.name, detail)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    async def generate(self, request: dict[str, Any] | list[dict[str, Any]]) -> AsyncIterator[GenerationChunk | ReplicaError]:
        """Stream chunks; each item holds every token produced since the previous one. A list of
        requests (the prompts of one completion) runs together: choice indexes follow prompt order."""
        if isinstance(request, list):
            async for item in merged([self._offset(self._generate(r), i * int(r.get("n", 1)))
                                      for i, r in enumerate(request)]):
                yield item
                if isinstance(item, ReplicaError):
                    return
            return
        async for item in self._generate(request):
            yield item

    @staticmethod
    async def _offset(items: AsyncIterator[GenerationChunk | ReplicaError], by: int) -> AsyncIterator[GenerationChunk | ReplicaError]:
        async for item in items:
            if isinstance(item, GenerationChunk):
                item.index += by
            yield item

    async def _generate(self, request: dict[str, Any]) -> AsyncIterator[GenerationChunk | ReplicaError]:
        fault = self.config.fault
        try:
            if fault is not None:
                self._drill(fault, request)
            crash_gpu = fault is not None and fault.triggered(fault.crash_gpu_thread_on, request)
            timing = DeliveryTiming()
            async for chunk in self.engine.generate(request):
                if fault and fault.added_latency_per_token_s:
                    await asyncio.sleep(fault.added_latency_per_token_s * max(1, len(chunk.token_ids)))
                timing.restate(chunk)
                yield chunk
                if crash_gpu:  # once this request has its first tokens: it is not retried elsewhere
                    crash_gpu = False
                    self.engine.crash_gpu_thread()
        except EngineError as e:
            self._log_failure(e, request)
            yield ReplicaError.of(e)
        except Exception:  # noqa: BLE001 - a bug: this request fails, with its id, not its traceback
            log.exception("request %s failed", request.get("request_id"))
            yield ReplicaError.of(EngineFailureError(
                f"internal error in the model replica (request id {request.get('request_id')})", code="internal_error"))

    def _drill(self, fault: FaultInjection, request: dict[str, Any]) -> None:
        """Faults the config asks for (canary and chaos drills)."""
        if fault.triggered(fault.crash_process_on, request):
            log.error("fault drill: request %s kills this replica's process", request.get("request_id"))
            os._exit(1)
        if fault.error_probability and random.random() < fault.error_probability:
            raise EngineFailureError("injected fault (fault.error_probability)", code="injected_fault")

    def _log_failure(self, e: EngineError, request: dict[str, Any]) -> None:
        if e.code == "over_capacity":
            events.queue_saturated(self.config.name, "engine", e.message)
        else:
            status = status_of(e)
            log.log(logging.WARNING if status >= 500 else logging.INFO, "request failed", extra={
                "event": "request_failed", "code": e.code, "status": status, "detail": e.message[:300],
                "model": self.config.name, "completion_id": request.get("request_id")})

    async def complete(self, request: dict[str, Any] | list[dict[str, Any]]) -> list[GenerationChunk] | ReplicaError:
        """Each choice's whole output, in choice order."""
        chunks = []
        async for item in self.generate(request):
            if isinstance(item, ReplicaError):
                return item
            chunks.append(item)
        return merge_by_index(chunks)

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_generation_prompt: bool,
                       tools: list[dict] | None = None,
                       template_kwargs: dict[str, Any] | None = None) -> list[int] | ReplicaError:
        def run() -> list[int]:
            msgs = [ChatMessage.model_validate(m) for m in messages] if messages is not None else None
            defs = [ToolDef.model_validate(t) for t in tools] if tools else None
            return self.engine.tokenize(self.config.name, prompt, msgs, add_generation_prompt, defs, template_kwargs)

        try:
            return await self.engine.offload(run)
        except EngineError as e:
            return ReplicaError.of(e)

    async def detokenize(self, tokens: list[int]) -> str | ReplicaError:
        try:
            return await self.engine.offload(self.engine.detokenize, self.config.name, tokens)
        except EngineError as e:
            return ReplicaError.of(e)

    def info(self) -> ReplicaInfo:
        h = self.engine.health()
        ctx = ray.get_runtime_context()
        labels = ctx.get_node_labels() or {}
        host = labels.get("host")
        return ReplicaInfo(
            model=self.config.name, healthy=h.healthy, detail=h.detail,
            host=host if isinstance(host, str) else (host[0] if host else None),
            node_id=ctx.get_node_id(), pid=os.getpid(), active=h.active, waiting=h.waiting, cancelled_total=h.cancelled_total,
            submitted_total=h.submitted_total,
            models=self.engine.list_models(), rss_bytes=psutil.Process().memory_info().rss,
            ranks=self.ranks.ranks if self.ranks is not None else [],
        )

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: a dead or stuck GPU thread is not recoverable."""
        h = self.engine.health()
        if not h.healthy:
            (events.engine_dead if not h.alive else events.replica_unhealthy)(self.config.name, h.detail)
            raise RuntimeError(f"engine unhealthy: {h.detail}")

    async def __del__(self) -> None:
        if self.ranks is not None:
            self.ranks.stopping()  # the engine's stop tells the followers to stop: their end is expected now
        await self.engine.shutdown(self.config.graceful_shutdown_timeout_s)


def replica_deployment(cfg: ModelDeploymentConfig) -> serve.Deployment:
    options: dict[str, Any] = {
        "name": cfg.deployment_name,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": cfg.ray_actor_options(),
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "health_check_period_s": cfg.health_check_period_s,
    }
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = cfg.autoscaling_config
    else:
        options["num_replicas"] = cfg.num_replicas
    if cfg.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = cfg.max_replicas_per_node
    if cfg.shard is not None:
        options.update(sharding.deployment_options(cfg), ray_actor_options=sharding.rank0_actor_options(cfg))
    if cfg.routing == "prefix":
        from ray.serve.config import RequestRouterConfig

        from .routing.prefix_affinity import CLASS_PATH, IMBALANCED_THRESHOLD

        options["request_router_config"] = RequestRouterConfig(
            request_router_class=CLASS_PATH, request_router_kwargs={"imbalanced_threshold": IMBALANCED_THRESHOLD})
    return serve.deployment(ModelReplica).options(**options)
