"""QoS pieces on their own: the admission gate, burn rates against hand-computed values, shedding with
its hysteresis, key limits with their headers, and the ingress's QoS bookkeeping end to end (no Ray)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig
from deployments.http.auth import hash_key
from deployments.protocol import ModelStatus
from deployments.qos.config import KeyPolicy, QosConfig, SloConfig
from deployments.qos.gate import AdmissionGate
from deployments.qos.metrics import QOS_METRICS, QosMetrics
from deployments.qos.quotas import KeyLimiter, RateLimitError
from deployments.qos.slo import MIN_EVENTS, Shedder, SloTracker
from deployments.qos.service import Qos
from engine.errors import DeadlineExceededError, InvalidRequestError, OverCapacityError
from engine.metrics import PrometheusBackend


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the admission gate -------------------------------------------------------------------------
def test_gate_lets_interactive_overtake_batch_then_earliest_deadline() -> None:
    async def go() -> list[str]:
        gate = AdmissionGate(capacity=1, max_queued=10)
        order: list[str] = []
        far = time.monotonic() + 60

        async def one(name: str, priority: str, deadline: float) -> None:
            await gate.enter(priority, deadline)  # type: ignore[arg-type]
            order.append(name)

        await gate.enter("batch", far)  # holds the only slot
        tasks = [asyncio.create_task(one("b1", "batch", far)), asyncio.create_task(one("b2", "batch", far - 30)),
                 asyncio.create_task(one("i-late", "interactive", far)),
                 asyncio.create_task(one("i-soon", "interactive", far - 10))]
        await asyncio.sleep(0.01)
        assert gate.waiting == {"interactive": 2, "batch": 2} and order == []
        for _ in range(4):
            gate.leave(gate_priority(order, "batch"))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return order

    assert run(go()) == ["i-soon", "i-late", "b2", "b1"]


def gate_priority(order: list[str], first: str) -> str:
    """The priority of the request that leaves: the holder first, then the last one admitted."""
    return first if not order else "interactive" if order[-1].startswith("i") else "batch"


def test_gate_keeps_slots_for_interactive_requests() -> None:
    async def go() -> None:
        gate = AdmissionGate(capacity=4, max_queued=10, reserve_share=0.25)
        far = time.monotonic() + 60
        assert gate.batch_capacity == 3
        for _ in range(3):
            await gate.enter("batch", far)
        waiting = asyncio.create_task(gate.enter("batch", far))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the fourth slot is an interactive one
        await asyncio.wait_for(gate.enter("interactive", far), 1)  # admitted at once
        assert gate.inflight == {"interactive": 1, "batch": 3}
        gate.leave("batch")
        await asyncio.wait_for(waiting, 1)
        assert gate.inflight == {"interactive": 1, "batch": 3}

    run(go())


def test_gate_deadline_passes_while_waiting_and_overflow_is_429() -> None:
    async def go() -> None:
        gate = AdmissionGate(capacity=1, max_queued=1)
        await gate.enter("interactive", time.monotonic() + 60)
        with pytest.raises(DeadlineExceededError):
            await gate.enter("interactive", time.monotonic() + 0.05)
        assert gate.expired == 1 and gate.waiting == {"interactive": 0, "batch": 0}
        blocked = asyncio.create_task(gate.enter("batch", time.monotonic() + 60))
        await asyncio.sleep(0.01)
        with pytest.raises(OverCapacityError):
            await gate.enter("batch", time.monotonic() + 60)
        blocked.cancel()  # the client leaves: its place is freed, not its slot taken
        await asyncio.sleep(0.01)
        gate.leave("interactive")
        assert gate.inflight == {"interactive": 0, "batch": 0}

    run(go())


def test_gate_grows_with_replicas() -> None:
    async def go() -> None:
        gate = AdmissionGate(capacity=1, max_queued=10)
        far = time.monotonic() + 60
        await gate.enter("interactive", far)
        second = asyncio.create_task(gate.enter("interactive", far))
        await asyncio.sleep(0.01)
        assert not second.done()
        gate.resize(2)  # a replica came up
        await asyncio.wait_for(second, 1)

    run(go())


# -- burn rates ---------------------------------------------------------------------------------
SLO = SloConfig(ttft_p95_s=0.5, error_rate=0.01, availability=0.99)


def test_burn_rates_match_hand_computed_values() -> None:
    t = SloTracker(SLO)
    now = 10_000.0
    # 30 minutes ago (inside 1 h, outside 5 min): 900 interactive successes, all fast.
    for i in range(900):
        t.observe(status=200, interactive=True, ttft_s=0.1, now=now - 1800 + i)
    # The last minute: 100 requests; 10 slow successes, 2 server errors, 3 shed (429), 1 bad request.
    for i in range(100):
        status, ttft = 200, 0.1
        if i < 10:
            ttft = 0.9
        elif i < 12:
            status = 500
        elif i < 15:
            status = 429
        elif i == 15:
            status = 400
        t.observe(status=status, interactive=True, ttft_s=ttft if status == 200 else None, now=now - 60 + i * 0.5)
    rates = t.burn_rates(now)
    # ttft: answered requests only (the 500s, 429s and the 400 have none): 10 slow of 94; budget 5%
    answered_5m = 100 - 2 - 3 - 1
    assert rates["ttft"]["5m"] == pytest.approx((10 / answered_5m) / 0.05)
    assert rates["ttft"]["1h"] == pytest.approx((10 / (900 + answered_5m)) / 0.05)
    # errors: 5xx over every answer but 4xx: 2 of 96 (5 min), 2 of 996 (1 h); budget 1%
    assert rates["errors"]["5m"] == pytest.approx((2 / 96) / 0.01)
    assert rates["errors"]["1h"] == pytest.approx((2 / 996) / 0.01)
    # availability: 5xx and 429 over every request but a client's own 4xx: 5 of 99, 5 of 999; budget 1%
    assert rates["availability"]["5m"] == pytest.approx((5 / 99) / 0.01)
    assert rates["availability"]["1h"] == pytest.approx((5 / 999) / 0.01)
    assert t.met(now) == {"ttft": True, "errors": True, "availability": True}  # 1-hour burn rates under 1
    # An hour later everything has aged out.
    assert t.burn_rates(now + 3600)["ttft"] == {"5m": 0.0, "1h": 0.0}


def test_batch_requests_have_no_latency_promise() -> None:
    t = SloTracker(SloConfig(ttft_p95_s=0.5))
    for _ in range(10):
        t.observe(status=200, interactive=False, ttft_s=9.0, now=100.0)
    assert t.counts(300, 100.0) == {"ttft": (0, 0)}


# -- shedding -----------------------------------------------------------------------------------
def test_shedding_switches_on_with_the_burn_and_off_below_half_of_it() -> None:
    qos = QosConfig(slo=SloConfig(ttft_p95_s=0.5), shed_batch_on_burn=True, shed_burn_rate=2.0)
    t = SloTracker(qos.slo)  # type: ignore[arg-type]
    s = Shedder(qos, t)
    now = 1000.0
    for _ in range(MIN_EVENTS - 1):  # burn 20 (every request slow), but too few requests to act on
        t.observe(status=200, interactive=True, ttft_s=1.0, now=now)
    assert s.update(now) is None and not s.shedding
    t.observe(status=200, interactive=True, ttft_s=1.0, now=now)
    assert s.update(now) == "shed_batch_on" and s.shedding
    # 20 slow of 220 answers: burn (20/220)/0.05 = 1.82: under 2, still over 1: stays on (hysteresis)
    for _ in range(200):
        t.observe(status=200, interactive=True, ttft_s=0.1, now=now + 1)
    assert s.update(now + 1) is None and s.shedding
    # 20 slow of 420: burn 0.95, under half of 2: off
    for _ in range(200):
        t.observe(status=200, interactive=True, ttft_s=0.1, now=now + 2)
    assert s.update(now + 2) == "shed_batch_off" and not s.shedding
    assert s.update(now + 3) is None


def test_shedding_needs_an_slo() -> None:
    with pytest.raises(ValidationError, match="shed_batch_on_burn needs an slo"):
        QosConfig(shed_batch_on_burn=True)


# -- key limits ---------------------------------------------------------------------------------
def policy(**kw: Any) -> KeyPolicy:
    return KeyPolicy(key=hash_key("sk-team-a"), name="team-a", **kw)


def test_request_rate_limit_with_openai_headers() -> None:
    lim = KeyLimiter(policy(requests_per_minute=2))
    h = lim.admit()
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "1"
    lim.done(0)
    lim.admit()
    lim.done(0)
    with pytest.raises(RateLimitError) as e:
        lim.admit()
    assert e.value.code == "rate_limit_exceeded" and 25 <= e.value.retry_after <= 30  # 1 request refills in 30 s
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.value.headers["x-ratelimit-reset-requests"] in ("59s", "1m0s")


def test_token_rate_limit_charges_at_the_end_and_concurrency_limit() -> None:
    lim = KeyLimiter(policy(tokens_per_minute=100, max_concurrent=1))
    lim.admit()
    with pytest.raises(RateLimitError, match="concurrency"):
        lim.admit()
    lim.done(150)  # overdrawn by 50: the next request waits until the bucket is back at zero (30 s)
    with pytest.raises(RateLimitError, match="rate limit") as e:
        lim.admit()
    assert 29 <= e.value.retry_after <= 30
    assert e.value.headers["x-ratelimit-remaining-tokens"] == "0"


def test_key_policy_takes_hashes_only() -> None:
    with pytest.raises(ValidationError, match="hash"):
        KeyPolicy(key="sk-plain-key", name="x")


# -- the ingress's bookkeeping --------------------------------------------------------------------
def app_config(qos: dict[str, Any], **extra: Any) -> AppConfig:
    return AppConfig.model_validate({"models": [{"name": "m", "source": "demo:tiny", "max_ongoing_requests": 2,
                                                 "qos": qos}], **extra})


def test_ingress_qos_sheds_batch_while_the_slo_burns_and_counts_it() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    cfg = app_config({"slo": {"ttft_p95_s": 0.5}, "shed_batch_on_burn": True, "interactive_reserve": 0})
    qos = Qos(cfg, [], QosMetrics(PrometheusBackend(registry)))
    status = [ModelStatus(name="m", ready=True, replicas_healthy=1)]

    async def go() -> None:
        for _ in range(MIN_EVENTS):  # slow answers, as the replica measured them
            t = await qos.admit("m", None, "anonymous", "interactive", 30)
            t.finish(200, 10, 5, ttft_s=2.0, tpot_s=0.01)
        actions = qos.refresh(status)
        assert [a["action"] for a in actions] == ["shed_batch_on"]
        with pytest.raises(OverCapacityError) as e:
            await qos.admit("m", None, "anonymous", "batch", 30)
        assert e.value.code == "load_shed" and e.value.retry_after == 10
        t = await qos.admit("m", None, "anonymous", "interactive", 30)  # interactive still goes
        t.finish(200, 1, 1, ttft_s=0.1)
        tracker = qos.models["m"].tracker
        for _ in range(400):
            tracker.observe(status=200, interactive=True, ttft_s=0.1)  # type: ignore[union-attr]
        assert [a["action"] for a in qos.refresh(status)] == ["shed_batch_off"]
        (await qos.admit("m", None, "anonymous", "batch", 30)).finish(200)

    run(go())
    v = lambda name, **labels: registry.get_sample_value(QOS_METRICS[name].full_name + ("_total" if QOS_METRICS[name].kind == "counter" else ""), labels)  # noqa: E731
    assert v("qos_actions", model="m", action="shed_batch_on") == 1
    assert v("qos_actions", model="m", action="shed") == 1
    assert v("qos_actions", model="m", action="shed_batch_off") == 1
    assert v("slo_burn_rate", model="m", slo="ttft", window="5m") is not None
    assert v("key_requests", key="anonymous", status="429") == 1
    assert v("key_tokens", key="anonymous", kind="prompt") == 10 * MIN_EVENTS + 1


def test_ingress_qos_priority_ceiling_deadline_and_gate_size() -> None:
    from prometheus_client import CollectorRegistry

    key = hash_key("sk-nightly")
    cfg = app_config({"default_timeout_s": 5}, limits={"request_timeout_s": 60})
    qos = Qos(cfg, [KeyPolicy(key=key, name="nightly", max_priority="batch")],
              QosMetrics(PrometheusBackend(CollectorRegistry())))
    assert qos.timeout_s("m", None) == 5 and qos.timeout_s("m", 600) == 60 and qos.timeout_s("m", 2) == 2
    assert qos.models["m"].gate.capacity == 2  # one replica x max_ongoing_requests 2

    async def go() -> None:
        t = await qos.admit("m", key, "key-x", "interactive", 5)
        assert t.priority == "batch"  # the key's ceiling
        assert 4 < t.remaining_s() <= 5
        t.finish(200)
        t.finish(200)  # once only
        assert qos.models["m"].gate.inflight == {"interactive": 0, "batch": 0}

    run(go())
    qos.refresh([ModelStatus(name="m", ready=True, replicas_healthy=3)])
    assert qos.models["m"].gate.capacity == 6
    assert qos.report()["models"]["m"]["capacity"] == 6


def test_a_clients_own_short_deadline_burns_no_budget() -> None:
    """504s past a timeout the client shortened are its choice; past the model's default they count."""
    from prometheus_client import CollectorRegistry

    cfg = app_config({"default_timeout_s": 30, "slo": {"availability": 0.99}})
    qos = Qos(cfg, [], QosMetrics(PrometheusBackend(CollectorRegistry())))
    tracker = qos.models["m"].tracker
    assert tracker is not None

    async def go() -> None:
        (await qos.admit("m", None, "t", "batch", 0.5)).finish(504)  # the client asked for half a second
        assert tracker.counts(300)["availability"] == (0, 0)
        (await qos.admit("m", None, "t", "batch", 60)).finish(504)  # more than the default: the server's miss
        (await qos.admit("m", None, "t", "batch")).finish(504)  # the model's default deadline
        assert tracker.counts(300)["availability"] == (2, 2)

    run(go())


