"""The router's events and metrics after real traffic through canary routes (docs/observability.md).

One small application: a healthy rollout (``grow``: start, advance, promote) and a failing canary
(``drill``: its circuit opens, which rolls the rollout back). Then the Ray workers' log files must
hold each documented JSON event with its documented fields, and Ray's metrics endpoint must count
the assignments by route and variant, the router events, and show the rollout state.
"""

from __future__ import annotations

import collections
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ray_log_lines, wait_app_ready
from ray import serve
from test_observability import _sample_sum, _scrape_ray

from deployments.http.auth import hash_key

APP = "router-events"
PREFIX = "/router-events"
ADMIN = "sk-router-events-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

ROUTES = [
    # a healthy canary (the same model behind another name) that walks 50% -> 100% -> promoted
    {"name": "grow", "sticky": False,
     "variants": [{"name": "stable", "weight": 1}, {"name": "next", "deployment": "stable", "weight": 1}],
     "rollout": {"canary": "next", "stages": [50, 100], "min_requests_per_stage": 2, "min_seconds_per_stage": 0,
                 "latency": None}},
    # a canary that fails every request: two failures open its circuit, which rolls the rollout back
    # (its stage would need 1000 requests, so the error-rate guard never gets there first)
    {"name": "drill", "sticky": False,
     "variants": [{"name": "stable", "weight": 1}, {"name": "bad", "deployment": "broken", "weight": 1}],
     "circuit_breaker": {"failure_threshold": 2, "cooldown_s": 3600},
     "rollout": {"canary": "bad", "stages": [50], "min_requests_per_stage": 1000, "min_seconds_per_stage": 0,
                 "latency": None}},
]
EVIDENCE = ("metric", "statistic", "df", "p_value", "effect", "canary_error_rate", "baseline_error_rate")


class _Recorded:
    def __init__(self, calls: list[tuple[str, str, float, tuple]], name: str) -> None:
        self.calls, self.name = calls, name

    def inc(self, value: float, key: tuple) -> None:
        self.calls.append(("inc", self.name, value, key))

    def set(self, value: float, key: tuple) -> None:
        self.calls.append(("set", self.name, value, key))


