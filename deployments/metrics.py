"""Metrics of the Serve deployments through Ray's metrics API (``ray.serve.metrics``).

Ray exports them from each node's metrics agent in Prometheus format, with a ``ray_`` prefix and
Serve's ``deployment`` / ``replica`` / ``application`` labels added (``ray_mlx_serving_...``).
Ray lists every node's metrics endpoint in ``/tmp/ray/prom_metrics_service_discovery.json`` on the
head node: ``config/prometheus.yml`` scrapes through it, ``config/grafana-dashboard.json`` charts the
names below. See docs/observability.md.

- ``RayMetricsObserver``: the engine's metrics (``engine.metrics.ENGINE_METRICS``) from a replica,
  and their vLLM-named twins (``VLLM_METRICS``, as ``ray_vllm_*``) for Ray's Serve LLM dashboard.
- ``HttpObservability``: ASGI middleware for the ingress: the request id (``x-request-id``), one
  JSON access-log line per request and ``HTTP_METRICS`` by route, model, variant, status and code.
- ``RouterMetrics``: assignments, outcomes, rollout and circuit-breaker events, for the router.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

from engine import logs
from engine.metrics import (
    E2E_BUCKETS, ENGINE_METRICS, TTFT_BUCKETS, VLLM_METRICS, Backend, MetricSpec, MetricsObserver, PrometheusBackend,
    _specs,
)

from .logging import request_note, router_event, serve_request_id

access_log = logging.getLogger("mlx_serving.http")

REQUEST_ID_HEADER = b"x-request-id"
VARIANT_HEADER = b"x-mlx-variant"


# -- Ray backend ----------------------------------------------------------------------------------
class _RayMetric:
    __slots__ = ("metric", "labels", "tags")

    def __init__(self, metric: Any, labels: tuple[str, ...]) -> None:
        self.metric = metric
        self.labels = labels
        self.tags: dict[tuple, dict[str, str]] = {}

    def _tags(self, key: tuple) -> dict[str, str]:
        t = self.tags.get(key)
        if t is None:
            if len(self.tags) > 10_000:  # label values are bounded by design; never grow without limit
                self.tags.clear()
            t = self.tags[key] = {k: str(v) for k, v in zip(self.labels, key)}
        return dict(t)  # Ray may add its own tags to the dict it is given

    def inc(self, value: float, key: tuple) -> None:
        self.metric.inc(value, tags=self._tags(key))

    def observe(self, value: float, key: tuple) -> None:
        self.metric.observe(value, tags=self._tags(key))

    def set(self, value: float, key: tuple) -> None:
        self.metric.set(value, tags=self._tags(key))


def ray_metric_name(spec: MetricSpec) -> str:
    """The name given to Ray: ``:`` becomes ``_`` (OpenTelemetry, Ray's default metrics path, allows no
    ``:`` in instrument names; vLLM's Ray stat logger does the same), so ``vllm:x`` is exported as
    ``ray_vllm_x``, the name Ray's Serve LLM dashboard queries."""
    return spec.full_name.replace(":", "_")


class RayBackend(Backend):
    """``ray.serve.metrics``: inside a replica, Serve adds deployment / replica / application tags
    (and Ray the ``WorkerId`` its Serve LLM dashboard joins on)."""

    def make(self, spec: MetricSpec) -> _RayMetric:
        from ray.serve import metrics

        name = ray_metric_name(spec)
        kw: dict[str, Any] = {"description": spec.doc, "tag_keys": spec.labels}
        if spec.kind == "counter":
            metric = metrics.Counter(name, **kw)
        elif spec.kind == "histogram":
            metric = metrics.Histogram(name, boundaries=[float(b) for b in spec.buckets], **kw)
        else:
            metric = metrics.Gauge(name, **kw)
        return _RayMetric(metric, spec.labels)


class RayMetricsObserver(MetricsObserver):
    """The engine observer of a model replica.

    Batch-size and step-time histograms are sampled (``step_sample_s``, default 0.1 s per model): a
    Ray observation costs 10-20 us and a GPU step can take 1 ms. ``attach(engine)`` starts a daemon
    thread that refreshes the running / waiting gauges and the process RSS every ``gauge_interval_s``
    (MLX memory is sampled on the GPU thread, in ``on_step``).
    """

    def __init__(self, memory_interval_s: float = 5.0, step_sample_s: float = 0.1, gauge_interval_s: float = 1.0,
                 backend: Backend | None = None, vllm_names: bool = True) -> None:
        super().__init__(backend or RayBackend(), memory_interval_s=memory_interval_s, step_sample_s=step_sample_s,
                         gauge_interval_s=gauge_interval_s, vllm_names=vllm_names)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, engine: Any) -> None:
        super().attach(engine)
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh_forever, name="mlx-metrics", daemon=True)
            self._thread.start()

    def refresh(self) -> bool:
        """Publish running / waiting from the engine and RSS now; False once the engine is gone."""
        queue = self.engine_queue()
        if queue is None and (self._engine is None or self._engine() is None):
            return False
        if queue is not None:
            self.publish_queue(queue)
        self.sample_memory(mlx=False)
        self.republish()  # Ray forgets a gauge series that is not set again within two export intervals
        return True

    def _refresh_forever(self) -> None:
        while not self._stop.wait(self.gauge_interval_s):
            try:
                if not self.refresh():
                    return
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                logging.getLogger("mlx_serving.metrics").debug("metrics refresh failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()


# -- HTTP (ingress) -------------------------------------------------------------------------------
HTTP_LABELS = ("route", "model", "variant")
HTTP_METRICS: dict[str, MetricSpec] = _specs(
    MetricSpec("http_requests", "counter",
               "HTTP requests by route (path template), model (or canary route), variant, status and error code "
               "(code is empty for successes; a stream that fails after its 200 counts with the error's code).",
               HTTP_LABELS + ("status", "code")),
    MetricSpec("http_request_duration_seconds", "histogram",
               "Request received to last byte sent, as the ingress sees it.", HTTP_LABELS, E2E_BUCKETS),
    MetricSpec("http_time_to_first_byte_seconds", "histogram",
               "Request received to first body byte of a streamed (SSE) response: the client-side TTFT "
               "without the network.", HTTP_LABELS, TTFT_BUCKETS),
)


class HttpMetrics:
    def __init__(self, backend: Backend) -> None:
        self.m = {k: backend.make(s) for k, s in HTTP_METRICS.items()}

    def record(self, route: str, model: str, variant: str, status: int, code: str, duration_s: float,
               ttfb_s: float | None) -> None:
        key = (route, model, variant)
        self.m["http_requests"].inc(1, key + (str(status), code))
        self.m["http_request_duration_seconds"].observe(duration_s, key)
        if ttfb_s is not None:
            self.m["http_time_to_first_byte_seconds"].observe(ttfb_s, key)


_http_metrics: HttpMetrics | None = None
_http_lock = threading.Lock()


def http_metrics_backend() -> Backend:
    """Ray's API when Ray is up (a Serve replica), else prometheus-client's default registry (an ingress
    app run without Ray)."""
    try:
        import ray

        ray_up = ray.is_initialized()
    except ImportError:
        ray_up = False
    if ray_up:
        return RayBackend()
    from prometheus_client import REGISTRY

    return PrometheusBackend(REGISTRY)


def http_metrics() -> HttpMetrics:
    """This process's HTTP metrics."""
    global _http_metrics
    with _http_lock:
        if _http_metrics is None:
            _http_metrics = HttpMetrics(http_metrics_backend())
        return _http_metrics


def _error_code(body: bytes) -> str:
    """The ``error.code`` of an OpenAI error body, or of an SSE ``data: {"error": ...}`` event."""
    if body.startswith(b"data: "):
        body = body[6:]
    try:
        err = json.loads(body).get("error") or {}
        return str(err.get("code") or err.get("type") or "error")
    except (ValueError, AttributeError):
        return "error"


_QUIET_PATHS = ("/health", "/ready", "/metrics")  # probes: logged at DEBUG, still counted
# What a request's task meets when its client goes away (Starlette, anyio, Serve).
_DISCONNECTS = frozenset({"ClientDisconnect", "RequestCancelledError", "TaskCancelledError", "ClosedResourceError",
                          "BrokenResourceError", "EndOfStream", "ConnectionResetError", "BrokenPipeError"})


class HttpObservability:
    """Pure ASGI middleware: request id, access log, HTTP metrics. Add it last (outermost)::

        app.add_middleware(HttpObservability)

    The request id is Serve's when Serve runs the app (its proxy already honours and returns
    ``x-request-id``); otherwise the client's ``x-request-id`` or a new one, returned in the header.
    """

    def __init__(self, app: Callable, metrics: Callable[[], HttpMetrics] | None = None,
                 access_log_enabled: bool | None = None) -> None:
        self.app = app
        self.metrics = metrics or http_metrics
        if access_log_enabled is None:
            access_log_enabled = os.environ.get("MLX_SERVING_ACCESS_LOG", "1").lower() not in ("0", "false", "no")
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = serve_request_id()
        add_header = rid is None  # under Serve its proxy returns the header already
        if rid is None:
            for k, v in scope.get("headers") or ():
                if k == REQUEST_ID_HEADER:
                    rid = logs.clip(v.decode("latin-1").strip()) or None
                    break
            rid = rid or uuid.uuid4().hex
        note: dict[str, Any] = {"request_id": rid}
        st: dict[str, Any] = {"status": 500, "code": "", "variant": "", "stream": False, "first": None, "err": b""}

        async def send_wrapped(message: dict) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                st["status"] = status = int(message["status"])
                headers = list(message.get("headers") or ())
                for k, v in headers:
                    lk = k.lower()
                    if lk == VARIANT_HEADER:
                        st["variant"] = v.decode("latin-1")
                    elif lk == b"content-type" and v.startswith(b"text/event-stream"):
                        st["stream"] = True
                if add_header and not any(k.lower() == REQUEST_ID_HEADER for k, _ in headers):
                    message = {**message, "headers": headers + [(REQUEST_ID_HEADER, rid.encode("latin-1", "replace"))]}
                if status >= 400:
                    st["code"] = "error"
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if body:
                    if st["first"] is None:
                        st["first"] = time.perf_counter()
                    if st["status"] >= 400:
                        if len(st["err"]) < 65536:
                            st["err"] += body
                    elif st["stream"] and body.startswith(b'data: {"error"'):
                        st["code"] = _error_code(body)
            await send(message)

        note_token = request_note.set(note)
        rid_token = logs.request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_wrapped)
        except BaseException as e:
            st["exc_type"] = type(e).__name__
            if isinstance(e, asyncio.CancelledError) or type(e).__name__ in _DISCONNECTS:  # the client went away
                st["code"] = st["code"] or "client_disconnected"
                st["cancelled"] = True
                if st["first"] is None and st["status"] == 500:
                    st["status"] = 499  # nginx's "client closed request": nothing was sent
            else:
                st["code"] = st["code"] or "internal_error"
            raise
        finally:
            if st["err"]:
                st["code"] = _error_code(st["err"])
            self._finish(scope, note, st, t0)
            logs.request_id_var.reset(rid_token)
            request_note.reset(note_token)

    def _finish(self, scope: dict, note: dict[str, Any], st: dict[str, Any], t0: float) -> None:
        now = time.perf_counter()
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or "unmatched"
        model = str(note.get("model") or "")
        variant = st["variant"] if model else ""  # a variant without a known model is a failed lookup
        ttfb = st["first"] - t0 if st["stream"] and st["first"] is not None else None
        try:
            self.metrics().record(route, model, variant, st["status"], st["code"], now - t0, ttfb)
        except Exception:  # noqa: BLE001 - metrics must not fail a request
            access_log.debug("http metrics failed", exc_info=True)
        if not self.access_log_enabled:
            return
        path = scope.get("path", "")
        if path.endswith(_QUIET_PATHS):
            level = logging.DEBUG
        elif st.get("cancelled"):
            level = logging.INFO
        else:
            level = logging.WARNING if st["status"] >= 500 or (st["code"] and st["status"] < 400) else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, "request", extra={
                "event": "http_request", "request_id": note["request_id"], "method": scope.get("method"),
                "path": path[:200], "route": route, "status": st["status"], "code": st["code"] or None,
                "model": model or None, "variant": variant or None, "stream": st["stream"],
                "duration_ms": round((now - t0) * 1e3, 2),
                "ttfb_ms": round(ttfb * 1e3, 2) if ttfb is not None else None,
                "completion_id": note.get("completion_id"), "exc_type": st.get("exc_type"),
            })