def test_a_replicas_error_keeps_its_status_in_the_ingress() -> None:
    """What SLOs and canary statistics count: a replica's 400 or 504 is not a 500 of the ingress."""
    from deployments.messages import RemoteError, ReplicaError
    from deployments.statuses import status_of

    for err in (DeadlineExceededError("late"), OverCapacityError("full"), InvalidRequestError("bad")):
        assert status_of(RemoteError(ReplicaError.of(err))) == status_of(err)
    odd = ReplicaError(code="x", message="x", type="invalid_request_error", http_status=422)
    assert status_of(RemoteError(odd)) == 400  # an unknown 4xx stays a client error


def test_autoscaling_target_must_leave_room_to_scale() -> None:
    with pytest.raises(ValidationError, match="target_ongoing_requests"):
        AppConfig.model_validate({"models": [{"name": "m", "source": "demo:tiny", "max_ongoing_requests": 2,
                                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}]})


def test_scale_moves_are_reported_once_per_change() -> None:
    from prometheus_client import CollectorRegistry

    cfg = AppConfig.model_validate({"models": [{"name": "m", "source": "demo:tiny", "max_ongoing_requests": 4,
                                                "autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                                       "target_ongoing_requests": 1}}]})
    qos = Qos(cfg, [], QosMetrics(PrometheusBackend(CollectorRegistry())))
    at = lambda target, running: [ModelStatus(name="m", ready=True, replicas_healthy=running,  # noqa: E731
                                              autoscaling_target=target)]
    assert qos.refresh(at(1, 1)) == []
    out = qos.refresh(at(2, 1))
    assert [(a["action"], a["from_replicas"], a["to_replicas"]) for a in out] == [("scale_out", 1, 2)]
    assert qos.refresh(at(2, 2)) == [] and qos.models["m"].gate.capacity == 8
    assert [a["action"] for a in qos.refresh(at(1, 2))] == ["scale_in"]


def test_status_shows_slos_and_the_callers_key() -> None:
    from cluster.cli import qos_lines

    report = {"models": {"chat": {
        "capacity": 64, "inflight": {"interactive": 3, "batch": 5}, "waiting": {"interactive": 0, "batch": 7},
        "expired": 2, "autoscaling_target": 2, "shedding": True,
        "slos": {"ttft": {"target": 0.5, "burn_rate": {"5m": 3.25, "1h": 0.8}, "met": True, "bad_1h": 40,
                          "total_1h": 1000}}}},
        "key": {"name": "nightly", "max_priority": "batch", "inflight": 1, "max_concurrent": None,
                "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59"}}
    assert qos_lines(report) == [
        "  model chat: 8/64 in flight, 7 waiting, 2 expired in the queue, autoscaler target 2, SHEDDING batch requests",
        "    slo ttft (target 0.5): met, burn rate 5m 3.25 / 1h 0.80, 40 bad of 1000 in the last hour",
        "  key nightly: max priority batch, 1 in flight, limit-requests 60, remaining-requests 59",
    ]


def test_the_example_config_is_valid() -> None:
    from pathlib import Path

    from cluster.serve_config import load, problems

    assert problems(load(Path(__file__).resolve().parents[1] / "config" / "qos.example.yaml")) == []
