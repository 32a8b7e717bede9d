"""One ingress's QoS: each model's admission gate and SLOs, each key's limits.

A request takes a ``Ticket`` before it goes to a replica (``admit``: shedding, then the key's limits,
then the gate, which may make it wait) and gives it back once its last byte is out (``Ticket.finish``),
which frees its slot, charges its key's tokens and records it against the model's SLOs. ``refresh``
(every ``TICK_S``, from the ingress) resizes the gates to the replicas that run and to the ingresses'
demands (``shares``), reports what the autoscaler did, switches shedding and sets the gauges.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import EngineError, OverCapacityError

from .. import logging as events
from ..config import AppConfig, KeyPolicy, ModelDeploymentConfig
from ..protocol import ModelStatus
from ..statuses import status_of
from .config import Priority, QosConfig
from .gate import AdmissionGate
from .metrics import QosMetrics, qos_metrics
from .quotas import KeyLimiter, Quotas
from .shares import fair_share
from .slo import SloTracker, Shedder, WINDOWS_S

TICK_S = 1.0
CLIENT_CLOSED = 499  # the client went away before its answer ended (nginx's code; no SLO counts it)
SHED_RETRY_AFTER_S = 10.0  # shedding re-evaluates each second, but ends only once the short window cools down


class ModelQos:
    """One model's gate, SLO tracker and shedder in this ingress."""

    def __init__(self, name: str, config: QosConfig, capacity: int) -> None:
        self.name = name
        self.config = config
        self.gate = AdmissionGate(capacity, config.max_queued, config.interactive_reserve)
        self.tracker = SloTracker(config.slo) if config.slo is not None and config.slo.objectives() else None
        self.shedder = Shedder(config, self.tracker) if self.tracker is not None else None
        self.running: int | None = None  # replicas Serve says run (None until it has said)
        self.scaled_to: int | None = None  # the autoscaler's last target

    @property
    def shedding(self) -> bool:
        return self.shedder is not None and self.shedder.shedding


@dataclass
class Ticket:
    """A request's place from admission to its last byte."""

    qos: Qos
    model: ModelQos
    key: str  # the key's name in metrics: its policy's name, else its tenant id
    priority: Priority
    deadline: float  # time.monotonic()
    limiter: KeyLimiter | None
    headers: dict[str, str]  # x-ratelimit-* for the response
    short_deadline: bool = False  # the client asked for less time than the model's default
    queued_s: float = 0.0
    done: bool = field(default=False, init=False)

    def counts_for_slos(self, status: int) -> bool:
        """A 504 past a deadline the client shortened is the client's choice: it burns no one's budget
        (else a tenant's tiny timeouts could switch on shedding for everyone)."""
        return self.model.tracker is not None and not (status == 504 and self.short_deadline)

    def remaining_s(self) -> float:
        """Seconds left for the replica: the engine drops the request when they run out."""
        return max(0.001, self.deadline - time.monotonic())

    def finish(self, status: int, prompt_tokens: int = 0, completion_tokens: int = 0, ttft_s: float | None = None,
               tpot_s: float | None = None) -> None:
        """The request ended (once; later calls do nothing). ``ttft_s`` / ``tpot_s`` are the replica's own
        measurements; the time this request waited at the gate is added to its TTFT."""
        if self.done:
            return
        self.done = True
        self.model.gate.leave(self.priority)
        if self.limiter is not None:
            self.limiter.done(prompt_tokens + completion_tokens)
        if self.counts_for_slos(status):
            self.model.tracker.observe(status=status, interactive=self.priority == "interactive",
                                       ttft_s=None if ttft_s is None else ttft_s + self.queued_s, tpot_s=tpot_s)
        m = self.qos.metrics
        m.inc("key_requests", (self.key, str(status)))
        m.inc("key_tokens", (self.key, "prompt"), prompt_tokens)
        m.inc("key_tokens", (self.key, "completion"), completion_tokens)


