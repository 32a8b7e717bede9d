"""The router deployment in a real Serve app: local picks agree with the router, sticky A/B through
HTTP, forced variants, a live weight change through a declarative deploy (what `serve deploy` and
`mlx-serving up` do), automatic rollback of a failing canary, a circuit breaker taking a failing
variant out of rotation, and a rolled-back canary staying rolled back after the router replica is
killed and restarted by Serve.

One application serves every test; its models are three tiny replicas: ``stable``, ``canary`` and
``broken`` (every request fails through the replica's fault injection).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from conftest import wait_app_ready
from deployments.http.auth import hash_key
from deployments.routing import assign

APP = "router-test"
PREFIX = "/router-test"
ADMIN = "sk-router-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CHI2_1DOF_P001 = 10.83  # chi-square critical value, 1 degree of freedom, p = 0.001


def routes(live: dict[str, float]) -> list[dict[str, Any]]:
    return [
        {"name": "ab", "variants": [{"name": "stable", "weight": 50}, {"name": "canary", "weight": 50}]},
        {"name": "live", "sticky": False,
         "variants": [{"name": "stable", "weight": live["stable"]}, {"name": "canary", "weight": live["canary"]}]},
        {"name": "risky", "sticky": False,
         "variants": [{"name": "stable", "weight": 1}, {"name": "broken", "weight": 1}],
         "circuit_breaker": {"enabled": False},
         "rollout": {"canary": "broken", "stages": [50, 100], "min_requests_per_stage": 4,
                     "min_seconds_per_stage": 0, "max_error_rate_increase": 0.1, "latency": None}},
        {"name": "guarded", "sticky": False,
         "variants": [{"name": "stable", "weight": 50}, {"name": "flaky", "deployment": "broken", "weight": 50}],
         "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 3600}},
        # a healthy canary that never gets far on its own (1000 requests a stage): rolled back by hand
        # before the router is killed, it must stay rolled back after the restart
        {"name": "durable", "sticky": False,
         "variants": [{"name": "stable", "weight": 100}, {"name": "canary", "weight": 0}],
         "rollout": {"canary": "canary", "stages": [50, 100], "min_requests_per_stage": 1000,
                     "min_seconds_per_stage": 0, "latency": None}},
    ]


def serve_config(tiny: str, live: dict[str, float]) -> dict[str, Any]:
    models = [
        {"name": "stable", "source": tiny, "num_cpus": 0},
        {"name": "canary", "source": tiny, "num_cpus": 0},
        {"name": "broken", "source": tiny, "num_cpus": 0, "fault": {"error_probability": 1.0}},
    ]
    return {"applications": [{
        "name": APP, "route_prefix": PREFIX, "import_path": "deployments.app:build_app",
        "args": {"models": models, "routes": routes(live), "auth": {"admin_keys": [hash_key(ADMIN)]}},
    }]}


def deploy(config: dict[str, Any]) -> None:
    """What `mlx-serving up` / `serve deploy` do: the config (routes moved to the router's
    user_config) applied declaratively by the Serve controller."""
    from ray.serve._private.api import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve_config import for_deploy, problems

    assert problems(config) == []
    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(for_deploy(config)))


def wait_running(timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING":
            return
        if app is not None and "FAILED" in str(app.status):
            raise AssertionError(f"deploy failed: {app.message}")
        time.sleep(0.5)
    raise AssertionError(f"{APP} not running after {timeout_s}s: {serve.status().applications.get(APP)}")


@pytest.fixture(scope="module")
def base(serve_port: int, tiny_model_dir: Path) -> Any:
    deploy(serve_config(str(tiny_model_dir), {"stable": 100, "canary": 0}))
    wait_running()
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    wait_app_ready(url)
    yield url
    serve.delete(APP)


def router() -> Any:
    return serve.get_deployment_handle("router", app_name=APP)


def pid_of(deployment: str) -> int:
    info = serve.get_deployment_handle(deployment, app_name=APP).info.remote().result()
    return info["pid"] if isinstance(info, dict) else info.pid


def report(base: str) -> dict[str, Any]:
    r = httpx.get(base + "/admin/rollouts", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ask(base: str, model: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"model": model, "prompt": "hello", "max_tokens": 2, **body}
    return httpx.post(base + "/v1/completions", json=payload, headers=headers or {}, timeout=120)


def wait_synced(base: str, condition: Any = lambda rep: True, timeout_s: float = 60) -> dict[str, Any]:
    """The router's report once ``condition`` holds and the ingress routes from the same table."""
    deadline = time.monotonic() + timeout_s
    while True:
        rep = report(base)
        if condition(rep) and rep["ingress"]["table_version"] == rep["table_version"]:
            return rep
        assert time.monotonic() < deadline, f"not synced: {json.dumps(rep)[:2000]}"
        time.sleep(0.2)


