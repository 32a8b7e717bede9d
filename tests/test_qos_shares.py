"""The ingresses split a model's slots by demand (``deployments.qos.shares``): all clients at one
ingress get the whole batch, equal demands split evenly, slots nobody asks for are split evenly,
and an ingress that is gone stops counting."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.config import AppConfig
from deployments.protocol import ModelStatus
from deployments.qos.gate import AdmissionGate
from deployments.qos.service import Qos
from deployments.qos.shares import FORGET_S, NAMESPACE, STALE_S, DemandBoard, IngressDemand, fair_share
from tests.fake_kv import Clock, DictKV


@pytest.mark.parametrize("demands, shares", [
    ({"a": 32, "b": 0}, {"a": 32, "b": 1}),  # every client at one ingress: it gets the whole batch
    ({"a": 32, "b": 32}, {"a": 16, "b": 16}),
    ({"a": 0, "b": 0}, {"a": 16, "b": 16}),  # idle: an even split, room for a burst anywhere
    ({"a": 4, "b": 40}, {"a": 4, "b": 28}),  # max-min fair: the small demand is met, the rest goes on
    ({"a": 4, "b": 10}, {"a": 13, "b": 19}),  # both met: the 18 spare slots split evenly
    ({"a": 50, "b": 50, "c": 50}, {"a": 11, "b": 11, "c": 11}),  # rounded up, as the even split was
])
def test_fair_share(demands: dict[str, int], shares: dict[str, int]) -> None:
    assert {who: fair_share(32, demands, who) for who in demands} == shares


def test_the_gates_demand_is_its_peak_since_the_last_tick() -> None:
    async def go() -> None:
        gate = AdmissionGate(capacity=2, max_queued=10)
        far = time.monotonic() + 60
        await gate.enter("batch", far)
        await gate.enter("batch", far)
        waiter = asyncio.create_task(gate.enter("batch", far))
        await asyncio.sleep(0.01)
        gate.leave("batch")  # the waiter takes the slot
        await waiter
        gate.leave("batch")
        assert gate.take_peak() == 3  # two running and one waiting, at the most
        assert gate.take_peak() == 1  # the new period starts from what it holds now

    asyncio.run(go())


def test_board_sees_live_ingresses_and_forgets_gone_ones() -> None:
    kv, clock = DictKV(), Clock(0.0)
    a, b = DemandBoard("app", "a", kv, clock), DemandBoard("app", "b", kv, clock)
    other_app = DemandBoard("other", "c", kv, clock)
    assert other_app.exchange({"m": 7}) == {"c": {"m": 7}}
    assert a.exchange({"m": 32}) == {"a": {"m": 32}}
    assert b.exchange({"m": 0}) == {"a": {"m": 32}, "b": {"m": 0}}
    assert a.exchange({"m": 30}) == {"a": {"m": 30}, "b": {"m": 0}}
    assert IngressDemand.model_validate_json(kv.data[(NAMESPACE, "app/a")]).seq == 2
    for _ in range(int(STALE_S) + 1):  # b stops publishing: gone after STALE_S without a new entry
        clock.t += 1.0
        view = a.exchange({"m": 30})
    assert view == {"a": {"m": 30}}
    clock.t += FORGET_S
    a.exchange({"m": 30})
    assert (NAMESPACE, "app/b") not in kv.data and (NAMESPACE, "other/c") in kv.data
    kv.broken = True
    assert a.exchange({"m": 30}) is None and a.unreachable  # unreachable: the caller keeps the even split
    kv.broken = False
    assert a.exchange({"m": 30}) == {"a": {"m": 30}} and not a.unreachable


def test_qos_sizes_its_gate_by_the_ingresses_demands() -> None:
    from prometheus_client import CollectorRegistry

    from deployments.qos.metrics import QosMetrics
    from engine.metrics import PrometheusBackend

    cfg = AppConfig.model_validate({"models": [{"name": "m", "source": "demo:tiny", "max_ongoing_requests": 32}],
                                    "ingress_replicas": 2})
    qos = Qos(cfg, [], QosMetrics(PrometheusBackend(CollectorRegistry())))
    qos.me = "a"
    running = [ModelStatus(name="m", ready=True, replicas_healthy=1)]
    assert qos.models["m"].gate.capacity == 16  # nothing known yet: an even split
    qos.refresh(running, {"a": {"m": 32}, "b": {"m": 0}})
    assert qos.models["m"].gate.capacity == 32
    qos.refresh(running, {"a": {"m": 32}, "b": {"m": 32}})
    assert qos.models["m"].gate.capacity == 16
    qos.refresh([ModelStatus(name="m", ready=True, replicas_healthy=2)], {"a": {"m": 64}, "b": {"m": 8}})
    assert qos.models["m"].gate.capacity == 56
    qos.refresh(running, None)  # the demands could not be read
    assert qos.models["m"].gate.capacity == 16