# -- router ---------------------------------------------------------------------------------------
ROUTER_METRICS: dict[str, MetricSpec] = _specs(
    MetricSpec("route_assignments", "counter",
               "Requests routed to each variant of a route (counted when the ingress reports the request's "
               "outcome to the router; a request its client abandoned is not reported).", ("route", "variant")),
    MetricSpec("routed_requests", "counter", "Requests routed to a variant, by outcome.", ("route", "variant", "outcome")),
    MetricSpec("router_events", "counter", "Circuit-breaker transitions and rollout decisions.",
               ("route", "kind", "event")),
    MetricSpec("rollout_canary_percent", "gauge", "Canary traffic share of a route's rollout.", ("route",)),
    MetricSpec("rollout_state", "gauge", "1 for a route's current rollout state, 0 for the others.", ("route", "state")),
)
ROLLOUT_STATES = ("pending", "running", "paused", "promoted", "rolled_back")


class RouterMetrics:
    """The router deployment's metrics and event logs, one call each.

    Ray drops a gauge series that is not set again within two export intervals (10 s each by
    default): the router calls ``republish()`` from its periodic tick to keep the rollout gauges alive."""

    def __init__(self, backend: Backend | None = None) -> None:
        self._backend = backend
        self._m: dict[str, Any] | None = None
        self._gauges: dict[tuple[str, tuple], float] = {}

    @property
    def m(self) -> dict[str, Any]:
        if self._m is None:  # created on first use: only where the router actually calls it
            backend = self._backend or RayBackend()
            self._m = {k: backend.make(s) for k, s in ROUTER_METRICS.items()}
        return self._m

    def routed(self, route: str, variant: str, outcome: str) -> None:
        """One routed request whose outcome came back: an assignment, and its outcome."""
        self.m["route_assignments"].inc(1, (route, variant))
        self.m["routed_requests"].inc(1, (route, variant, outcome))

    def event(self, e: dict[str, Any]) -> str:
        """Count and log one of ``Router.drain_events()``'s dicts (breaker transition or rollout
        decision); returns the ``event`` label it was counted under."""
        route = str(e.get("route", ""))
        kind = str(e.get("kind"))
        if kind == "breaker":
            name = f"{e.get('from_state')}->{e.get('to_state')}"
        else:
            name = str(e.get("action"))
            self.rollout(route, str(e.get("state")), float(e.get("canary_percent") or 0.0))
        self.m["router_events"].inc(1, (route, kind, name))
        router_event(e)
        return name

    def rollout(self, route: str, state: str, canary_percent: float) -> None:
        """The rollout gauges of one route (also for state restored or carried over without a decision)."""
        self._set("rollout_canary_percent", (route,), canary_percent)
        for s in ROLLOUT_STATES:
            self._set("rollout_state", (route, s), 1.0 if s == state else 0.0)

    def keep_only(self, routes: set[str]) -> None:
        """Stop republishing the gauges of other routes (gone, or without a rollout now): Ray drops
        their series soon after."""
        self._gauges = {k: v for k, v in self._gauges.items() if k[1][0] in routes}

    def _set(self, name: str, key: tuple, value: float) -> None:
        self._gauges[(name, key)] = value
        self.m[name].set(value, key)

    def republish(self) -> None:
        for (name, key), value in list(self._gauges.items()):
            self.m[name].set(value, key)


def all_metric_names(ray_prefix: bool = False) -> list[str]:
    """Every metric family name this project exports (for docs and tests)."""
    from .qos.metrics import QOS_METRICS

    specs = (*ENGINE_METRICS.values(), *VLLM_METRICS.values(), *HTTP_METRICS.values(), *ROUTER_METRICS.values(),
             *QOS_METRICS.values())
    return ["ray_" + ray_metric_name(s) if ray_prefix else s.full_name for s in specs]