def variant_of(rep: dict[str, Any], route: str, name: str) -> dict[str, Any]:
    return next(v for v in rep["routes"][route]["variants"] if v["name"] == name)


def test_config_routes_are_validated_with_paths_and_moved_to_user_config() -> None:
    from cluster.serve_config import REPO_CONFIG_DIR, for_deploy, load, problems

    assert problems(load(REPO_CONFIG_DIR / "canary.yaml")) == []
    config = serve_config("demo:tiny", {"stable": 1, "canary": 1})
    deployable = for_deploy(config)
    app = deployable["applications"][0]
    assert "routes" not in app["args"] and app["args"]["router"] is True
    router_entry = [d for d in app["deployments"] if d["name"] == "router"]
    assert router_entry == [{"name": "router", "user_config": {"routes": routes({"stable": 1, "canary": 1})}}]
    assert problems(deployable) == [] and config["applications"][0]["args"]["routes"]  # the input is untouched
    # the deployable form keeps the same args when only weights change: Serve sees a user_config-only update
    other = for_deploy(serve_config("demo:tiny", {"stable": 0, "canary": 5}))
    assert other["applications"][0]["args"] == app["args"]

    bad = serve_config("demo:tiny", {"stable": -1, "canary": 0})
    bad_routes = bad["applications"][0]["args"]["routes"]
    bad_routes[0]["variants"][1]["deployment"] = "missing"
    bad_routes.append({"name": "broken", "variants": [{"name": "x", "deployment": "stable"}]})  # hides a model
    found = problems(bad)
    assert "applications[0].args.routes[1].variants[0].weight: Input should be greater than or equal to 0" in found
    assert any(p.startswith("applications[0].args.routes[0].variants[1].deployment: route 'ab': variant 'canary' "
                            "sends to 'missing'") for p in found), found
    assert any(p.startswith(f"applications[0].args.routes[{len(bad_routes) - 1}].name: route 'broken' has the name "
                            "of a model") for p in found), found
    uc = for_deploy(serve_config("demo:tiny", {"stable": 0, "canary": 0}))  # no positive weight
    assert any(p.startswith("applications[0].deployments[0].user_config.routes[1]") and "positive weight" in p
               for p in problems(uc)), problems(uc)


def test_router_choose_splits_by_weight_and_ingress_picks_agree(base: str) -> None:
    h = router()

    async def many(n: int) -> list[dict[str, Any]]:
        return await asyncio.gather(*[h.choose.remote("ab") for _ in range(n)])

    n = 600
    counts = collections.Counter(d["variant"] for d in asyncio.run(many(n)))
    assert set(counts) == {"stable", "canary"}
    chi2 = sum((counts[v] - n / 2) ** 2 / (n / 2) for v in ("stable", "canary"))
    assert chi2 < CHI2_1DOF_P001, counts
    # The ingress decides from the router's table with the same code: sticky keys land where the router says.
    _, table = h.watch.remote(None).result()
    entry = table["ab"]
    for i in range(200):
        key = f"user-{i}"
        local = assign(entry["weights"], entry["closed"], key, salt="ab").variant
        assert local == h.choose.remote("ab", key).result()["variant"], key


