"""Planning sharded models: explicit and chosen hosts, each host's share, the mode, the Serve config
made from the plan, `plan`'s output and `validate`'s mode check. No Ray is started."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cluster.cli import main
from cluster.inventory import FleetError, parse_fleet
from cluster.pins import model_entries, serve_config, weight_bytes
from cluster.placement import PlacementError, plan
from deployments.config import AppConfig


@pytest.fixture(autouse=True, scope="module")
def offline_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Demo models built in a cache of this module's own; a Hugging Face cache that holds nothing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_SERVING_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub")))
        yield


def host(name: str, gb: float, **kw: Any) -> dict[str, Any]:
    return {"name": name, "address": f"{name}.local", "chip": "M2 Ultra", "memory_gb": gb, "usable_fraction": 1.0, **kw}


def model(name: str, gb: float, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": f"org/{name}", "footprint_gb": gb, **kw}


def fleet(hosts: list[dict[str, Any]], models: list[dict[str, Any]], kv: float = 0.0, head: str | None = None) -> Any:
    return parse_fleet({"hosts": hosts, "head": head or hosts[0]["name"], "default_kv_cache_gb": kv, "models": models})


def usage(p: Any) -> dict[str, float]:
    return {u.host: u.used_gb for u in p.hosts}


# --- explicit hosts --------------------------------------------------------------------------------

def test_explicit_hosts_in_rank_order_each_counting_its_share() -> None:
    f = fleet([host("mini", 64), host("studio-1", 192), host("studio-2", 192)],
              [model("big", 44, kv_cache_gb=4, shard={"hosts": ["studio-2", "mini"]}), model("small", 10)])
    p = plan(f)
    assert p.hosts_for("big") == ["studio-2", "mini"]  # as given: rank 0 first
    shares = {a.host: (a.footprint_gb, a.rank) for a in p.assignments if a.model == "big"}
    assert shares == {"studio-2": (24.0, 0), "mini": (24.0, 1)}  # (44 GB weights + 4 GB KV) / 2
    # The share is what each host's memory counts: "small" still fits beside it on mini (first in the file).
    assert usage(p) == {"mini": 34.0, "studio-1": 0.0, "studio-2": 24.0}
    assert next(u for u in p.hosts if u.host == "mini").replicas == ["big#0 (rank 1 of 2)", "small#0"]


def test_explicit_host_too_small_for_its_share_is_named() -> None:
    f = fleet([host("mini", 20), host("studio", 192)], [model("big", 48, shard={"hosts": ["studio", "mini"]})])
    with pytest.raises(PlacementError, match=r"model 'big' sharded across studio, mini needs 24\.0 GB per host "
                                             r"\(48\.0 GB / 2\); host 'mini' has 20\.0 GB usable \(shortfall 4\.0 GB\)"):
        plan(f)


def test_explicit_host_outside_the_models_constraints_is_refused() -> None:
    hosts = [host("a", 64, labels={"tier": "large"}), host("b", 64, labels={"tier": "small"}), host("c", 64)]
    f = fleet(hosts, [model("m", 20, host_labels={"tier": "large"}, shard={"hosts": ["a", "b"]})])
    with pytest.raises(PlacementError, match="model 'm': shard host 'b' is not allowed"):
        plan(f)


def test_inventory_checks_shard_hosts_and_replicas() -> None:
    with pytest.raises(FleetError) as err:
        fleet([host("a", 64), host("b", 64)], [
            model("m", 10, shard={"hosts": ["a", "zz"]}),
            model("n", 10, replicas=2, shard={}),
            model("o", 10, shard={"hosts": ["a"]}),
            model("p", 10, deployment={"shard": {"hosts": ["a", "b"]}}),
            model("q", 10, shard={"addresses": {"nope": "10.0.0.9"}}),
        ])
    problems = dict(err.value.problems)
    assert problems["models.0.shard.hosts.1"] == "unknown host 'zz' (hosts are a, b)"
    assert problems["models.1"] == "a sharded model has one replica (replicas: 1): it already spans its hosts"
    assert "at least 2 items" in problems["models.2.shard.hosts"]
    assert problems["models.3.deployment"].startswith("shard is set from the plan")
    assert problems["models.4.shard.addresses.nope"] == "unknown host 'nope' (hosts are a, b)"


# --- hosts chosen by the planner -------------------------------------------------------------------

def test_model_that_fits_nowhere_goes_to_the_fewest_largest_hosts() -> None:
    hosts = [host("mini", 64), host("studio-b", 192), host("studio-a", 192), host("pro", 140)]
    # 300 GB: two hosts suffice (150 each), the two largest, ties broken by name.
    p = plan(fleet(hosts, [model("big", 300)]))
    assert sorted(p.hosts_for("big")) == ["studio-a", "studio-b"]
    assert usage(p) == {"mini": 0.0, "studio-b": 150.0, "studio-a": 150.0, "pro": 0.0}
    # 400 GB: 200 each is too much for two; three hosts hold 133.3 each (mini, the fourth, is left out).
    p = plan(fleet(hosts, [model("big", 400)]))
    assert sorted(p.hosts_for("big")) == ["pro", "studio-a", "studio-b"]
    assert usage(p)["mini"] == 0.0 and usage(p)["pro"] == pytest.approx(400 / 3)


def test_rank_0_on_the_host_with_most_free_memory_else_the_head() -> None:
    hosts = [host("a", 100), host("b", 100), host("c", 100)]
    # a and b are chosen (largest, by name); "small" then lands on a (fleet order), so b keeps more free.
    p = plan(fleet(hosts, [model("big", 160), model("small", 10, hosts=["a"])]))
    assert p.hosts_for("big") == ["b", "a"]
    # Equal free memory: rank 0 on the head.
    p = plan(fleet(hosts, [model("big", 160)], head="b"))
    assert p.hosts_for("big") == ["b", "a"]
    p = plan(fleet(hosts, [model("big", 160)], head="c"))
    assert p.hosts_for("big") == ["a", "b"]  # the head is not one of them: the chosen order


def test_shard_without_hosts_uses_the_fewest_eligible_even_when_one_would_do() -> None:
    hosts = [host("a", 100, labels={"t": "x"}), host("b", 80, labels={"t": "x"}), host("c", 200)]
    p = plan(fleet(hosts, [model("m", 60, shard={}, host_labels={"t": "x"})]))
    assert sorted(p.hosts_for("m")) == ["a", "b"]  # c is larger but not selected
    assert {a.footprint_gb for a in p.assignments} == {30.0}


def test_error_when_even_all_hosts_together_cannot_hold_it() -> None:
    f = fleet([host("a", 100), host("b", 100), host("c", 50)], [model("huge", 240, kv_cache_gb=20)])
    with pytest.raises(PlacementError, match=r"model 'huge' needs 260\.0 GB: even all 3 eligible hosts together "
                                             r"have 250\.0 GB \(shortfall 10\.0 GB\)"):
        plan(f)


def test_error_when_no_even_split_fits_names_the_smallest_host() -> None:
    # 240 GB: over 2 hosts 120 each (b has 100), over 3 hosts 80 each (c has 50): 2 hosts come closest.
    f = fleet([host("a", 150), host("b", 100), host("c", 50)], [model("m", 240)])
    with pytest.raises(PlacementError, match=r"model 'm' needs 240\.0 GB and no even split .* over 2 hosts it needs "
                                             r"120\.0 GB per host, but 'b' has 100\.0 GB \(shortfall 20\.0 GB\)"):
        plan(f)


def test_a_model_too_big_for_one_host_with_several_replicas_is_an_error() -> None:
    f = fleet([host("a", 100), host("b", 100)], [model("m", 150, replicas=2)])
    with pytest.raises(PlacementError, match=r"model 'm' needs 150\.0 GB per replica; .*set replicas: 1"):
        plan(f)


def test_single_eligible_host_keeps_the_old_error() -> None:
    f = fleet([host("a", 100, labels={"t": "x"}), host("b", 300)], [model("m", 150, host_labels={"t": "x"})])
    with pytest.raises(PlacementError, match=r"model 'm' needs 150\.0 GB per replica; largest eligible host 'a' has "
                                             r"100\.0 GB usable \(shortfall 50\.0 GB\)$"):
        plan(f)


def test_single_host_models_pack_around_the_shards() -> None:
    f = fleet([host("a", 100), host("b", 100), host("c", 40)],
              [model("big", 160), model("mid", 15, replicas=2), model("tiny", 5, replicas=3)])
    p = plan(f)
    for u in p.hosts:
        assert u.used_gb <= u.usable_gb + 1e-9
        assert u.used_gb == pytest.approx(sum(a.footprint_gb for a in p.assignments if a.host == u.host))
    assert sorted(p.hosts_for("big")) == ["a", "b"]


# --- the mode ----------------------------------------------------------------------------------------

def test_mode_from_the_architecture_when_the_model_is_here() -> None:
    hosts = [host("a", 100), host("b", 100)]
    p = plan(fleet(hosts, [{"name": "llama", "source": "demo:tiny", "footprint_gb": 150},
                           {"name": "qwen", "source": "demo:tiny-qwen2", "footprint_gb": 30, "shard": {}}]),
             weight_bytes=weight_bytes)
    assert p.shard_of("llama").shard_mode == "tensor"  # llama offers tensor only
    assert p.shard_of("qwen").shard_mode == "pipeline"  # qwen2 offers both: pipeline first
    assert p.notes == []


def test_mode_defaults_to_pipeline_with_a_note_when_the_model_is_not_here() -> None:
    p = plan(fleet([host("a", 100), host("b", 100)], [model("far", 150)]))
    assert p.shard_of("far").shard_mode == "pipeline"
    assert p.notes == ["model 'far': org/far is not in the local cache, so its architecture was not checked: "
                       "mode pipeline (set shard.mode to choose)"]


def test_a_mode_the_architecture_lacks_is_a_plan_error() -> None:
    f = fleet([host("a", 100), host("b", 100)],
              [{"name": "m", "source": "demo:tiny", "footprint_gb": 10, "shard": {"mode": "pipeline"}}])
    with pytest.raises(PlacementError, match=r"model 'm': shard\.mode: demo:tiny's architecture \(llama\) offers "
                                             r"tensor only, not pipeline"):
        plan(f)


# --- the Serve config made from the plan -------------------------------------------------------------

def test_serve_config_entry_of_a_sharded_model_validates() -> None:
    from cluster import serve_config as serve_config_module

    f = fleet([host("a", 100), host("b", 100), host("c", 100)], [
        model("big", 150, kv_cache_gb=2, deployment={"max_ongoing_requests": 16},
              shard={"step_timeout_s": 30, "addresses": {"a": "192.168.7.1", "b": "192.168.7.2", "c": "192.168.7.3"}}),
        model("small", 5, replicas=2),
    ])
    p = plan(f)
    entries = {e["name"]: e for e in model_entries(f, p)}
    big = entries["big"]
    ranks = p.hosts_for("big")
    assert big == {
        "name": "big", "source": "org/big", "num_replicas": 1, "memory_gb": 76.0, "max_ongoing_requests": 16,
        "shard": {"hosts": ranks, "mode": "pipeline", "step_timeout_s": 30.0,
                  "addresses": {h: {"a": "192.168.7.1", "b": "192.168.7.2", "c": "192.168.7.3"}[h] for h in ranks}},
    }
    assert entries["small"]["hosts"] and entries["small"]["max_replicas_per_node"] == 1  # single-host models unchanged

    config = serve_config(f, p)
    app = AppConfig.model_validate(config["applications"][0]["args"])
    sharded = next(m for m in app.models if m.name == "big")
    assert sharded.shard is not None and sharded.shard.hosts == ranks and sharded.memory_gb == 76.0
    assert sharded.hosts == [] and sharded.fallback_hosts == [] and sharded.max_replicas_per_node is None
    assert serve_config_module.problems(config) == []


def test_chosen_hosts_are_checked_as_a_shard_config() -> None:
    # jaccl needs an RDMA device for every pair of the hosts the planner chooses (a and b here).
    f = fleet([host("a", 100), host("b", 100), host("c", 10)],
              [model("m", 150, shard={"backend": "jaccl", "rdma_devices": {"a": {"c": "rdma_en3"}}})])
    with pytest.raises(PlacementError, match="model 'm' sharded across .*jaccl needs an RDMA device for every pair"):
        plan(f)


# --- the CLI: plan and validate ----------------------------------------------------------------------

def _write(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_plan_prints_the_sharded_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = _write(tmp_path / "fleet.yaml", {
        "head": "studio-1", "default_kv_cache_gb": 0,
        "hosts": [host("studio-1", 32), host("studio-2", 32), host("mini", 16)],
        "models": [model("big", 48, shard={"hosts": ["studio-1", "studio-2"], "mode": "tensor"}), model("s", 4)],
    })
    assert main(["plan", inv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "big  sharded (tensor) across studio-1, studio-2  24.0 GB per host"
    assert "big#0 (rank 0 of 2)" in next(line for line in out if line.startswith("studio-1"))

    assert main(["plan", inv, "--emit-config", "-"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    entry = next(m for m in config["applications"][0]["args"]["models"] if m["name"] == "big")
    assert entry["shard"] == {"hosts": ["studio-1", "studio-2"], "mode": "tensor"} and entry["memory_gb"] == 24.0


def _serve_config(source: str, mode: str | None) -> dict[str, Any]:
    shard: dict[str, Any] = {"hosts": ["sim-1", "sim-2"]}
    if mode is not None:
        shard["mode"] = mode
    return {"applications": [{"name": "app", "route_prefix": "/", "import_path": "deployments.app:build_app",
                              "args": {"models": [{"name": "one", "source": "demo:tiny"},
                                                  {"name": "big", "source": source, "shard": shard}]}}]}


def test_validate_rejects_a_mode_the_architecture_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path / "bad.yaml", _serve_config("demo:tiny", "pipeline"))
    default = _write(tmp_path / "default.yaml", _serve_config("demo:tiny", None))  # ShardConfig's default: pipeline
    assert main(["validate", bad, default]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}: 1 problem(s)",
        "  - applications[0].args.models[1].shard.mode: demo:tiny's architecture (llama) offers tensor only, not pipeline",
        f"{default}: 1 problem(s)",
        "  - applications[0].args.models[1].shard.mode: demo:tiny's architecture (llama) offers tensor only, not pipeline",
    ]


def test_validate_accepts_the_modes_the_architecture_offers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [_write(tmp_path / f"{i}.yaml", _serve_config(source, mode)) for i, (source, mode) in enumerate(
        [("demo:tiny", "tensor"), ("demo:tiny-qwen2", "pipeline"), ("demo:tiny-qwen2", "tensor")])]
    assert main(["validate", *files]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{f}: ok" for f in files]


def test_validate_notes_a_model_it_cannot_look_at(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "far.yaml", _serve_config("org/not-downloaded", "pipeline"))
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{path}: ok (applications[0].args.models[1].shard.mode not checked: org/not-downloaded is not in the "
        "local cache)")


def test_validate_checks_an_inventorys_shard_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def inventory(mode: str) -> str:
        return _write(tmp_path / f"fleet-{mode}.yaml", {
            "head": "a", "hosts": [host("a", 64), host("b", 64)],
            "models": [{"name": "m", "source": "demo:tiny", "shard": {"mode": mode}}]})

    bad, good = inventory("pipeline"), inventory("tensor")
    assert main(["validate", bad, good]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}: 1 problem(s)",
        "  - models.0.shard.mode: demo:tiny's architecture (llama) offers tensor only, not pipeline",
        f"{good}: ok (fleet inventory: 2 host(s), 1 model(s))",
    ]


def test_models_pull_reaches_every_host_of_a_sharded_model(tmp_path: Path) -> None:
    from cluster.models_cli import hosts_for

    inv = _write(tmp_path / "fleet.yaml", {
        "head": "a", "default_kv_cache_gb": 0,
        "hosts": [host(n, 16) for n in ("a", "b", "c")],
        "models": [{"name": "big", "source": "acme/big", "footprint_gb": 20, "shard": {"hosts": ["c", "b"]}}]})
    assert hosts_for("acme/big", inv) == ["c", "b"]  # each host loads its shard from its own cache
