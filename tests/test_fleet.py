"""The fleet path: plan -> pinned Serve config, bring-up commands, simulated hosts, host loss.

The Ray tests add two labelled nodes (sim-2, sim-3) to the session cluster, whose head is sim-1,
deploy a config made from a fleet inventory, and take sim-2 away and back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster import exposure, nodes, pins
from cluster.cli import main
from cluster.inventory import load_fleet, parse_fleet
from cluster.placement import plan
from deployments.app import build_app
from deployments.config import AppConfig, ModelDeploymentConfig
from conftest import add_host

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "fleet.example.yaml"
MLX_SERVING = Path(sys.executable).with_name("mlx-serving")


def host(name: str, gb: float = 8, **kw: Any) -> dict[str, Any]:
    return {"name": name, "address": "127.0.0.1", "chip": "simulated", "memory_gb": gb, "usable_fraction": 1.0, **kw}


def sim_inventory(source: str, **model_kw: Any) -> dict[str, Any]:
    deployment = {"num_cpus": 0, "engine": {"max_batch_size": 4}, **model_kw}
    return {
        "head": "sim-1",
        "default_kv_cache_gb": 0.25,
        "hosts": [host("sim-1"), host("sim-2"), host("sim-3")],
        "models": [
            {"name": "spread", "source": source, "replicas": 2, "hosts": ["sim-2", "sim-3"], "deployment": deployment},
            {"name": "solo", "source": source, "replicas": 1, "hosts": ["sim-2", "sim-3"], "deployment": deployment},
        ],
    }


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CLI calls in this process must see no cluster state of their own."""
    monkeypatch.setenv("MLX_SERVING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- config and plan -> pins (no Ray) ---------------------------------------------------------------

def test_deployment_config_turns_pins_into_ray_options() -> None:
    m = ModelDeploymentConfig(name="m", source="x", hosts=["a", "b"], fallback_hosts=["c"], memory_gb=1.5,
                              max_replicas_per_node=1, num_cpus=0)
    assert m.ray_actor_options() == {
        "num_cpus": 0, "label_selector": {"host": "in(a,b)"},
        "fallback_strategy": [{"label_selector": {"host": "c"}}], "memory": int(1.5 * 2**30),
    }
    assert ModelDeploymentConfig(name="m", source="x", hosts=["a"]).ray_actor_options()["label_selector"] == {"host": "a"}
    assert ModelDeploymentConfig(name="m", source="x", num_gpus=1).ray_actor_options() == {"num_cpus": 1.0, "num_gpus": 1}
    for bad, msg in [({"fallback_hosts": ["c"]}, "needs hosts"),
                     ({"hosts": ["a"], "fallback_hosts": ["a"]}, "both"),
                     ({"hosts": ["a", "a"]}, "repeated"),
                     ({"hosts": ["no spaces"]}, "label"),
                     ({"max_replicas_per_node": 0}, "greater than")]:
        with pytest.raises(ValueError, match=msg):
            ModelDeploymentConfig(name="m", source="x", **bad)


def test_ingress_spreads_one_per_node_when_asked() -> None:
    models = [{"name": "m", "source": "demo:tiny"}]
    ingress = build_app({"models": models, "ingress_replicas": 2, "ingress_max_replicas_per_node": 1})._bound_deployment
    assert (ingress.name, ingress._deployment_config.num_replicas) == ("ingress", 2)
    assert ingress._replica_config.max_replicas_per_node == 1
    assert build_app({"models": models})._bound_deployment._replica_config.max_replicas_per_node is None
    with pytest.raises(ValueError, match="greater than"):
        AppConfig.model_validate({"models": models, "ingress_max_replicas_per_node": 0})


def test_app_env_vars_reach_the_ingress_and_the_router() -> None:
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    app = build_app({"models": [{"name": "m", "source": "demo:tiny"}], "routes": [
        {"name": "r", "variants": [{"name": "v", "deployment": "m", "weight": 1}]}], "env_vars": env})._bound_deployment
    router = app._replica_config.init_args[2]._bound_deployment
    for d in (app, router):
        assert d._replica_config.ray_actor_options["runtime_env"] == {"env_vars": env}, d.name
        assert d._replica_config.ray_actor_options["num_cpus"] == 0
    plain = build_app({"models": [{"name": "m", "source": "demo:tiny"}]})._bound_deployment
    assert "runtime_env" not in plain._replica_config.ray_actor_options
    fleet = parse_fleet({"head": "a", "hosts": [host("a")], "app": {"env_vars": env},
                         "models": [{"name": "x", "source": "org/x", "footprint_gb": 1}]})
    assert [o["ray_actor_options"].get("runtime_env") for o in pins.control_plane_overrides(fleet)] == [{"env_vars": env}]


def test_plan_becomes_exact_pins_with_failover(tmp_path: Path) -> None:
    fleet = parse_fleet({
        "head": "big", "default_kv_cache_gb": 0,
        "hosts": [host("big", 64, labels={"tier": "large"}), host("m1", 16), host("m2", 16), host("m3", 16)],
        "models": [
            {"name": "chat", "source": "org/chat", "footprint_gb": 6, "replicas": 2, "hosts": ["m1", "m2", "m3"],
             "deployment": {"num_cpus": 0.5, "engine": {"max_batch_size": 8}}},
            {"name": "big", "source": "org/big", "footprint_gb": 40, "host_labels": {"tier": "large"}},
            {"name": "many", "source": "org/many", "footprint_gb": 5, "replicas": 3, "hosts": ["m1", "m3"]},
        ],
        "app": {"limits": {"default_max_tokens": 64}},
    })
    p = plan(fleet)
    config = pins.serve_config(fleet, p)
    from cluster import serve_config

    assert serve_config.problems(config) == []
    app = config["applications"][0]
    models = {m["name"]: m for m in app["args"]["models"]}
    chat = models["chat"]
    assert chat["hosts"] == sorted(set(p.hosts_for("chat")), key=p.hosts_for("chat").index) and len(chat["hosts"]) == 2
    assert chat["max_replicas_per_node"] == 1 and chat["num_replicas"] == 2
    assert chat["fallback_hosts"] == [h for h in ["m1", "m2", "m3"] if h not in chat["hosts"]]
    assert chat["memory_gb"] == 6.0 and chat["num_cpus"] == 0.5 and chat["engine"] == {"max_batch_size": 8}
    assert models["big"]["hosts"] == ["big"] and "fallback_hosts" not in models["big"]
    many = models["many"]  # 3 replicas on 2 hosts: at most 2 on one, never a third host
    assert sorted(many["hosts"]) == ["m1", "m3"] and many["max_replicas_per_node"] == 2 and "fallback_hosts" not in many
    assert app["args"]["limits"] == {"default_max_tokens": 64}
    assert app["deployments"] == [{"name": "ingress", "ray_actor_options": {"num_cpus": 0, "label_selector": {"host": "big"}}}]
    assert config["proxy_location"] == "HeadOnly"
    assert "fallback_hosts" not in pins.serve_config(fleet, p, failover=False)["applications"][0]["args"]["models"][0]
    with pytest.raises(ValueError, match="set from the plan"):
        parse_fleet({"head": "a", "hosts": [host("a")], "models": [
            {"name": "x", "source": "org/x", "footprint_gb": 1, "deployment": {"hosts": ["a"]}}]})


def test_impossible_plan_is_refused_with_exit_code_1(tmp_path: Path, isolated_cache: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inv = tmp_path / "fleet.yaml"
    inv.write_text(yaml.safe_dump({
        "head": "sim-1", "hosts": [host("sim-1", 8), host("sim-2", 8)],
        "models": [{"name": "huge", "source": "org/huge", "footprint_gb": 7.5, "replicas": 2, "kv_cache_gb": 1}],
    }))
    res = subprocess.run([str(MLX_SERVING), "plan", str(inv)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MLX_SERVING_CACHE": str(isolated_cache)})
    assert res.returncode == 1, res
    assert "model 'huge' needs 8.5 GB per replica" in res.stderr and "shortfall 0.5 GB" in res.stderr
    out = tmp_path / "serve.yaml"
    assert main(["plan", str(inv), "--emit-config", str(out)]) == 1 and not out.exists()
    assert main(["up", "--inventory", str(inv)]) == 1  # refused before any cluster is touched
    assert "model 'huge'" in capsys.readouterr().err


def test_emit_config_cli_writes_a_deployable_file(tmp_path: Path, isolated_cache: Path, tiny_model_dir: Path) -> None:
    inv = tmp_path / "fleet.yaml"
    inv.write_text(yaml.safe_dump(sim_inventory(str(tiny_model_dir))))
    out = tmp_path / "serve.yaml"
    assert main(["plan", str(inv), "--emit-config", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Ray Serve config made by `mlx-serving plan")
    assert main(["validate", str(out)]) == 0
    models = {m["name"]: m for m in yaml.safe_load(text)["applications"][0]["args"]["models"]}
    assert models["solo"]["hosts"] == ["sim-2"] and models["solo"]["fallback_hosts"] == ["sim-3"]
    assert models["spread"]["hosts"] == ["sim-2", "sim-3"] and "fallback_hosts" not in models["spread"]


# --- bring-up commands (no Ray) ---------------------------------------------------------------------

def test_serve_builds_a_one_model_config_that_pins_where_asked() -> None:
    from cluster import serve_config

    assert serve_config.model_name_of("mlx-community/Qwen3-4B-4bit") == "Qwen3-4B-4bit"
    assert serve_config.model_name_of("/models/llama/") == "llama"
    assert serve_config.model_name_of("demo:bench") == "demo"
    config = serve_config.one_model("mlx-community/Qwen3-4B-4bit", replicas=2, hosts=["studio-1", "studio-2"])
    assert serve_config.problems(config) == []
    (model,) = AppConfig.model_validate(config["applications"][0]["args"]).models
    assert (model.name, model.num_replicas, model.hosts) == ("Qwen3-4B-4bit", 2, ["studio-1", "studio-2"])
    assert model.ray_actor_options()["label_selector"] == {"host": "in(studio-1,studio-2)"}


def test_cluster_up_prints_the_exact_commands_for_every_mac(isolated_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "up", "--inventory", str(EXAMPLE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    head = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=token RAY_worker_niceness=0 ray start --head --port=6379 "
            "--dashboard-host=127.0.0.1 --dashboard-port=8265 --node-ip-address=10.0.0.10 "
            "--labels=host=mac-studio-1,tier=large --resources='{\"host:mac-studio-1\":1000}' "
            f"--memory={int((192 * 0.75 - 8) * 2**30)} --disable-usage-stats")
    assert head in out
    worker = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=token RAY_worker_niceness=0 ray start --address=10.0.0.10:6379 "
              "--labels=host=mac-mini-1,tier=small --resources='{\"host:mac-mini-1\":1000}' "
              f"--memory={48 * 2**30} --disable-usage-stats")
    assert worker in out and worker.replace("mac-mini-1", "mac-mini-2") in out
    assert "ssh mlx@mac-mini-1.local 'mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token' <" in out

    assert main(["cluster", "up", "--inventory", str(EXAMPLE), "--dry-run", "--ssh", "--remote-ray", "/opt/mlx/bin/ray"]) == 0
    out = capsys.readouterr().out
    assert "token authentication on" in out
    assert "ssh mlx@mac-mini-2.local 'mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token' <" in out
    line = next(x for x in out.splitlines() if x.startswith("ssh -o BatchMode=yes") and "mac-mini-2.local" in x)
    assert "nohup env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=token RAY_worker_niceness=0 /opt/mlx/bin/ray start" in line
    assert "--block > ~/.mlx-serving/ray-node.log 2>&1 < /dev/null & echo $!" in line
    # A fleet head is reachable from the LAN by design: no auth-less fleet, with the reason.
    assert main(["cluster", "up", "--inventory", str(EXAMPLE), "--dry-run", "--auth", "disabled"]) == 1
    err = capsys.readouterr().err
    assert "Ray's GCS listens on every network interface" in err and "run code on this machine" in err
    assert "always uses token auth" in err
    # Not the head (the example's 10.0.0.10 is not this machine): refused, nothing started.
    assert main(["cluster", "up", "--inventory", str(EXAMPLE)]) == 1
    assert "not the inventory's head 'mac-studio-1'" in capsys.readouterr().err
    assert not nodes.state_file().exists()


def test_nodes_run_their_workers_at_normal_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.replica import low_priority_note

    monkeypatch.delenv(nodes.NICENESS_ENV, raising=False)
    assert nodes.node_env("token")[nodes.NICENESS_ENV] == "0"
    monkeypatch.setenv(nodes.NICENESS_ENV, "5")  # the user's own choice is kept
    assert nodes.node_env("token", loopback=True)[nodes.NICENESS_ENV] == "5"
    assert low_priority_note(0) is None and low_priority_note(-2) is None
    assert "niceness 15" in (low_priority_note(15) or "") and "RAY_worker_niceness=0" in (low_priority_note(15) or "")


def test_simulated_hosts_use_loopback_only(isolated_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "up", "--simulate", "3", "--port", "6400", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    # Ray keeps a loopback node address only with its multi-node switch off; workers join through our module.
    assert all(x.startswith("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_worker_niceness=0 ")
               for x in lines)
    assert all("--node-ip-address=127.0.0.1" in x for x in lines)
    assert "ray start --head --port=6400" in lines[0]
    assert all(" -m cluster.nodes ray start --address=127.0.0.1:6400 " in x for x in lines[1:])
    client_port = int(lines[0].split("--ray-client-server-port=")[1].split()[0])
    assert 1024 <= client_port <= 65535  # Ray refuses 0
    assert not nodes.state_file().exists()


def test_launcher_yaml_is_valid_for_ray_up_and_labels_each_mac(tmp_path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    fleet = load_fleet(EXAMPLE)
    cfg = yaml.safe_load(nodes.launcher_yaml(fleet, port=6379, dashboard_port=8265, auth_mode="token"))
    prepared = prepare_config(cfg)  # what `ray up` does with the file before it validates it
    validate_config(prepared)
    assert prepared["provider"]["worker_ips"] == ["mac-mini-1.local", "mac-mini-2.local"]
    assert prepared["available_node_types"]["local.cluster.node"]["min_workers"] == 2
    assert "--labels=host=mac-studio-1,tier=large" in cfg["head_start_ray_commands"][1]
    # The one worker command picks the host's own labels by its address (stub tools, no ssh).
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, body in {"ray": 'echo "RAY $*"', "hostname": 'echo Mac-Mini-2', "ifconfig": "echo 'inet 127.0.0.1'",
                       "ip": "true"}.items():
        (stub / name).write_text(f"#!/bin/sh\n{body}\n")
        (stub / name).chmod(0o755)
    env = {"PATH": f"{stub}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.10"}
    res = subprocess.run(["bash", "-c", cfg["worker_start_ray_commands"][1]], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("RAY start --address=10.0.0.10:6379 --labels=host=mac-mini-2,tier=small")
    (stub / "hostname").write_text("#!/bin/sh\necho elsewhere\n")
    res = subprocess.run(["bash", "-c", cfg["worker_start_ray_commands"][1]], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "matches no worker address" in res.stderr


# --- simulated hosts through the CLI -------------------------------------------------------------------

def test_cluster_up_simulate_3_then_down_stops_exactly_those_nodes(ray_cluster: Any, tmp_path: Path) -> None:
    from conftest import free_port, kill_processes_naming

    cache = tmp_path / "cache"
    rt = Path(tempfile.mkdtemp(prefix="mlxs-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "MLX_SERVING_CACHE": str(cache), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()

    def cli(*args: str, timeout: float = 330) -> subprocess.CompletedProcess:
        return subprocess.run([str(MLX_SERVING), *args], capture_output=True, text=True, env=env, timeout=timeout)

    state: nodes.ClusterState | None = None
    try:  # the CLI's own wait (--timeout) ends well before the subprocess timeout: it cleans up itself
        up = cli("cluster", "up", "--simulate", "3", "--port", str(port), "--dashboard-port", str(dash),
                 "--temp-dir", str(rt), "--num-cpus", "1", "--timeout", "150")
        assert up.returncode == 0, up.stdout + up.stderr
        state = nodes.ClusterState.model_validate_json((cache / "cluster-state.json").read_text())
        assert [n.host for n in state.nodes] == ["sim-1", "sim-2", "sim-3"] and state.nodes[0].head
        assert state.auth_mode == "token" and (tmp_path / "token").stat().st_mode & 0o777 == 0o600
        assert state.address == f"127.0.0.1:{port}"  # loopback only: no simulated host uses the LAN address
        assert all(nodes.alive(n) for n in state.nodes)
        probe = ("import json, ray; from ray.core.generated import gcs_pb2; "
                 f"c = ray._raylet.GcsClient(address={state.address!r}); "
                 "print(json.dumps(sorted([dict(i.labels)['host'], i.node_manager_address] for i in "
                 "c.get_all_node_info(timeout=10).values() if i.state == gcs_pb2.GcsNodeInfo.ALIVE)))")
        seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                              env={**env, **state.client_env()}, cwd=REPO)
        assert json.loads(seen.stdout.strip().splitlines()[-1]) == [
            ["sim-1", "127.0.0.1"], ["sim-2", "127.0.0.1"], ["sim-3", "127.0.0.1"]], seen.stderr
        # Every node's workers keep this process's priority, where Ray adds 15 by default (nodes.NICENESS_ENV).
        niceness = ("import os, ray\n"
                    f"ray.init(address={state.address!r}, logging_level='ERROR')\n"
                    "@ray.remote(num_cpus=0)\n"
                    "def niceness():\n"
                    "    return os.getpriority(os.PRIO_PROCESS, 0)\n"
                    "print(ray.get([niceness.options(resources={f'host:sim-{i}': 1}).remote() for i in (1, 2, 3)]))")
        seen = subprocess.run([sys.executable, "-c", niceness], capture_output=True, text=True, timeout=120,
                              env={**env, **state.client_env()}, cwd=REPO)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert seen.stdout.strip().splitlines()[-1:] == [str([base] * 3)], seen.stdout + seen.stderr
        found = exposure.listeners(exposure.tree_pids(n.pid for n in state.nodes if n.pid))
        beyond, loopback = exposure.split(found)
        assert beyond == [] and any(x.port == port and "gcs_server" in x.process for x in loopback), found
        assert sum("raylet" in x.process for x in loopback) >= 3  # every node's, all on 127.0.0.1
        (tmp_path / "wrong").write_text("0" * 64)
        refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                                 env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")},
                                 cwd=REPO)
        assert refused.returncode != 0 and "sim-1" not in refused.stdout  # a wrong token: refused by the GCS
        again = cli("cluster", "up", "--simulate", "2", "--port", str(free_port()), "--dashboard-port", str(free_port()))
        assert again.returncode == 1 and "cluster down" in again.stderr

        lost = cli("cluster", "stop-host", "sim-3")
        assert lost.returncode == 0 and not nodes.alive(state.nodes[2])
        back = cli("cluster", "start-host", "sim-3")  # a worker restarts on loopback too
        assert back.returncode == 0 and "sim-3 is back" in back.stdout, back.stdout + back.stderr
        seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                              env={**env, **state.client_env()}, cwd=REPO)
        assert ["sim-3", "127.0.0.1"] in json.loads(seen.stdout.strip().splitlines()[-1]), seen.stderr
        state = nodes.ClusterState.model_validate_json((cache / "cluster-state.json").read_text())  # sim-3's new pid
        assert cli("cluster", "stop-host", "sim-3").returncode == 0 and not nodes.alive(state.nodes[2])
        assert cli("cluster", "stop-host", "sim-1").returncode == 1  # the head: refused

        down = cli("cluster", "down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        for n in state.nodes:
            assert n.pid is not None and not nodes._group_alive(n.pid), f"{n.host} still has processes"
        assert not (cache / "cluster-state.json").exists()
        import ray  # the session's own cluster, on the same machine, is untouched

        assert any(n["Alive"] and n["Labels"].get("host") == "sim-1" for n in ray.nodes())
    finally:  # whatever failed: no Ray process of this test outlives it
        for n in state.nodes if state is not None else []:
            nodes.stop_local(n, hard=True)
        kill_processes_naming(rt)
        shutil.rmtree(rt, ignore_errors=True)


# --- three simulated hosts in the session cluster -----------------------------------------------------

APP = "fleet"


def placements(app: str = APP) -> dict[str, list[tuple[str | None, str]]]:
    """deployment -> [(host, state)] from the Serve controller."""
    import ray
    from ray.serve.context import _get_global_client

    hosts = {n["NodeID"]: n["Labels"].get("host") for n in ray.nodes() if n["Alive"]}
    details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    out: dict[str, list[tuple[str | None, str]]] = {}
    for name, dep in details["applications"][app]["deployments"].items():
        out[name] = sorted(((hosts.get(r.get("node_id")), str(getattr(r["state"], "value", r["state"])))
                            for r in dep["replicas"]), key=str)  # a replica not yet placed has no host
    return out


def running_hosts(app: str = APP) -> dict[str, list[str | None]]:
    return {d: sorted(str(h) for h, s in reps if s == "RUNNING") for d, reps in placements(app).items()}


def ready(base: str) -> dict[str, Any]:
    r = httpx.get(base + "/ready", timeout=30)
    return {m["name"]: m for m in r.json()["models"]} | {"_status": r.status_code}


def wait_for(what: str, cond: Any, timeout: float = 150, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as e:  # noqa: BLE001 - the controller or HTTP is briefly unavailable
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def fleet(ray_cluster: Any, serve_port: int, tiny_model_dir: Path) -> Any:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    added = {name: add_host(ray_cluster, name) for name in ("sim-2", "sim-3")}
    inventory = parse_fleet(sim_inventory(str(tiny_model_dir)))
    p = plan(inventory, weight_bytes=pins.weight_bytes)
    config = pins.serve_config(inventory, p, app_name=APP, route_prefix="/" + APP)
    for key in ("proxy_location", "http_options"):  # the session's Serve instance has its own
        config.pop(key)
    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config))
    base = f"http://127.0.0.1:{serve_port}/{APP}"
    wait_for("the fleet app to be ready", lambda: ready(base)["_status"] == 200)
    yield {"cluster": ray_cluster, "nodes": added, "base": base, "plan": p}
    serve.delete(APP)
    for node in added.values():
        if node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node)


def test_replicas_run_only_on_their_planned_hosts(fleet: Any) -> None:
    from ray import serve

    p = fleet["plan"]
    assert p.hosts_for("solo") == ["sim-2"] and sorted(p.hosts_for("spread")) == ["sim-2", "sim-3"]
    where = wait_for("every replica running", lambda: (lambda h: h if len(h["model-spread"]) == 2 else None)(running_hosts()))
    assert where["model-spread"] == ["sim-2", "sim-3"]  # one per planned host, never both on one
    assert where["model-solo"] == ["sim-2"]
    assert where["ingress"] == ["sim-1"]  # the control plane stays on the head, beside the HTTP proxy
    info = serve.get_deployment_handle("model-solo", app_name=APP).info.remote().result()
    assert info.host == "sim-2" and info.model == "solo"


def test_host_loss_errors_streams_retries_requests_fails_over_and_recovers(fleet: Any) -> None:
    base, cluster = fleet["base"], fleet["cluster"]
    toks = httpx.post(base + "/tokenize", json={"model": "solo", "prompt": "<|im_end|>"}).json()["tokens"]
    no_eos = {str(toks[0]): -100.0}
    events: list[str] = []
    late: dict[str, Any] = {}
    t_lost = 0.0
    with httpx.Client(base_url=base, timeout=120) as h:
        body = {"model": "solo", "prompt": "a long story", "max_tokens": 3000, "logit_bias": no_eos, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as r:  # served on sim-2, the only replica of solo
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 2:
                    t_lost = time.monotonic()
                    cluster.remove_node(fleet["nodes"].pop("sim-2"))  # the Mac is gone

                    def not_started_yet() -> None:  # no replica of solo exists now: it waits for the failover
                        late["response"] = httpx.post(base + "/v1/completions", timeout=240,
                                                      json={"model": "solo", "prompt": "later", "max_tokens": 3})

                    late["thread"] = threading.Thread(target=not_started_yet)
                    late["thread"].start()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "replica_died"

    # The model with a replica left keeps answering: requests that hit the dead replica are retried.
    for i in range(6):
        r = httpx.post(base + "/v1/completions", json={"model": "spread", "prompt": f"still there {i}", "max_tokens": 3},
                       timeout=120)
        assert r.status_code == 200, r.text

    # solo is allowed on sim-3 (its fallback host): Serve restarts it there; spread has no spare host.
    # (Serve notices each dead replica on its own: wait for the placements, not the first sign.)
    def failed_over() -> dict[str, list[str]] | None:
        where = running_hosts()
        return where if where["model-solo"] == ["sim-3"] and where["model-spread"] == ["sim-3"] else None

    wait_for("solo restarted on sim-3", failed_over)
    state = wait_for("/ready: solo ready, spread degraded", lambda: (lambda s: s if s["solo"]["ready"] and
                     s["spread"]["degraded"] else None)(ready(base)))
    assert state["_status"] == 200 and state["spread"]["ready"] and state["spread"]["replicas_healthy"] == 1
    assert state["spread"]["replicas_target"] == 2 and "1 of 2 replicas running" in state["spread"]["detail"]
    assert not state["solo"]["degraded"]
    where = running_hosts()
    assert where["model-solo"] == ["sim-3"] and where["model-spread"] == ["sim-3"]
    late["thread"].join(timeout=240)
    assert late["response"].status_code == 200, late["response"].text
    print(f"\nfailover of solo to sim-3 and degraded /ready: {time.monotonic() - t_lost:.0f}s after the loss")

    # The Mac comes back: the replica that was waiting for it starts there again.
    t_back = time.monotonic()
    fleet["nodes"]["sim-2"] = add_host(cluster, "sim-2")
    state = wait_for("spread back to 2 replicas", lambda: (lambda s: s if s["spread"]["replicas_healthy"] == 2 else None)(ready(base)))
    assert not state["spread"]["degraded"] and state["solo"]["ready"]
    where = running_hosts()
    assert where["model-spread"] == ["sim-2", "sim-3"]
    assert where["model-solo"] == ["sim-3"]  # Serve never moves a running replica back
    print(f"spread whole again: {time.monotonic() - t_back:.0f}s after sim-2 returned")