def test_variant_header_stickiness_and_forcing(base: str) -> None:
    direct = ask(base, "stable")
    assert direct.status_code == 200 and direct.headers["x-mlx-variant"] == "stable"
    h = router()
    seen = set()
    for i in range(8):
        sid = f"session-{i}"
        expected = h.choose.remote("ab", sid).result()["variant"]
        rs = [ask(base, "ab", {"x-session-id": sid}) for _ in range(3)]
        assert [r.status_code for r in rs] == [200] * 3, rs[0].text
        assert {r.headers["x-mlx-variant"] for r in rs} == {expected}, sid
        assert rs[0].json()["model"] == "ab"  # the client sees the name it asked for
        seen.add(expected)
        by_user = ask(base, "ab", user=sid)  # the OpenAI `user` field is the key when no header is sent
        assert by_user.status_code == 200 and by_user.headers["x-mlx-variant"] == expected
    assert seen == {"stable", "canary"}
    # streaming responses carry the header too
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=60, headers={"x-session-id": "session-0"},
                      json={"model": "ab", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-mlx-variant"] == h.choose.remote("ab", "session-0").result()["variant"]
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    # routes are models to clients
    assert {"ab", "live", "stable"} <= {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}
    # forcing needs an admin key: 401 without a key, 401 with a wrong one, then the forced variant
    force = {"x-mlx-force-variant": "canary", "x-session-id": "session-0"}
    r = ask(base, "live", force)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert ask(base, "live", {**force, "Authorization": "Bearer nope"}).status_code == 401
    for _ in range(3):  # `live` sends everything to stable; forcing overrides the weights
        r = ask(base, "live", {**force, **AUTH})
        assert r.status_code == 200 and r.headers["x-mlx-variant"] == "canary"
    r = ask(base, "live", {"x-mlx-force-variant": "nope", **AUTH})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_variant"
    # the admin API too: 401 without a key, and an OpenAI error object for an unknown route
    assert httpx.get(base + "/admin/rollouts").status_code == 401
    r = httpx.post(base + "/admin/rollouts/nope/promote", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(base + "/admin/rollouts/ab/promote", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_rollout"


def test_live_weight_change_keeps_replicas_and_streams(base: str, tiny_model_dir: Path) -> None:
    pids = {d: pid_of(d) for d in ("model-stable", "model-canary", "router")}
    ab_before = variant_of(report(base), "ab", "stable")["stats"]["total"]["requests"]
    no_eos = {str(httpx.post(base + "/tokenize", json={"model": "stable", "prompt": "<|im_end|>"}).json()["tokens"][0]): -100}
    body = {"model": "live", "prompt": "a long story", "max_tokens": 200, "logit_bias": no_eos, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as stream:
        assert stream.status_code == 200 and stream.headers["x-mlx-variant"] == "stable"
        lines = stream.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        deploy(serve_config(str(tiny_model_dir), {"stable": 0, "canary": 100}))  # only the weights differ
        wait_synced(base, lambda rep: {v["name"]: v["weight"] for v in rep["routes"]["live"]["variants"]}
                    == {"stable": 0, "canary": 100})
        rest = [line for line in lines if line]
    events = [json.loads(x[len("data: "):]) for x in [first, *rest] if x != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]"
    assert not any("error" in e for e in events), events[-3:]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1
    wait_running()
    assert {d: pid_of(d) for d in pids} == pids, "a weight change must not restart any replica or the router"
    rep = report(base)
    assert variant_of(rep, "ab", "stable")["stats"]["total"]["requests"] >= ab_before  # the router kept its stats
    rs = [ask(base, "live") for _ in range(12)]
    assert {(r.status_code, r.headers["x-mlx-variant"]) for r in rs} == {(200, "canary")}


def test_failing_canary_is_rolled_back(base: str) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"model": "risky", "prompt": "hi", "max_tokens": 2})
                                        for _ in range(4)])
            return [r.status_code for r in rs]

    deadline = time.monotonic() + 180
    statuses: collections.Counter = collections.Counter()
    while report(base)["routes"]["risky"]["rollout"]["state"] != "rolled_back":
        assert time.monotonic() < deadline, report(base)["routes"]["risky"]
        statuses.update(asyncio.run(burst()))
        time.sleep(0.2)
    assert set(statuses) <= {200, 503} and statuses[503] > 0, statuses  # the canary failed, never a 500
    rep = wait_synced(base, lambda r: r["routes"]["risky"]["rollout"]["state"] == "rolled_back")
    rollout = rep["routes"]["risky"]["rollout"]
    assert rollout["canary_percent"] == 0
    rollback = [d for d in rollout["history"] if d["action"] == "rollback"][-1]
    assert "error rate" in rollback["reason"] and rollback["canary_error_rate"] > rollback["baseline_error_rate"]
    assert variant_of(rep, "risky", "broken")["stats"]["total"]["errors_by_code"]["injected_fault"] >= 4
    assert variant_of(rep, "risky", "broken")["weight"] == 0
    assert any(e["route"] == "risky" and e.get("action") == "rollback" for e in rep["recent_events"])
    assert rep["events_total"].get("rollout:rollback", 0) >= 1
    for _ in range(8):
        r = ask(base, "risky")
        assert r.status_code == 200 and r.headers["x-mlx-variant"] == "stable"
    # by hand: restart the rollout at its first stage, then roll it back again
    r = httpx.post(base + "/admin/rollouts/risky/stage", json={"stage": 0, "reason": "retry"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "running" and r.json()["canary_percent"] == 50
    r = httpx.post(base + "/admin/rollouts/risky/pause", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "paused"
    r = httpx.post(base + "/admin/rollouts/risky/pause", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_transition"
    r = httpx.post(base + "/admin/rollouts/risky/rollback", json={"reason": "by hand"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "rolled_back" and r.json()["reason"] == "by hand"


def test_circuit_breaker_moves_traffic_off_a_failing_variant(base: str) -> None:
    def flaky_state(rep: dict[str, Any]) -> str:
        return variant_of(rep, "guarded", "flaky")["breaker"]["state"]

    deadline = time.monotonic() + 120
    codes: collections.Counter = collections.Counter()
    while flaky_state(report(base)) != "open":
        assert time.monotonic() < deadline, report(base)["routes"]["guarded"]
        r = ask(base, "guarded")
        codes[(r.headers.get("x-mlx-variant"), r.status_code)] += 1
    assert codes[("flaky", 503)] >= 3 and set(codes) <= {("flaky", 503), ("stable", 200)}, codes
    rep = wait_synced(base, lambda r: flaky_state(r) == "open")
    assert variant_of(rep, "guarded", "flaky")["available"] is False
    assert rep["events_total"].get("breaker:closed->open", 0) >= 1
    for _ in range(10):  # its share goes to the other variant
        r = ask(base, "guarded")
        assert r.status_code == 200 and r.headers["x-mlx-variant"] == "stable"


def router_replica_actor() -> tuple[str, str]:
    """(name, namespace) of the router's replica actor (Serve names it ``SERVE_REPLICA::app#router#id``)."""
    import ray

    found = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#router#")]
    assert len(found) == 1, found
    return found[0]


def test_rolled_back_canary_stays_rolled_back_after_the_router_restarts(base: str) -> None:
    import ray

    r = httpx.post(base + "/admin/rollouts/durable/rollback", json={"reason": "rolled back before the restart"},
                   headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "rolled_back", r.text
    before = wait_synced(base, lambda rep: rep["routes"]["durable"]["rollout"]["state"] == "rolled_back")
    open_before = {(route, v["name"]) for route, rr in before["routes"].items() for v in rr["variants"]
                   if v["breaker"]["state"] == "open"}  # e.g. `guarded`'s flaky variant, cooling down for an hour
    old_pid = before["router"]["pid"]

    name, namespace = router_replica_actor()
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)

    deadline = time.monotonic() + 240
    while True:  # Serve notices the dead replica at a health check and starts another
        assert time.monotonic() < deadline, "the router replica was not restarted"
        try:
            info = router().info.remote().result(timeout_s=10)
            if info["pid"] != old_pid:
                break
        except Exception:  # noqa: BLE001 - dead or not yet replaced
            pass
        time.sleep(1.0)
    assert router_replica_actor()[0] != name

    deadline = time.monotonic() + 120
    while True:  # the ingress reaches the new replica and takes its table (a new epoch)
        got = httpx.get(base + "/admin/rollouts", headers=AUTH, timeout=30)
        rep = got.json() if got.status_code == 200 else {}
        if rep and rep["table_version"] != before["table_version"] \
                and rep["ingress"]["table_version"] == rep["table_version"]:
            break
        assert time.monotonic() < deadline, got.text[:2000]
        time.sleep(0.5)
    assert rep["router"]["pid"] == info["pid"] != old_pid
    rollout = rep["routes"]["durable"]["rollout"]
    assert rollout["state"] == "rolled_back" and rollout["canary_percent"] == 0, rollout
    assert rollout["history"][-1]["action"] == "rollback"
    assert rollout["history"][-1]["reason"] == "rolled back before the restart"
    assert variant_of(rep, "durable", "canary")["weight"] == 0
    assert variant_of(rep, "durable", "canary")["stats"]["total"]["requests"] == 0  # statistics are not kept
    open_after = {(route, v["name"]) for route, rr in rep["routes"].items() for v in rr["variants"]
                  if v["breaker"]["state"] == "open"}
    assert open_before <= open_after, (open_before, open_after)
    time.sleep(2 * 0.5)  # two router ticks: an auto start would have happened by now
    assert report(base)["routes"]["durable"]["rollout"]["state"] == "rolled_back"
    rs = [ask(base, "durable") for _ in range(20)]
    assert [(r.status_code, r.headers.get("x-mlx-variant")) for r in rs] == [(200, "stable")] * 20

    # an admin restarts the rollout; it is saved like any other change
    r = httpx.post(base + "/admin/rollouts/durable/stage", json={"stage": 0}, headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "running" and r.json()["canary_percent"] == 50, r.text
    wait_synced(base, lambda rep: variant_of(rep, "durable", "canary")["weight"] == 50)
    seen = collections.Counter(ask(base, "durable").headers.get("x-mlx-variant") for _ in range(20))
    assert set(seen) == {"stable", "canary"}, seen
