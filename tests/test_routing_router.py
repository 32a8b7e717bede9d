"""The Router facade: choose / record / tick / report / reconfigure, as the deployment will use it."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.routing import (
    NoRolloutError,
    NoVariantAvailableError,
    Outcome,
    RouteConfig,
    Router,
    UnknownRouteError,
    UnknownVariantError,
)

FAIL = Outcome(ok=False, code="engine_failure")
KEYS = [f"user-{i}" for i in range(1000)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def chat(weights: dict[str, float], **kw: Any) -> dict[str, Any]:
    return {"name": "chat", "variants": [{"name": n, "weight": w} for n, w in weights.items()],
            "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 30}, **kw}


def make(*routes: dict[str, Any]) -> tuple[Router, Clock]:
    clock = Clock()
    return Router({"routes": list(routes)}, clock=clock, rng=random.Random(0)), clock


def test_choose_decision_fields_and_errors() -> None:
    router, _ = make({"name": "chat", "variants": [{"name": "a", "deployment": "llama-3b", "weight": 1}]})
    d = router.choose("chat", key="u1")
    assert (d.route, d.variant, d.deployment, d.reason) == ("chat", "a", "llama-3b", "sticky")
    assert router.choose("chat").reason == "weighted"
    with pytest.raises(UnknownRouteError, match="no route named 'code'"):
        router.choose("code")
    with pytest.raises(UnknownVariantError, match="no variant named 'b'"):
        router.choose("chat", force="b")
    with pytest.raises(NoRolloutError):
        router.promote("chat")


def test_non_sticky_route_ignores_key() -> None:
    router, _ = make(chat({"a": 50, "b": 50}, sticky=False))
    picks = {router.choose("chat", key="same-user").variant for _ in range(50)}
    assert picks == {"a", "b"}


def test_open_circuit_excludes_variant_then_keys_come_back() -> None:
    router, clock = make(chat({"a": 50, "b": 30, "c": 20}))
    before = {k: router.choose("chat", key=k).variant for k in KEYS}
    for _ in range(3):
        router.record("chat", "c", FAIL)
    assert [(e["name"], e["to_state"]) for e in router.drain_events()] == [("c", "open")]
    during = {k: router.choose("chat", key=k) for k in KEYS}
    assert all(during[k].variant == before[k] for k in KEYS if before[k] != "c")
    assert all(during[k].variant in ("a", "b") for k in KEYS if before[k] == "c")

    clock.t = 30.0
    probe = next(router.choose("chat", key=k) for k in KEYS if before[k] == "c")
    assert probe.variant == "c"  # half-open: the first request whose key belongs to c probes it
    assert {router.choose("chat", key=k).variant for k in KEYS if before[k] == "c"} <= {"a", "b"}  # one probe only
    router.record("chat", "c", Outcome(e2e_s=1.0))
    assert [e["to_state"] for e in router.drain_events()] == ["half_open", "closed"]
    assert {k: router.choose("chat", key=k).variant for k in KEYS} == before


def test_all_open_raises_with_retry_after() -> None:
    router, clock = make(chat({"a": 1}))
    for _ in range(3):
        router.record("chat", "a", FAIL)
    clock.t = 12.0
    with pytest.raises(NoVariantAvailableError) as err:
        router.choose("chat")
    assert err.value.retry_after == pytest.approx(18.0)
    assert router.choose("chat", force="a").reason == "forced"  # admin override bypasses the breaker


SATURATED = Outcome(ok=False, code="over_capacity", e2e_s=0.01)  # a 429, as an ingress that does not flag it sends it
CLIENT_FLAGGED = Outcome(ok=False, code="context_length_exceeded", client_error=True)  # a 400 with a code no list names


def test_client_errors_do_not_trip_breaker_or_error_rate() -> None:
    router, _ = make(chat({"a": 1}))
    for _ in range(10):
        router.record("chat", "a", Outcome(ok=False, code="invalid_request"))
        router.record("chat", "a", SATURATED)
        router.record("chat", "a", CLIENT_FLAGGED)
    assert router.drain_events() == []
    assert router.table()["chat"]["closed"] == ["a"]
    stats = router.report()["routes"]["chat"]["variants"][0]["stats"]["total"]
    assert stats["requests"] == 30 and stats["failures"] == 0 and stats["client_errors"] == 30
    assert stats["judged"] == 0 and stats["error_rate"] == 0.0
    assert stats["errors_by_code"] == {"invalid_request": 10, "over_capacity": 10, "context_length_exceeded": 10}


def test_saturation_counts_even_when_a_route_lists_no_client_error_codes() -> None:
    router, _ = make(chat({"a": 1}, client_error_codes=[]))
    for _ in range(10):
        router.record("chat", "a", SATURATED)
    router.record("chat", "a", Outcome(ok=False, code="invalid_request"))  # unflagged, unlisted: the variant's
    stats = router.report()["routes"]["chat"]["variants"][0]["stats"]["total"]
    assert (stats["failures"], stats["client_errors"], router.drain_events()) == (1, 10, [])


def test_client_errors_neither_break_nor_extend_a_run_of_failures() -> None:
    router, _ = make(chat({"a": 1, "b": 1}))
    for outcome in (FAIL, SATURATED, FAIL, CLIENT_FLAGGED):
        router.record("chat", "b", outcome)
    assert router.drain_events() == []  # 2 failures so far; threshold is 3
    router.record("chat", "b", FAIL)
    assert [(e["name"], e["to_state"]) for e in router.drain_events()] == [("b", "open")]


def test_a_saturated_probe_neither_closes_the_circuit_nor_uses_up_its_slot() -> None:
    router, clock = make(chat({"a": 1}))
    for _ in range(3):
        router.record("chat", "a", FAIL)
    clock.t = 30.0
    assert router.choose("chat").variant == "a"  # the one half-open probe
    with pytest.raises(NoVariantAvailableError):
        router.choose("chat")
    router.record("chat", "a", SATURATED)
    assert router.table()["chat"]["probing"] == ["a"]  # still half-open: a 429 proves nothing
    assert router.choose("chat").variant == "a"  # and the slot is free again for the next probe
    router.record("chat", "a", Outcome(e2e_s=1.0))
    assert [e["to_state"] for e in router.drain_events()] == ["open", "half_open", "closed"]


def test_outcomes_for_unknown_targets_are_dropped() -> None:
    router, _ = make(chat({"a": 1}))
    router.record("gone", "a", FAIL)
    router.record("chat", "gone", FAIL)
    assert router.report()["routes"]["chat"]["variants"][0]["stats"]["total"]["requests"] == 0


def test_report_is_json_and_complete() -> None:
    rollout = {"canary": "b", "stages": [10, 100], "min_requests_per_stage": 1, "min_seconds_per_stage": 0,
               "latency": {"min_samples": 2}}
    router, clock = make(chat({"a": 100, "b": 0}, rollout=rollout))
    router.tick()
    for i in range(200):
        d = router.choose("chat", key=KEYS[i])
        router.record("chat", d.variant, Outcome(ttft_s=0.1, tpot_s=0.01, e2e_s=1.0 + (i % 7) / 10))
    clock.t = 5.0
    router.tick()
    report = json.loads(json.dumps(router.report(), allow_nan=False))
    r = report["routes"]["chat"]
    assert [v["name"] for v in r["variants"]] == ["a", "b"]
    assert [v["weight"] for v in r["variants"]] == [0.0, 100.0]
    assert r["variants"][1]["share_percent"] == 100.0
    assert r["variants"][0]["stats"]["total"]["latency"]["e2e"]["count"] > 0
    assert r["variants"][0]["breaker"]["state"] == "closed"
    ro = r["rollout"]
    assert ro["state"] == "running" and ro["stage_index"] == 1 and ro["stage_age_s"] == 0.0
    assert ro["last_decision"]["action"] == "advance" and ro["last_test"]["p_value"] is not None
    assert [e["action"] for e in report["recent_events"]] == ["start", "advance"]


def test_manual_commands_reset_stage_windows() -> None:
    rollout = {"canary": "b", "auto_start": False}
    router, _ = make(chat({"a": 100, "b": 0}, rollout=rollout))
    assert router.tick() == []
    assert router.weights("chat") == {"a": 100.0, "b": 0.0}
    router.start("chat")
    router.record("chat", "a", Outcome(e2e_s=1.0))
    router.set_stage("chat", 3)
    assert router.weights("chat") == {"a": 50.0, "b": 50.0}
    variants = router.report()["routes"]["chat"]["variants"]
    assert variants[0]["stats"]["stage"]["requests"] == 0 and variants[0]["stats"]["total"]["requests"] == 1
    router.pause("chat")
    router.resume("chat")
    router.promote("chat", reason="looks good")
    assert router.weights("chat") == {"a": 0.0, "b": 100.0}
    assert [(e["action"], e["reason"]) for e in router.drain_events()][-1] == ("promote", "looks good")


def test_open_canary_circuit_rolls_back() -> None:
    router, _ = make(chat({"a": 100, "b": 0}, rollout={"canary": "b"}))
    router.tick()
    for _ in range(3):
        router.record("chat", "b", FAIL)
    [event] = router.tick()
    assert event["action"] == "rollback" and event["reason"] == "canary circuit breaker opened"


def test_reconfigure_keeps_stats_breakers_and_rollout() -> None:
    rollout = {"canary": "b", "stages": [5, 50], "min_requests_per_stage": 1000}
    router, clock = make(chat({"a": 95, "b": 5, "c": 0}, rollout=rollout))
    router.tick()
    for _ in range(4):
        router.record("chat", "a", Outcome(e2e_s=1.0))
    for _ in range(3):
        router.record("chat", "c", FAIL)  # opens c
    router.set_stage("chat", 1)

    router.reconfigure({"routes": [chat({"a": 90, "b": 5, "d": 10},
                                        rollout={**rollout, "min_requests_per_stage": 10})]})
    r = router.report()["routes"]["chat"]
    by_name = {v["name"]: v for v in r["variants"]}
    assert set(by_name) == {"a", "b", "d"}  # c removed, d added
    assert by_name["a"]["stats"]["total"]["requests"] == 4  # kept
    assert by_name["d"]["stats"]["total"]["requests"] == 0
    assert r["rollout"]["state"] == "running" and r["rollout"]["stage_index"] == 1  # not restarted
    assert router.weights("chat") == pytest.approx({"a": 45.0, "b": 50.0, "d": 5.0})  # new configured split of the rest

    # re-adding a variant of the same name and deployment after it was removed starts fresh,
    # but one that stayed keeps its breaker state across pushes
    for _ in range(3):
        router.record("chat", "d", FAIL)
    router.reconfigure([RouteConfig.model_validate(chat({"a": 90, "b": 5, "d": 20}, rollout=rollout))])
    d = next(v for v in router.report()["routes"]["chat"]["variants"] if v["name"] == "d")
    assert d["breaker"]["state"] == "open" and d["configured_weight"] == 20

    # a new canary deployment is a new variant: its rollout starts over
    new_canary = chat({"a": 95, "d": 0}, rollout=rollout)
    new_canary["variants"].insert(1, {"name": "b", "deployment": "b-rc2", "weight": 0})
    router.reconfigure({"routes": [new_canary]})
    assert router.report()["routes"]["chat"]["rollout"]["state"] == "pending"


def test_invalid_reconfigure_leaves_state_untouched() -> None:
    router, _ = make(chat({"a": 1}))
    router.record("chat", "a", Outcome(e2e_s=1.0))
    with pytest.raises(ValidationError, match="variant names must be unique"):
        router.reconfigure({"routes": [chat({"a": 1}) | {"variants": [{"name": "a"}, {"name": "a"}]}]})
    assert router.routes == ["chat"]
    assert router.report()["routes"]["chat"]["variants"][0]["stats"]["total"]["requests"] == 1


def test_table_lets_a_caller_make_the_same_unforced_decisions() -> None:
    from deployments.routing import assign

    router, clock = make(chat({"a": 70, "b": 30}))
    t = router.table()["chat"]
    assert (t["sticky"], t["weights"], t["closed"], t["probing"]) == (True, {"a": 70, "b": 30}, ["a", "b"], [])
    assert t["deployments"] == {"a": "a", "b": "b"} and t["retry_after_s"] is None
    for key in KEYS[:300]:
        assert assign(t["weights"], t["closed"], key, salt="chat").variant == router.choose("chat", key=key).variant
    for _ in range(3):  # failure_threshold
        router.record("chat", "b", FAIL)
    t = router.table()["chat"]
    assert t["closed"] == ["a"] and t["probing"] == [] and t["retry_after_s"] == 30
    for key in KEYS[:300]:
        assert assign(t["weights"], t["closed"], key, salt="chat").variant == router.choose("chat", key=key).variant == "a"
    clock.t += 30
    assert router.table()["chat"]["probing"] == ["b"]  # half-open: probes are the router's to ration
    json.dumps(router.table())