class _Recorder:
    """A metrics backend that records every call (RouterMetrics without Ray)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, tuple]] = []

    def make(self, spec: Any) -> _Recorded:
        return _Recorded(self.calls, spec.name)


def test_router_metrics_count_log_and_republish_only_live_rollouts() -> None:
    from deployments.metrics import RouterMetrics
    from engine import logs

    rec = _Recorder()
    m = RouterMetrics(backend=rec)
    m.routed("chat", "canary", "ok")
    assert rec.calls == [("inc", "route_assignments", 1, ("chat", "canary")),
                         ("inc", "routed_requests", 1, ("chat", "canary", "ok"))]
    stream = io.StringIO()
    logs.configure(stream=stream, fmt="json", force=True)
    try:
        label = m.event({"kind": "rollout", "route": "chat", "at": 12.5, "action": "advance", "state": "running",
                         "stage_index": 1, "canary_percent": 25.0, "reason": "guards passed", "p_value": 0.5})
        assert m.event({"kind": "breaker", "route": "ab", "at": 13.0, "name": "canary", "from_state": "closed",
                        "to_state": "open", "reason": "5 consecutive failures"}) == "closed->open"
    finally:
        logs.configure(force=True)
    assert label == "advance"
    decision, breaker = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert {k: decision[k] for k in ("event", "route", "action", "state", "stage_index", "canary_percent", "p_value")} \
        == {"event": "rollout_decision", "route": "chat", "action": "advance", "state": "running", "stage_index": 1,
            "canary_percent": 25.0, "p_value": 0.5}
    assert {k: breaker[k] for k in ("event", "level", "route", "variant", "from_state", "to_state")} == \
        {"event": "breaker_transition", "level": "WARNING", "route": "ab", "variant": "canary", "from_state": "closed",
         "to_state": "open"}
    assert not {"kind", "at", "name"} & (set(decision) | set(breaker))
    events = [c for c in rec.calls if c[1] == "router_events"]
    assert events == [("inc", "router_events", 1, ("chat", "rollout", "advance")),
                      ("inc", "router_events", 1, ("ab", "breaker", "closed->open"))]
    gauges = {(c[1], c[3]): c[2] for c in rec.calls if c[0] == "set"}
    assert gauges[("rollout_canary_percent", ("chat",))] == 25.0
    assert gauges[("rollout_state", ("chat", "running"))] == 1.0 and gauges[("rollout_state", ("chat", "pending"))] == 0
    m.rollout("durable", "rolled_back", 0.0)
    rec.calls.clear()
    m.republish()  # Ray forgets gauges left alone: every live one is set again
    assert {c[3][0] for c in rec.calls} == {"chat", "durable"} and len(rec.calls) == 2 * 6
    m.keep_only({"durable"})  # chat lost its rollout (or the route is gone)
    rec.calls.clear()
    m.republish()
    assert {c[3][0] for c in rec.calls} == {"durable"} and len(rec.calls) == 6


@pytest.fixture(scope="module")
def base(serve_port: int, tiny_model_dir: Path) -> Any:
    from deployments.app import build_app

    tiny = str(tiny_model_dir)
    args = {"models": [{"name": "stable", "source": tiny, "num_cpus": 0},
                       {"name": "broken", "source": tiny, "num_cpus": 0, "fault": {"error_probability": 1.0}}],
            "routes": ROUTES, "auth": {"admin_keys": [hash_key(ADMIN)]}}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    wait_app_ready(url)
    yield url
    serve.delete(APP)


def rollout_state(base: str, route: str) -> str:
    r = httpx.get(base + "/admin/rollouts", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["routes"][route]["rollout"]["state"]


def drive(base: str, route: str, until: str, timeout_s: float = 120) -> collections.Counter:
    """Requests to ``route`` until its rollout reaches ``until``; (variant, status) counts."""
    seen: collections.Counter = collections.Counter()
    deadline = time.monotonic() + timeout_s
    while rollout_state(base, route) != until:
        assert time.monotonic() < deadline, (route, seen)
        r = httpx.post(base + "/v1/completions", json={"model": route, "prompt": "hi", "max_tokens": 2}, timeout=60)
        seen[(r.headers.get("x-mlx-variant"), r.status_code)] += 1
    return seen


def events(needle: str, route: str) -> list[dict[str, Any]]:
    return [x for x in ray_log_lines(needle) if x.get("route") == route and x.get("app") == APP]


def wait_for(fn: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := fn()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


def test_router_events_and_assignment_metrics_after_traffic(base: str) -> None:
    grow = drive(base, "grow", "promoted")
    drill = drive(base, "drill", "rolled_back")
    # at the 50% stage a request goes either way (a few may all go to `next`): only the split is random
    assert grow[("next", 200)] >= 4 and set(grow) <= {("next", 200), ("stable", 200)}, grow
    assert drill[("bad", 503)] >= 2, drill

    # rollout decisions: one JSON line each, from the router's process, with the documented fields
    decisions = wait_for(lambda: [e for e in events('"event":"rollout_decision"', "grow")
                                  if e.get("action") == "promote"] and events('"event":"rollout_decision"', "grow"))
    assert [e["action"] for e in decisions] == ["start", "advance", "promote"], decisions
    assert [(e["state"], e["stage_index"], e["canary_percent"]) for e in decisions] == \
        [("running", 0, 50.0), ("running", 1, 100.0), ("promoted", 1, 100.0)]
    for e in decisions:
        assert e["level"] == "INFO" and e["logger"] == "mlx_serving.events" and e["msg"] == "rollout_decision"
        assert e["component"] == "router" and e["deployment"] == "router" and e["reason"]
        assert set(EVIDENCE) <= set(e) and "kind" not in e and "at" not in e, e
    assert decisions[1]["canary_error_rate"] == 0 and decisions[1]["baseline_error_rate"] == 0

    # the breaker opens on the failing canary; the rollout is rolled back because of it
    opened = wait_for(lambda: events('"event":"breaker_transition"', "drill"))
    assert [(e["variant"], e["from_state"], e["to_state"], e["level"]) for e in opened] == \
        [("bad", "closed", "open", "WARNING")], opened
    assert "consecutive failures" in opened[0]["reason"] and opened[0]["component"] == "router"
    rolled = wait_for(lambda: events('"event":"rollback"', "drill"))
    assert [(e["action"], e["state"], e["canary_percent"], e["level"]) for e in rolled] == \
        [("rollback", "rolled_back", 0.0, "WARNING")], rolled
    assert rolled[0]["reason"] == "canary circuit breaker opened" and set(EVIDENCE) <= set(rolled[0])
    assert [e["action"] for e in events('"event":"rollout_decision"', "drill")] == ["start"]
    # an event is about a route: no request id of whichever Serve call (a batch of outcomes) drained it
    assert not [e for e in (*decisions, *opened, *rolled) if "request_id" in e]

    # metrics, through Ray's metrics agent (exported every 10 s: wait for an export after the traffic)
    expected = {
        "grow/stable": grow[("stable", 200)], "grow/next": grow[("next", 200)],
        "drill/bad": sum(n for (v, _), n in drill.items() if v == "bad"),  # every routed request, once
        "opened": 1, "promoted": 1, "rolled_back": 1, "canary_percent": 100,
        **{f"grow:{a}": 1 for a in ("start", "advance", "promote")},
    }

    def scraped() -> dict[str, float]:
        text = _scrape_ray()

        def get(name: str, **labels: str) -> float:
            return _sample_sum(text, f"ray_mlx_serving_{name}", application=APP, **labels)

        return {
            "grow/stable": get("route_assignments_total", route="grow", variant="stable"),
            "grow/next": get("route_assignments_total", route="grow", variant="next"),
            "drill/bad": get("route_assignments_total", route="drill", variant="bad"),
            "opened": get("router_events_total", route="drill", kind="breaker", event="closed->open"),
            "promoted": get("rollout_state", route="grow", state="promoted"),
            "rolled_back": get("rollout_state", route="drill", state="rolled_back"),
            "canary_percent": get("rollout_canary_percent", route="grow"),
            **{f"grow:{a}": get("router_events_total", route="grow", kind="rollout", event=a)
               for a in ("start", "advance", "promote")},
        }

    got = wait_for(lambda: (g := scraped()) == expected and g, timeout_s=60) or scraped()
    assert got == expected
