"""Saved routing state: a route's rollout and open circuits survive a new Router (a restarted router
replica) through JSON in a key-value store, and are discarded when they no longer fit the config."""

from __future__ import annotations

import random
from typing import Any

import pytest

from deployments.routing import Outcome, Router
from deployments.routing.persist import NAMESPACE, RolloutStore
from deployments.routing.snapshot import RouteSnapshot

from tests.fake_kv import Clock, DictKV

FAIL = Outcome(ok=False, code="engine_failure")


def route(canary_deployment: str = "llama-rc1", **rollout: Any) -> dict[str, Any]:
    return {
        "name": "chat",
        "variants": [{"name": "stable", "weight": 100}, {"name": "canary", "deployment": canary_deployment, "weight": 0},
                     {"name": "spare", "weight": 0}],
        "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 600},
        "rollout": {"canary": "canary", "stages": [10, 50, 100], "min_requests_per_stage": 20,
                    "min_seconds_per_stage": 10, "latency": {"min_samples": 10}, **rollout},
    }


class Process:
    """One router process: its own monotonic clock (unrelated to any other's) and a shared wall clock."""

    def __init__(self, wall: Clock, mono_start: float, store: RolloutStore, config: dict[str, Any]) -> None:
        self.mono = Clock(mono_start)
        self.wall = wall
        self.store = store
        self.router = Router(clock=self.mono, wall_clock=wall, rng=random.Random(0))
        self.notes = self.router.reconfigure({"routes": [config]}, store.load(["chat"]))

    def advance(self, seconds: float) -> None:
        self.mono.t += seconds
        self.wall.t += seconds

    def save(self) -> list[str]:
        dirty = self.router.take_dirty()
        self.store.save(self.router.snapshot(r) for r in dirty)
        return dirty

    def traffic(self, n: int, canary: Outcome) -> None:
        """``n`` requests to each of stable and canary; ``canary`` is the failure it answers, or any
        success (then its latencies vary like the baseline's, so the Welch test has spread to judge)."""
        for i in range(n):
            self.router.record("chat", "stable", Outcome(e2e_s=1.0 + (i % 5) / 10))
            self.router.record("chat", "canary", canary if not canary.ok else Outcome(e2e_s=1.0 + (i % 7) / 10))


def rollout_of(router: Router) -> dict[str, Any]:
    return router.report()["routes"]["chat"]["rollout"]


def variant(router: Router, name: str) -> dict[str, Any]:
    return next(v for v in router.report()["routes"]["chat"]["variants"] if v["name"] == name)


@pytest.fixture()
def kv() -> DictKV:
    return DictKV()


def test_rolled_back_rollout_and_open_circuit_survive_a_restart(kv: DictKV) -> None:
    store = RolloutStore("app-1", kv)
    wall = Clock(1_700_000_000.0)
    first = Process(wall, 50.0, store, route())
    assert first.notes == []  # nothing saved yet
    first.router.tick()  # auto start at 10%
    first.advance(10)
    first.traffic(25, Outcome(e2e_s=1.0))
    first.router.tick()  # advance to 50%
    for _ in range(3):
        first.router.record("chat", "spare", FAIL)  # opens spare's circuit for 600 s
    first.traffic(25, FAIL)  # the canary fails: its circuit opens too ...
    first.router.tick()  # ... and the rollout rolls back
    before = rollout_of(first.router)
    assert before["state"] == "rolled_back" and [d["action"] for d in before["history"]] == ["start", "advance", "rollback"]
    assert set(first.save()) == {"chat"}
    assert list(kv.data) == [(NAMESPACE, "rollout/app-1/chat")]
    first.advance(100)

    # a new process: its monotonic clock has nothing to do with the first one's
    second = Process(wall, 7.0, store, route())
    assert any("rollout of 'canary' restored rolled_back at stage 1 (0% canary)" in n for n in second.notes), second.notes
    r = second.router
    after = rollout_of(r)
    assert after["state"] == "rolled_back" and after["canary_percent"] == 0.0 and after["stage_index"] == 1
    assert [(d["action"], d["reason"], d["canary_percent"]) for d in after["history"]] == \
        [(d["action"], d["reason"], d["canary_percent"]) for d in before["history"]]
    # decision times keep their place on the wall clock: in the new process's clock they are 100 s older
    shift = (first.mono.t - second.mono.t)
    assert [d["at"] for d in after["history"]] == pytest.approx([d["at"] - shift for d in before["history"]])
    assert after["last_decision"]["action"] == "rollback"
    assert {**after["last_test"], "at": None} == {**before["last_test"], "at": None}  # the Welch evidence, as it was
    assert after["last_test"]["action"] == "advance" and after["last_test"]["p_value"] is not None
    assert r.weights("chat")["canary"] == 0.0
    # spare's circuit is open with what was left of its cooldown; the canary's too
    assert variant(r, "spare")["breaker"]["state"] == "open"
    assert variant(r, "spare")["breaker"]["retry_after_s"] == pytest.approx(500.0)
    assert variant(r, "canary")["breaker"]["state"] == "open"
    # ticks do not bring the rollout back, and no request reaches the canary
    for _ in range(5):
        second.advance(1)
        assert [e for e in r.tick() if e["kind"] == "rollout"] == []
    assert {r.choose("chat", key=f"user-{i}").variant for i in range(300)} == {"stable"}
    # until an admin restarts it
    d = r.set_stage("chat", 0, "retry after the fix")
    assert d.state == "running" and r.weights("chat")["canary"] == 10.0
    assert second.save() == ["chat"]
    third = Process(wall, 1.0, store, route())
    assert rollout_of(third.router)["state"] == "running" and third.router.weights("chat")["canary"] == 10.0


