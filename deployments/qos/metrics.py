"""QoS metrics of an ingress: SLO burn rates and whether each is met, remediation actions, admission,
per-key usage. Gauges are kept and set again on every tick (Ray forgets a gauge series that is not
set within two export intervals)."""

from __future__ import annotations

import threading

from engine.metrics import Backend, MetricSpec, _specs

QOS_METRICS: dict[str, MetricSpec] = _specs(
    MetricSpec("slo_burn_rate", "gauge",
               "Share of bad requests in the window over the share the SLO allows (1 spends the budget exactly).",
               ("model", "slo", "window")),
    MetricSpec("slo_met", "gauge", "1 while the SLO held over the last hour (1-hour burn rate at most 1), else 0.",
               ("model", "slo")),
    MetricSpec("qos_actions", "counter",
               "Remediation actions (shed_batch_on, shed_batch_off, shed, scale_out, scale_in).", ("model", "action")),
    MetricSpec("admission_waiting", "gauge", "Requests waiting at this ingress's admission gate.", ("model", "priority")),
    MetricSpec("admission_inflight", "gauge", "Requests this ingress has let through to the model's replicas.",
               ("model", "priority")),
    MetricSpec("admission_capacity", "gauge", "Requests this ingress lets through at once (its share, by the "
                                              "ingresses' demands, of the running replicas' max_ongoing_requests).",
               ("model",)),
    MetricSpec("admission_expired", "counter", "Requests whose deadline passed while they waited (504).", ("model",)),
    MetricSpec("key_requests", "counter", "Requests per API key (its name, or key-<hash prefix>) and status.",
               ("key", "status")),
    MetricSpec("key_tokens", "counter", "Tokens per API key: prompt and completion.", ("key", "kind")),
)


class QosMetrics:
    def __init__(self, backend: Backend) -> None:
        self.m = {k: backend.make(s) for k, s in QOS_METRICS.items()}
        self._gauges: dict[tuple[str, tuple], float] = {}

    def inc(self, name: str, key: tuple, value: float = 1.0) -> None:
        if value:
            self.m[name].inc(value, key)

    def set(self, name: str, key: tuple, value: float) -> None:
        self._gauges[(name, key)] = value
        self.m[name].set(value, key)

    def republish(self) -> None:
        for (name, key), value in list(self._gauges.items()):
            self.m[name].set(value, key)


_metrics: QosMetrics | None = None
_lock = threading.Lock()


def qos_metrics() -> QosMetrics:
    """This process's QoS metrics (one set: a metric name registers once per process)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from ..metrics import http_metrics_backend

            _metrics = QosMetrics(http_metrics_backend())
        return _metrics