class Qos:
    def __init__(self, config: AppConfig, policies: list[KeyPolicy], metrics: QosMetrics | None = None) -> None:
        self.config = config
        self.ingress_replicas = config.ingress_replicas
        self.me = "me"  # this ingress's name among ``peers``
        self.peers: Mapping[str, Mapping[str, int]] | None = None  # the live ingresses' demands, by name
        self.models = {m.name: ModelQos(m.name, m.qos, self._capacity(m, m.planned_replicas)) for m in config.models}
        self.quotas = Quotas(policies)
        self.metrics = metrics or qos_metrics()
        self.reports_scaling = True  # one ingress replica (rank 0) reports the autoscaler's moves

    def _capacity(self, m: ModelDeploymentConfig, replicas: int) -> int:
        """This ingress's share of what ``replicas`` running replicas take at once: by the ingresses'
        demands when they are known, else an even split."""
        total = replicas * m.max_ongoing_requests
        if not self.peers or self.me not in self.peers:
            return max(1, math.ceil(total / self.ingress_replicas))
        return fair_share(total, {who: d.get(m.name, 0) for who, d in self.peers.items()}, self.me)

    def demand(self) -> dict[str, int]:
        """Per model, the most requests this ingress held at once since the last call (for ``shares``)."""
        return {name: m.gate.take_peak() for name, m in self.models.items()}

    def set_policies(self, policies: list[KeyPolicy]) -> None:
        """Keys changed: kept keys keep their counts."""
        quotas = Quotas(policies)
        quotas.carry_over(self.quotas)
        self.quotas = quotas

    def _default_timeout_s(self, model: str) -> float:
        limit = self.config.limits.request_timeout_s
        return min(self.models[model].config.default_timeout_s or limit, limit)

    def timeout_s(self, model: str, requested: float | None) -> float:
        """A request's time from arrival: its own, else the model's default, never past the hard limit."""
        return min(requested, self.config.limits.request_timeout_s) if requested else self._default_timeout_s(model)

    async def admit(self, model: str, key_hash: str | None, tenant: str, priority: Priority,
                    requested_timeout_s: float | None = None) -> Ticket:
        """A ticket for a request (``requested_timeout_s``: the body's ``timeout``), or the error to answer."""
        arrival = time.monotonic()
        m = self.models[model]
        timeout_s = self.timeout_s(model, requested_timeout_s)
        limiter = self.quotas.for_key(key_hash)
        name = limiter.policy.name if limiter is not None else tenant
        if limiter is not None and limiter.policy.max_priority == "batch":
            priority = "batch"
        if priority == "batch" and m.shedding:
            self.metrics.inc("qos_actions", (model, "shed"))
            self.metrics.inc("key_requests", (name, "429"))
            events.queue_saturated(model, "slo_shedding", "batch requests are shed while the model's SLOs burn")
            raise OverCapacityError(f"batch requests to {model!r} are shed while its SLOs burn; retry later",
                                    code="load_shed", retry_after=SHED_RETRY_AFTER_S)
        headers: dict[str, str] = {}
        if limiter is not None:
            try:
                headers = limiter.admit()
            except EngineError:
                self.metrics.inc("key_requests", (name, "429"))
                raise
        ticket = Ticket(self, m, name, priority, arrival + timeout_s, limiter, headers,
                        short_deadline=timeout_s < self._default_timeout_s(model))
        try:
            await m.gate.enter(priority, ticket.deadline)
        except BaseException as e:  # 504 or 429 from the gate, or the client left while it waited
            status = status_of(e) if isinstance(e, EngineError) else CLIENT_CLOSED
            if limiter is not None:
                limiter.done(0)
            if ticket.counts_for_slos(status):
                m.tracker.observe(status=status, interactive=priority == "interactive")
            if status == 504:
                self.metrics.inc("admission_expired", (model,))
            self.metrics.inc("key_requests", (name, str(status)))
            ticket.done = True
            raise
        ticket.queued_s = time.monotonic() - arrival
        return ticket

    # -- the ingress's tick ---------------------------------------------------------------------
    def refresh(self, statuses: list[ModelStatus],
                peers: Mapping[str, Mapping[str, int]] | None = None) -> list[dict[str, Any]]:
        """Resize the gates to the replicas that run and the ingresses' demands (``peers``, from
        ``shares.DemandBoard``; None: unknown, split evenly); report scaling and shedding; set gauges.
        The actions."""
        self.peers = peers
        actions: list[dict[str, Any]] = []
        by_name = {s.name: s for s in statuses}
        for cfg in self.config.models:
            m = self.models[cfg.name]
            s = by_name.get(cfg.name)
            if s is not None and s.replicas_healthy is not None:
                m.running = s.replicas_healthy
                m.gate.resize(self._capacity(cfg, max(1, s.replicas_healthy)))
            if s is not None and s.autoscaling_target is not None:
                if m.scaled_to is not None and s.autoscaling_target != m.scaled_to and self.reports_scaling:
                    action = "scale_out" if s.autoscaling_target > m.scaled_to else "scale_in"
                    actions.append({"model": cfg.name, "action": action, "from_replicas": m.scaled_to,
                                    "to_replicas": s.autoscaling_target, "running": m.running,
                                    "reason": "Serve's autoscaler (autoscaling_config)"})
                m.scaled_to = s.autoscaling_target
            if m.shedder is not None:
                switched = m.shedder.update()
                if switched is not None:
                    rates = m.tracker.burn_rates() if m.tracker is not None else {}
                    actions.append({"model": cfg.name, "action": switched,
                                    "reason": f"5-minute burn rate {'at or over' if m.shedding else 'under'} "
                                              f"{m.config.shed_burn_rate if m.shedding else m.config.shed_burn_rate / 2:g}",
                                    "burn_rates": {k: round(v["5m"], 3) for k, v in rates.items()}})
            self._gauges(m)
        for a in actions:
            self.metrics.inc("qos_actions", (a["model"], a["action"]))
            fields = {k: v for k, v in a.items() if k not in ("model", "action", "reason")}
            events.qos_action(a["model"], a["action"], a["reason"], **fields)
        self.metrics.republish()
        return actions

    def _gauges(self, m: ModelQos) -> None:
        g = m.gate
        self.metrics.set("admission_capacity", (m.name,), g.capacity)
        for priority, n in g.waiting.items():
            self.metrics.set("admission_waiting", (m.name, priority), n)
            self.metrics.set("admission_inflight", (m.name, priority), g.inflight[priority])
        if m.tracker is not None:
            for slo, rates in m.tracker.burn_rates().items():
                for window, rate in rates.items():
                    self.metrics.set("slo_burn_rate", (m.name, slo, window), rate)
            for slo, met in m.tracker.met().items():
                self.metrics.set("slo_met", (m.name, slo), 1.0 if met else 0.0)

    def report(self, key_hash: str | None = None) -> dict[str, Any]:
        """``GET /qos``: per model its gate, SLOs and shedding; the caller's key's limits and what is left."""
        models = {}
        for name, m in self.models.items():
            g = m.gate
            slos = {}
            if m.tracker is not None:
                rates, met = m.tracker.burn_rates(), m.tracker.met()
                for slo, (bad, total) in m.tracker.counts(WINDOWS_S["1h"]).items():
                    slos[slo] = {"target": _target(m.config, slo), "burn_rate": {k: round(v, 4) for k, v in rates[slo].items()},
                                 "met": met[slo], "bad_1h": bad, "total_1h": total}
            models[name] = {
                "capacity": g.capacity, "batch_capacity": g.batch_capacity, "inflight": dict(g.inflight),
                "waiting": g.waiting, "admitted": dict(g.admitted), "expired": g.expired,
                "replicas_running": m.running, "autoscaling_target": m.scaled_to,
                "shed_batch_on_burn": m.config.shed_batch_on_burn, "shedding": m.shedding, "slos": slos,
            }
        lim = self.quotas.for_key(key_hash)
        key = None if lim is None else {
            "name": lim.policy.name, "max_priority": lim.policy.max_priority, "inflight": lim.inflight,
            "max_concurrent": lim.policy.max_concurrent, **lim.headers(time.monotonic())}
        return {"models": models, "key": key}


def _target(config: QosConfig, slo: str) -> float | None:
    s = config.slo
    if s is None:
        return None
    return {"ttft": s.ttft_p95_s, "tpot": s.tpot_p95_s, "errors": s.error_rate, "availability": s.availability}[slo]