def test_mid_stage_rollout_resumes_its_stage_with_a_fresh_window(kv: DictKV) -> None:
    store = RolloutStore("app-1", kv)
    wall = Clock(1_700_000_000.0)
    first = Process(wall, 0.0, store, route())
    first.router.tick()
    first.advance(10)
    first.traffic(25, Outcome(e2e_s=1.0))
    [advance] = first.router.tick()
    assert advance["action"] == "advance" and advance["canary_percent"] == 50.0
    first.traffic(15, Outcome(e2e_s=1.0))  # part of the next stage's evidence: lost with the process
    first.save()
    first.advance(30)

    second = Process(wall, 0.0, store, route())
    r = second.router
    ro = rollout_of(r)
    assert (ro["state"], ro["stage_index"], ro["canary_percent"], ro["stage_age_s"]) == ("running", 1, 50.0, 0.0)
    assert ro["last_test"]["action"] == "advance" and ro["last_test"]["p_value"] == pytest.approx(advance["p_value"])
    assert r.weights("chat") == {"stable": 50.0, "canary": 50.0, "spare": 0.0}
    assert variant(r, "canary")["stats"]["stage"]["requests"] == 0
    # the stage is judged again on new evidence only: enough requests, and its minimum time since the restart
    second.traffic(25, Outcome(e2e_s=1.0))
    second.advance(5)
    wait = r.tick()
    assert wait == [] and "5/10s in stage" in rollout_of(r)["last_decision"]["reason"]
    second.advance(5)
    assert [e["action"] for e in r.tick()] == ["advance"] and r.weights("chat")["canary"] == 100.0


def test_saved_state_of_another_canary_deployment_is_discarded(kv: DictKV) -> None:
    store = RolloutStore("app-1", kv)
    wall = Clock(1_700_000_000.0)
    first = Process(wall, 0.0, store, route())
    first.router.tick()
    first.router.rollback("chat", "bad build")
    first.save()

    second = Process(wall, 0.0, store, route(canary_deployment="llama-rc2"))
    assert second.notes == ["route 'chat': saved rollout (rolled_back) discarded, starting fresh: canary deployment "
                            "changed from 'llama-rc1' to 'llama-rc2'"]
    assert rollout_of(second.router)["state"] == "pending"
    assert [e["action"] for e in second.router.tick()] == ["start"]  # the new build gets its rollout
    assert second.save() == ["chat"]  # and the fresh state replaces the old one
    assert RouteSnapshot.model_validate_json(kv.data[(NAMESPACE, "rollout/app-1/chat")]).rollout.canary_deployment \
        == "llama-rc2"  # type: ignore[union-attr]


def test_routes_and_applications_have_their_own_keys(kv: DictKV) -> None:
    wall = Clock(1_700_000_000.0)
    a = Process(wall, 0.0, RolloutStore("app-a", kv), route())
    a.router.tick()
    a.router.rollback("chat")
    a.save()
    b = Process(wall, 0.0, RolloutStore("app-b", kv), route())
    assert b.notes == [] and rollout_of(b.router)["state"] == "pending"


def test_unreadable_state_starts_fresh_but_an_unreachable_store_raises(kv: DictKV) -> None:
    store = RolloutStore("app-1", kv)
    kv.put(store.key("chat"), b'{"version": 99, "route": "chat"}', NAMESPACE)
    assert store.load(["chat"]) == {}
    kv.put(store.key("chat"), b"not json", NAMESPACE)
    assert store.load(["chat"]) == {}
    kv.broken = True
    with pytest.raises(ConnectionError):
        store.load(["chat"])


def test_only_decisions_and_circuit_transitions_mark_a_route_for_saving() -> None:
    clock = Clock(0.0)
    r = Router({"routes": [route()]}, clock=clock)
    assert r.take_dirty() == ["chat"]  # a (re)configured route is saved once
    assert r.take_dirty() == []
    assert [e["action"] for e in r.tick()] == ["start"]
    assert r.take_dirty() == ["chat"]
    clock.t = 1.0
    r.tick()  # a wait: nothing to save
    r.record("chat", "stable", Outcome(e2e_s=1.0))
    r.record("chat", "canary", Outcome(ok=False, code="over_capacity"))
    assert r.take_dirty() == []
    for _ in range(3):
        r.record("chat", "spare", FAIL)
    assert r.take_dirty() == ["chat"]
    r.mark_dirty(["chat", "gone"])
    assert r.take_dirty() == ["chat"]  # routes no longer configured are not saved
