"""Engine metrics: one set of names (prefix ``mlx_serving_``), two exporters.

``ENGINE_METRICS`` is the single list of what the engine reports. ``MetricsObserver`` turns the
scheduler's observer hooks into those metrics through a small backend interface, so the same code
feeds prometheus-client here (``PrometheusObserver``, the in-process mode) and Ray's metrics API in
a replica (``deployments.metrics.RayMetricsObserver``).

The hooks run on the GPU thread, so each one does a few dictionary lookups and metric updates and
nothing else. MLX memory is read there too (MLX calls belong on that thread), at most every
``memory_interval_s``; process RSS comes from psutil at the same time.

Serving ``/metrics`` in-process::

    obs = PrometheusObserver()
    engine = Engine(config, observer=obs)
    obs.attach(engine)                        # running / waiting read from the engine at scrape time
    serve_metrics(obs.registry, port=9400)    # http://HOST:9400/metrics
    # or mount metrics_app(obs.registry) in your own ASGI app

Under Ray the names gain Ray's ``ray_`` prefix in Prometheus (``ray_mlx_serving_..._bucket``);
counters end in ``_total`` in both modes. The metrics vLLM also reports are exported a second time
under vLLM's names (``VLLM_METRICS``: ``vllm:...`` here, ``ray_vllm_...`` under Ray), so Ray's
Serve LLM dashboard and vLLM's dashboards chart this engine as they are. See docs/observability.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from .observer import EngineObserver

log = logging.getLogger("mlx_serving.metrics")

PREFIX = "mlx_serving_"

# Buckets in seconds. TTFT spans a GPU's milliseconds and a CPU's seconds; TPOT a GPU's 1 ms to a
# loaded CPU's 0.5 s.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
               120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Tokens per request, 1-2-5 steps as vLLM's.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)

Kind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the prefix
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    prefix: str = PREFIX

    @property
    def full_name(self) -> str:
        return self.prefix + self.name


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


M = ("model",)
ENGINE_METRICS: dict[str, MetricSpec] = _specs(
    MetricSpec("time_to_first_token_seconds", "histogram",
               "Submission to first generated token, per request (queue wait and prefill included).", M, TTFT_BUCKETS),
    MetricSpec("time_per_output_token_seconds", "histogram",
               "Mean time per generated token after the first, per request.", M, TPOT_BUCKETS),
    MetricSpec("e2e_request_latency_seconds", "histogram",
               "Submission to last token, per finished request.", M, E2E_BUCKETS),
    MetricSpec("queue_wait_seconds", "histogram",
               "Submission to admission into the running batch.", M, QUEUE_BUCKETS),
    MetricSpec("decode_seconds", "histogram",
               "First token to last token, per finished request.", M, E2E_BUCKETS),
    MetricSpec("prompt_tokens", "counter", "Prompt tokens of finished requests.", M),
    MetricSpec("generation_tokens", "counter", "Generated (completion) tokens of finished requests.", M),
    MetricSpec("request_prompt_tokens", "histogram", "Prompt tokens per finished request.", M, TOKEN_BUCKETS),
    MetricSpec("request_generation_tokens", "histogram", "Generated tokens per finished request.", M, TOKEN_BUCKETS),
    MetricSpec("prompt_cache_queried_tokens", "counter",
               "Prompt tokens looked up in the prompt (prefix) cache, counted at lookup.", M),
    MetricSpec("prompt_cache_hit_tokens", "counter",
               "Prompt tokens served from the prompt (prefix) cache, counted at lookup.", M),
    MetricSpec("prompt_cache_hits", "counter", "Finished requests that reused a cached prompt prefix.", M),
    MetricSpec("prompt_cache_bytes", "gauge", "Bytes held by a model's prompt (prefix) cache.", M),
    MetricSpec("draft_tokens", "counter", "Draft tokens proposed by speculative decoding.", M),
    MetricSpec("accepted_draft_tokens", "counter", "Draft tokens the target model accepted.", M),
    MetricSpec("requests_finished", "counter", "Requests that finished normally, by finish reason.",
               ("model", "finish_reason")),
    MetricSpec("request_errors", "counter", "Requests the engine failed, by error code.", ("model", "code")),
    MetricSpec("requests_cancelled", "counter", "Requests dropped because their consumer went away.", M),
    MetricSpec("requests_running", "gauge", "Sequences in the running batch.", M),
    MetricSpec("requests_waiting", "gauge", "Requests queued for admission.", M),
    MetricSpec("batch_size", "histogram", "Sequences that produced a token in a decode step.", M, BATCH_BUCKETS),
    MetricSpec("step_seconds", "histogram", "Wall time of one batch step (prefill and/or decode).", M, STEP_BUCKETS),
    MetricSpec("model_loads", "counter", "Models loaded (warm-up included).", M),
    MetricSpec("model_load_seconds", "histogram", "Time to load and warm up a model.", M, LOAD_BUCKETS),
    MetricSpec("model_unloads", "counter", "Models unloaded (explicitly or to make room).", M),
    MetricSpec("model_weight_bytes", "gauge", "Weight bytes of a loaded model (0 once unloaded).", M),
    MetricSpec("process_resident_memory_bytes", "gauge", "Resident set size of the engine's process (psutil)."),
    MetricSpec("mlx_active_memory_bytes", "gauge", "MLX active memory (mx.get_active_memory)."),
    MetricSpec("mlx_peak_memory_bytes", "gauge", "MLX peak memory since start (mx.get_peak_memory)."),
    MetricSpec("mlx_cache_memory_bytes", "gauge", "MLX allocator cache (mx.get_cache_memory)."),
)

# -- vLLM's names ---------------------------------------------------------------------------------
# Ray 2.60's Serve LLM Grafana dashboard (ray/dashboard/modules/metrics/dashboards/
# serve_llm_dashboard_panels.py) and vLLM's own dashboards query vLLM's metric names, labelled
# ``model_name``. Every engine metric that means what a vLLM metric means is also exported under
# vLLM's name, from the same updates: one definition, two names. Prometheus here sees ``vllm:NAME``
# (vLLM's own spelling); Ray's backend writes ``vllm_NAME``, which Ray exports as ``ray_vllm_NAME``:
# the names that dashboard queries (vLLM's Ray stat logger spells them the same way).
# Not exported, for want of an honest value: kv_cache_usage_perc (vLLM's share of a preallocated
# paged KV pool; MLX grows each sequence's cache on demand, there is no pool), num_requests_swapped
# (vLLM V0 only; nothing here swaps or preempts), request_prefill_time_seconds (needs a request's
# admission time, which no hook carries), nixl_*, kv_offload_*, external_prefix_cache_* (vLLM's
# disaggregated prefill, CPU KV offload and KV connectors: none here).
VLLM_PREFIX = "vllm:"
VLLM_LABELS = {"model": "model_name", "finish_reason": "finished_reason"}
VLLM_NAMES: dict[str, str] = {  # engine metric -> vLLM's name
    "time_to_first_token_seconds": "time_to_first_token_seconds",
    "time_per_output_token_seconds": "request_time_per_output_token_seconds",  # per-request mean, as ours
    "e2e_request_latency_seconds": "e2e_request_latency_seconds",
    "queue_wait_seconds": "request_queue_time_seconds",
    "decode_seconds": "request_decode_time_seconds",
    "prompt_tokens": "prompt_tokens",
    "generation_tokens": "generation_tokens",
    "request_prompt_tokens": "request_prompt_tokens",
    "request_generation_tokens": "request_generation_tokens",
    "prompt_cache_queried_tokens": "prefix_cache_queries",
    "prompt_cache_hit_tokens": "prefix_cache_hits",
    "requests_finished": "request_success",
    "requests_running": "num_requests_running",
    "requests_waiting": "num_requests_waiting",
}


def _vllm_spec(source: str, name: str) -> MetricSpec:
    s = ENGINE_METRICS[source]
    return MetricSpec(name, s.kind, f"{s.doc} (vLLM's name for {s.full_name}.)",
                      tuple(VLLM_LABELS.get(x, x) for x in s.labels), s.buckets, prefix=VLLM_PREFIX)


#: engine metric name -> its vLLM-named twin (labels renamed, same order, same values)
VLLM_METRICS: dict[str, MetricSpec] = {src: _vllm_spec(src, name) for src, name in VLLM_NAMES.items()}


class Backend:
    """What an exporter provides: ``make(spec)`` returns an object with ``inc`` / ``observe`` / ``set``
    taking ``(value, label_values: tuple)``."""

    def make(self, spec: MetricSpec) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class _Twin:
    """A metric and its vLLM-named twin, updated together (label values in the same order)."""

    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def inc(self, value: float, key: tuple) -> None:
        self.a.inc(value, key)
        self.b.inc(value, key)

    def observe(self, value: float, key: tuple) -> None:
        self.a.observe(value, key)
        self.b.observe(value, key)

    def set(self, value: float, key: tuple) -> None:
        self.a.set(value, key)
        self.b.set(value, key)


class MetricsObserver(EngineObserver):
    """The observer hooks as metric updates, for any backend.

    ``step_sample_s`` > 0 records the batch-size and step-time histograms at most that often per
    model (a Ray histogram costs ~10-20 us per observation; a GPU step can be 1 ms). Running and
    waiting come from ``attach(engine)`` when attached (exact even when the engine goes idle), else
    from the latest ``on_step``. ``vllm_names`` also exports ``VLLM_METRICS`` (on by default).
    """

    #: specs whose values a subclass publishes by itself (e.g. at scrape time), not via ``make``
    external: frozenset[str] = frozenset()

    def __init__(self, backend: Backend, memory_interval_s: float = 5.0, step_sample_s: float = 0.0,
                 gauge_interval_s: float = 1.0, vllm_names: bool = True) -> None:
        self.backend = backend
        self.memory_interval_s = memory_interval_s
        self.step_sample_s = step_sample_s
        self.gauge_interval_s = gauge_interval_s
        self.vllm_names = vllm_names
        self.m: dict[str, Any] = {k: self._make(k, s) for k, s in ENGINE_METRICS.items() if k not in self.external}
        self._queue: dict[str, tuple[int, int]] = {}  # model -> (running, waiting) at the last step
        self._pushed_queue: dict[str, tuple[int, int]] = {}
        self._last_step_sample: dict[str, float] = {}
        self._next_memory = 0.0
        self._next_gauges = 0.0
        self._engine: weakref.ReferenceType | None = None
        self._psutil_proc: Any = None
        self._cache_bytes: dict[str, int] = {}
        self._gauges: dict[tuple[str, tuple], float] = {}  # latest value of every gauge series
        self.memory: dict[str, float] = {}

    def _make(self, name: str, spec: MetricSpec) -> Any:
        metric = self.backend.make(spec)
        twin = VLLM_METRICS.get(name) if self.vllm_names else None
        return _Twin(metric, self.backend.make(twin)) if twin is not None else metric

    # -- hooks (GPU thread) ---------------------------------------------------------------------
    def on_admit(self, model: str, queue_wait_s: float) -> None:
        self.m["queue_wait_seconds"].observe(queue_wait_s, (model,))

    def on_first_token(self, model: str, ttft_s: float) -> None:
        self.m["time_to_first_token_seconds"].observe(ttft_s, (model,))

    def on_finish(self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                  e2e_s: float, finish_reason: str, ttft_s: float | None = None, **_: Any) -> None:
        key = (model,)
        m = self.m
        if prompt_tokens:
            m["prompt_tokens"].inc(prompt_tokens, key)
        if completion_tokens:
            m["generation_tokens"].inc(completion_tokens, key)
        m["request_prompt_tokens"].observe(prompt_tokens, key)
        m["request_generation_tokens"].observe(completion_tokens, key)
        if cached_tokens:
            m["prompt_cache_hits"].inc(1, key)
        m["e2e_request_latency_seconds"].observe(e2e_s, key)
        if ttft_s is not None:
            m["decode_seconds"].observe(max(0.0, e2e_s - ttft_s), key)
        m["requests_finished"].inc(1, (model, finish_reason))
        if completion_tokens > 1:
            # Decode time per token: e2e minus TTFT, over the tokens after the first. Without the
            # request's TTFT (an engine that does not pass it) the whole e2e is spread over all tokens.
            if ttft_s is not None:
                m["time_per_output_token_seconds"].observe(max(0.0, e2e_s - ttft_s) / (completion_tokens - 1), key)
            else:
                m["time_per_output_token_seconds"].observe(e2e_s / completion_tokens, key)

    def on_prefix_lookup(self, model: str, queried_tokens: int, hit_tokens: int) -> None:
        key = (model,)
        if queried_tokens:
            self.m["prompt_cache_queried_tokens"].inc(queried_tokens, key)
        if hit_tokens:
            self.m["prompt_cache_hit_tokens"].inc(hit_tokens, key)

    def on_speculative(self, model: str, proposed: int, accepted: int) -> None:
        key = (model,)
        if proposed:
            self.m["draft_tokens"].inc(proposed, key)
        if accepted:
            self.m["accepted_draft_tokens"].inc(accepted, key)

    def on_error(self, model: str, code: str) -> None:
        self.m["request_errors"].inc(1, (model, code))

    def on_cancel(self, model: str) -> None:
        self.m["requests_cancelled"].inc(1, (model,))

    def on_step(self, model: str, batch_size: int, step_s: float, running: int, waiting: int) -> None:
        now = time.monotonic()
        self._queue[model] = (running, waiting)
        if self.step_sample_s <= 0 or now - self._last_step_sample.get(model, 0.0) >= self.step_sample_s:
            self._last_step_sample[model] = now
            key = (model,)
            self.m["batch_size"].observe(batch_size, key)
            self.m["step_seconds"].observe(step_s, key)
        if now >= self._next_gauges:
            self._next_gauges = now + self.gauge_interval_s
            if self._engine is None:
                self.publish_queue(self._queue)
        if now >= self._next_memory:
            self.sample_memory(now)

    def on_load(self, model: str, seconds: float, nbytes: int) -> None:
        key = (model,)
        self.m["model_loads"].inc(1, key)
        self.m["model_load_seconds"].observe(seconds, key)
        self.set_gauge("model_weight_bytes", key, nbytes)
        self.sample_memory(time.monotonic())

    def on_unload(self, model: str) -> None:
        key = (model,)
        self.m["model_unloads"].inc(1, key)
        self.set_gauge("model_weight_bytes", key, 0)
        self._queue.pop(model, None)
        if self._engine is None:
            self.publish_queue({**self._queue, model: (0, 0)})
        self.sample_memory(time.monotonic())

    # -- gauges ---------------------------------------------------------------------------------
    def set_gauge(self, name: str, key: tuple, value: float) -> None:
        self._gauges[(name, key)] = value
        self.m[name].set(value, key)

    def republish(self) -> None:
        """Set every gauge series again (Ray drops a gauge series that is not refreshed)."""
        for (name, key), value in list(self._gauges.items()):
            self.m[name].set(value, key)

    def attach(self, engine: Any) -> None:
        """Read running / waiting from ``engine.list_models()`` instead of the last step."""
        self._engine = weakref.ref(engine)

    def engine_queue(self) -> dict[str, tuple[int, int]] | None:
        """``model -> (running, waiting)`` from the attached engine; None when none is attached (or it is gone)."""
        engine = self._engine() if self._engine is not None else None
        if engine is None:
            return None
        try:
            infos = engine.list_models()
        except Exception:  # noqa: BLE001 - a model unloading under our feet: next time
            return None
        for info in infos:  # prompt-cache size, where the engine reports it
            nbytes = getattr(info, "prompt_cache_bytes", None)
            if nbytes is not None and self._cache_bytes.get(info.name) != nbytes:
                self._cache_bytes[info.name] = nbytes
                self.set_gauge("prompt_cache_bytes", (info.name,), nbytes)
        return {i.name: (i.active, i.waiting) for i in infos}

    def publish_queue(self, queue: dict[str, tuple[int, int]]) -> None:
        """Set the running / waiting gauges (only the values that changed: Ray gauges are not free)."""
        if "requests_running" in self.external:
            return
        for model, (running, waiting) in list(queue.items()):
            if self._pushed_queue.get(model) != (running, waiting):
                self._pushed_queue[model] = (running, waiting)
                self.set_gauge("requests_running", (model,), running)
                self.set_gauge("requests_waiting", (model,), waiting)
        for model in [m for m in self._pushed_queue if m not in queue]:  # unloaded since: zero it
            del self._pushed_queue[model]
            self.set_gauge("requests_running", (model,), 0)
            self.set_gauge("requests_waiting", (model,), 0)

    def sample_memory(self, now: float | None = None, mlx: bool = True) -> dict[str, float]:
        """RSS always; MLX memory only when ``mlx`` (call with ``mlx=True`` only on the GPU thread)."""
        if mlx:
            self._next_memory = (now or time.monotonic()) + self.memory_interval_s
        out: dict[str, float] = {}
        try:
            if self._psutil_proc is None:
                import psutil

                self._psutil_proc = psutil.Process(os.getpid())
            out["process_resident_memory_bytes"] = float(self._psutil_proc.memory_info().rss)
        except Exception:  # noqa: BLE001 - psutil missing or the platform says no
            pass
        if mlx:
            try:
                import mlx.core as mx

                out["mlx_active_memory_bytes"] = float(mx.get_active_memory())
                out["mlx_peak_memory_bytes"] = float(mx.get_peak_memory())
                out["mlx_cache_memory_bytes"] = float(mx.get_cache_memory())
            except Exception:  # noqa: BLE001 - older MLX, or a backend without the counters
                pass
        for name, value in out.items():
            self.set_gauge(name, (), value)
        self.memory.update(out)
        return out


# -- prometheus-client ----------------------------------------------------------------------------
class _PromMetric:
    __slots__ = ("metric", "children", "labelled")

    def __init__(self, metric: Any, labelled: bool) -> None:
        self.metric = metric
        self.children: dict[tuple, Any] = {}
        self.labelled = labelled

    def _child(self, key: tuple) -> Any:
        if not self.labelled:
            return self.metric
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.metric.labels(*key)
        return child

    def inc(self, value: float, key: tuple) -> None:
        self._child(key).inc(value)

    def observe(self, value: float, key: tuple) -> None:
        self._child(key).observe(value)

    def set(self, value: float, key: tuple) -> None:
        self._child(key).set(value)


class PrometheusBackend(Backend):
    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def make(self, spec: MetricSpec) -> _PromMetric:
        import prometheus_client as pc

        kw: dict[str, Any] = {"labelnames": spec.labels, "registry": self.registry}
        if spec.kind == "counter":
            metric = pc.Counter(spec.full_name, spec.doc, **kw)
        elif spec.kind == "histogram":
            metric = pc.Histogram(spec.full_name, spec.doc, buckets=spec.buckets, **kw)
        else:
            metric = pc.Gauge(spec.full_name, spec.doc, **kw)
        return _PromMetric(metric, bool(spec.labels))


class _QueueCollector:
    """Running / waiting per model, computed when Prometheus scrapes (exact, also when idle)."""

    def __init__(self, observer: PrometheusObserver) -> None:
        self.observer = observer

    def describe(self) -> Iterable[Any]:
        return self.collect(empty=True)

    def collect(self, empty: bool = False) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        queue = {} if empty else self.observer.engine_queue()
        if queue is None:
            queue = dict(self.observer._queue)
        names = [ENGINE_METRICS] + ([VLLM_METRICS] if self.observer.vllm_names else [])
        for specs in names:  # ours, then vLLM's names for the same values
            running_spec, waiting_spec = specs["requests_running"], specs["requests_waiting"]
            running = GaugeMetricFamily(running_spec.full_name, running_spec.doc, labels=list(running_spec.labels))
            waiting = GaugeMetricFamily(waiting_spec.full_name, waiting_spec.doc, labels=list(waiting_spec.labels))
            for model, (r, w) in sorted(queue.items()):
                running.add_metric([model], r)
                waiting.add_metric([model], w)
            yield running
            yield waiting


class PrometheusObserver(MetricsObserver):
    """prometheus-client metrics for an in-process engine, in their own registry by default (so a
    test, or a process with several engines, can make as many as it likes)."""

    external = frozenset({"requests_running", "requests_waiting"})

    def __init__(self, registry: Any = None, memory_interval_s: float = 5.0, step_sample_s: float = 0.0,
                 vllm_names: bool = True) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = registry if registry is not None else CollectorRegistry()
        super().__init__(PrometheusBackend(self.registry), memory_interval_s=memory_interval_s,
                         step_sample_s=step_sample_s, vllm_names=vllm_names)
        self.registry.register(_QueueCollector(self))

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (what ``/metrics`` serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value by its full exported name (``mlx_serving_generation_tokens_total``,
        ``vllm:generation_tokens_total``)."""
        return self.registry.get_sample_value(name, labels or {})


def serve_metrics(registry: Any = None, port: int = 9400, addr: str = "0.0.0.0") -> tuple[Any, threading.Thread]:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread; returns (server, thread)."""
    from prometheus_client import REGISTRY, start_http_server

    if isinstance(registry, PrometheusObserver):
        registry = registry.registry
    return start_http_server(port, addr=addr, registry=registry if registry is not None else REGISTRY)


def metrics_app(registry: Any = None) -> Any:
    """An ASGI app serving ``registry`` (mount it: ``app.mount("/metrics", metrics_app(reg))``)."""
    from prometheus_client import REGISTRY, make_asgi_app

    if isinstance(registry, PrometheusObserver):
        registry = registry.registry
    return make_asgi_app(registry=registry if registry is not None else REGISTRY)

