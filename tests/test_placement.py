"""Fleet inventory validation and memory-aware placement."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from cluster.inventory import GB, Fleet, FleetError, load_fleet, parse_fleet
from cluster.placement import FootprintError, PlacementError, model_weight_bytes, plan, safetensors_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "fleet.example.yaml"


def host(name: str, gb: float, **kw: Any) -> dict[str, Any]:
    return {"name": name, "address": f"{name}.local", "chip": "M4 Pro", "memory_gb": gb, "usable_fraction": 1.0, **kw}


def model(name: str, gb: float, replicas: int = 1, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": f"org/{name}", "footprint_gb": gb, "replicas": replicas, **kw}


def fleet(hosts: list[dict[str, Any]], models: list[dict[str, Any]], kv: float = 0.0) -> Fleet:
    return parse_fleet({"hosts": hosts, "head": hosts[0]["name"], "default_kv_cache_gb": kv, "models": models})


def used(p, name: str) -> float:
    return next(u.used_gb for u in p.hosts if u.host == name)


# --- safetensors headers -------------------------------------------------------------------------

def test_weight_bytes_exact_from_mlx_and_numpy_files(tmp_path: Path) -> None:
    mx.save_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"), {
        "a": mx.zeros((3, 5), dtype=mx.float32),    # 60
        "b": mx.zeros((7,), dtype=mx.float16),      # 14
        "c": mx.zeros((2, 3), dtype=mx.bfloat16),   # 12
    }, metadata={"format": "mlx"})
    save_file({
        "d": np.zeros((4, 4), dtype=np.int8),       # 16
        "e": np.zeros((10, 3), dtype=np.float64),   # 240
    }, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert safetensors_bytes(tmp_path / "model-00001-of-00002.safetensors") == 86
    assert safetensors_bytes(tmp_path / "model-00002-of-00002.safetensors") == 256
    assert model_weight_bytes(tmp_path) == 342
    # A consolidated copy beside the shards is not what mlx-lm loads: not counted twice.
    save_file({"all": np.zeros((1000,), dtype=np.float32)}, str(tmp_path / "consolidated.safetensors"))
    assert model_weight_bytes(str(tmp_path)) == 342


def test_weight_bytes_other_names_and_truncation(tmp_path: Path) -> None:
    save_file({"w": np.zeros((25, 4), dtype=np.float32)}, str(tmp_path / "weights.safetensors"))
    assert model_weight_bytes(tmp_path) == 400
    f = tmp_path / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(FootprintError, match="truncated"):
        model_weight_bytes(tmp_path)


def test_weight_bytes_hub_id_needs_footprint_or_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FootprintError, match="footprint_gb"):
        model_weight_bytes("mlx-community/Nope-4bit")
    with pytest.raises(FootprintError, match="missing directory.*footprint_gb"):
        model_weight_bytes(str(tmp_path / "nowhere" / "deeper" / "x"))
    repo = tmp_path / "hub" / "models--mlx-community--Nope-4bit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file({"w": np.zeros((8,), dtype=np.float16)}, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    assert model_weight_bytes("mlx-community/Nope-4bit") == 16


def test_plan_measures_local_weights_and_adds_kv(tmp_path: Path) -> None:
    save_file({"w": np.zeros((GB // 4 // 1024, 1024), dtype=np.float32)}, str(tmp_path / "model.safetensors"))  # 1 GB
    f = fleet([host("a", 10)], [{"name": "m", "source": str(tmp_path), "kv_cache_gb": 2.5}], kv=1.0)
    p = plan(f)
    assert p.assignments[0].footprint_gb == pytest.approx(3.5)
    assert used(p, "a") == pytest.approx(3.5)


def test_plan_unmeasurable_model_names_it() -> None:
    f = parse_fleet({"hosts": [host("a", 10)], "head": "a", "models": [{"name": "ghost", "source": "org/ghost"}]})
    with pytest.raises(PlacementError, match="model 'ghost'.*footprint_gb"):
        plan(f)


# --- packing ---------------------------------------------------------------------------------------

def test_packing_respects_capacity_where_first_fit_decreasing_fails() -> None:
    # First-fit-decreasing puts 5+4 on a, 3+3+3 on b and has no room for 2; 5+3+2 / 4+3+3 fits exactly.
    sizes = {"m5": 5, "m4": 4, "m3a": 3, "m3b": 3, "m3c": 3, "m2": 2}
    f = fleet([host("a", 10), host("b", 10)], [model(n, s) for n, s in sizes.items()])
    p = plan(f)
    for u in p.hosts:
        assert u.used_gb <= u.usable_gb + 1e-9
        assert u.used_gb == pytest.approx(sum(sizes[r.split("#")[0]] for r in u.replicas))
    assert sorted(a.model for a in p.assignments) == sorted(sizes)


def test_usable_memory_accounts_for_fraction_and_reserve() -> None:
    h = {"name": "a", "address": "10.0.0.1", "chip": "M2 Ultra", "memory_gb": 192, "reserved_gb": 8}
    f = parse_fleet({"hosts": [h], "head": "a", "default_kv_cache_gb": 0, "models": [model("m", 136)]})
    assert f.hosts[0].usable_gb == pytest.approx(136.0)
    assert plan(f).hosts[0].free_gb == pytest.approx(0.0)
    f2 = parse_fleet({"hosts": [h], "head": "a", "default_kv_cache_gb": 0.5, "models": [model("m", 136)]})
    with pytest.raises(PlacementError, match=r"model 'm' needs 136\.5 GB .*shortfall 0\.5 GB"):
        plan(f2)


# --- spreading -------------------------------------------------------------------------------------

def test_replicas_spread_over_distinct_hosts() -> None:
    f = fleet([host("a", 100), host("b", 100), host("c", 100)], [model("m", 5, replicas=3), model("n", 1, replicas=2)])
    p = plan(f)
    assert sorted(p.hosts_for("m")) == ["a", "b", "c"]
    assert len(set(p.hosts_for("n"))) == 2


def test_more_replicas_than_hosts_stack_evenly() -> None:
    f = fleet([host("a", 100), host("b", 100)], [model("m", 5, replicas=5)])
    hosts = plan(f).hosts_for("m")
    assert len(hosts) == 5
    assert sorted([hosts.count("a"), hosts.count("b")]) == [2, 3]


def test_stacking_only_when_memory_allows() -> None:
    f = fleet([host("a", 12), host("b", 5)], [model("m", 5, replicas=3)])
    assert sorted(plan(f).hosts_for("m")) == ["a", "a", "b"]
    with pytest.raises(PlacementError, match="model 'm'"):
        plan(fleet([host("a", 12), host("b", 5)], [model("m", 5, replicas=4)]))


def test_spread_is_never_traded_for_stacking() -> None:
    # a could hold both replicas, but two hosts are eligible, so they must be on distinct hosts.
    f = fleet([host("a", 20), host("b", 5)], [model("m", 6, replicas=2)])
    with pytest.raises(PlacementError, match=r"model 'm' needs 6\.0 GB .*replica 2 of 2.*'b' has 5\.0 GB \(shortfall 1\.0 GB\)"):
        plan(f)


# --- selectors -------------------------------------------------------------------------------------

def test_allow_list_and_labels_respected() -> None:
    hosts = [host("a", 100, labels={"tier": "large"}), host("b", 100, labels={"tier": "small"}),
             host("c", 100, labels={"tier": "small", "zone": "x"})]
    models = [model("pinned", 1, hosts=["c"]), model("small", 1, replicas=2, host_labels={"tier": "small"}),
              model("zoned", 1, host_labels={"tier": "small", "zone": "x"}), model("big", 1, host_labels={"tier": "large"}),
              model("both", 1, hosts=["a", "b"], host_labels={"tier": "small"})]
    p = plan(fleet(hosts, models))
    assert p.hosts_for("pinned") == ["c"]
    assert sorted(p.hosts_for("small")) == ["b", "c"]
    assert p.hosts_for("zoned") == ["c"]
    assert p.hosts_for("big") == ["a"]
    assert p.hosts_for("both") == ["b"]


def test_selector_capacity_shortfall_is_reported() -> None:
    hosts = [host("mac-1", 100, labels={"tier": "small"}), host("mac-2", 30, labels={"tier": "large"})]
    f = fleet(hosts, [model("big", 47, host_labels={"tier": "large"})], kv=1.0)
    with pytest.raises(PlacementError) as err:
        plan(f)
    msg = str(err.value)
    assert "model 'big' needs 48.0 GB per replica" in msg
    assert "'mac-2' has 30.0 GB" in msg and "shortfall 18.0 GB" in msg


def test_impossible_after_other_models_placed_names_model_and_shortfall() -> None:
    f = fleet([host("h1", 10), host("h2", 10)], [model("a", 8, replicas=2), model("b", 5)])
    with pytest.raises(PlacementError, match=r"model 'b' needs 5\.0 GB .*largest free host 'h1' has 2\.0 GB \(shortfall 3\.0 GB\)"):
        plan(f)


# --- determinism and output ------------------------------------------------------------------------

def test_plans_are_deterministic_and_independent_of_model_order() -> None:
    hosts = [host(f"h{i}", 24) for i in range(4)]
    models = [model("a", 7, replicas=3), model("b", 5, replicas=2), model("c", 7, replicas=2), model("d", 3, replicas=4)]
    p1, p2 = plan(fleet(hosts, models)), plan(fleet(hosts, models))
    assert p1 == p2
    p3 = plan(fleet(hosts, list(reversed(models))))
    assert p3.model_dump() == p1.model_dump()


def test_table_and_hosts_for() -> None:
    p = plan(fleet([host("a", 10), host("b", 10)], [model("m", 4, replicas=2), model("n", 3)]))
    lines = p.as_table().splitlines()
    assert lines[0].split() == ["HOST", "CHIP", "USABLE", "GB", "USED", "GB", "FREE", "GB", "REPLICAS"]
    assert lines[1].split() == ["a", "(head)", "M4", "Pro", "10.0", "7.0", "3.0", "m#0,", "n#0"]
    assert lines[2].split() == ["b", "M4", "Pro", "10.0", "4.0", "6.0", "m#1"]
    with pytest.raises(KeyError, match="'zzz'"):
        p.hosts_for("zzz")


# --- inventory validation --------------------------------------------------------------------------

def test_load_fleet_reports_every_problem_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        """
head: mac-9
hosts:
  - {name: mac-1, address: 10.0.0.1, chip: M2 Ultra, memory_gb: 192}
  - {name: mac-1, address: 10.0.0.2, chip: M4 Pro, memory_gb: -4}
  - {name: "bad name", address: "no such host!", chip: M4, memory_gb: 16, labels: {host: x}}
models:
  - {name: a, source: org/a, replicas: 0, hosts: [mac-1, mac-7]}
  - {name: a, source: org/a, host_labels: {tier: huge}, footprint: 3}
"""
    )
    with pytest.raises(FleetError) as err:
        load_fleet(path)
    problems = dict(err.value.problems)
    msg = str(err.value)
    assert str(path) in msg
    expected = {
        "head": "mac-9",
        "hosts.1.name": "duplicate host name 'mac-1'",
        "hosts.1.memory_gb": "greater than 0",
        "hosts.2.name": "not label-safe",
        "hosts.2.address": "neither an IP address nor a valid host name",
        "hosts.2.labels": "reserved",
        "models.0.replicas": "greater than or equal to 1",
        "models.0.hosts.1": "unknown host 'mac-7'",
        "models.1.name": "duplicate model name 'a'",
        "models.1.host_labels": "matches no host",
        "models.1.footprint": "Extra inputs",
    }
    for loc, text in expected.items():
        assert loc in problems, (loc, msg)
        assert text in problems[loc], (loc, problems[loc])
        assert f"{loc}: " in msg


def test_load_fleet_rejects_non_mapping_and_bad_yaml(tmp_path: Path) -> None:
    p = tmp_path / "f.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(FleetError, match="expected a mapping"):
        load_fleet(p)
    p.write_text("hosts: [unclosed\n")
    with pytest.raises(FleetError, match="not valid YAML"):
        load_fleet(p)


def test_fleet_constructed_directly_checks_references() -> None:
    with pytest.raises(ValueError, match="head 'x' is not one of the hosts"):
        Fleet(hosts=[host("a", 10)], head="x")
    f = fleet([host("a", 10, labels={"tier": "large"})], [])
    assert f.hosts[0].ray_labels() == {"host": "a", "tier": "large"}


def test_example_config_loads_and_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.pins import weight_bytes

    f = load_fleet(EXAMPLE)
    assert f.head == "mac-studio-1" and len(f.hosts) == 3
    demo = next(m for m in f.models if m.footprint_gb is None)
    assert demo.source == "demo:tiny"
    monkeypatch.setenv("MLX_SERVING_CACHE", str(tmp_path / "cache"))  # plan builds the demo model here to measure it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    p = plan(f, weight_bytes=weight_bytes)
    assert p.hosts_for("qwen2.5-32b") == ["mac-studio-1"]
    llama = p.hosts_for("llama-3.1-8b")
    assert len(llama) == 2 and len(set(llama)) == 2
    assert p.hosts_for(demo.name)[0] in {"mac-mini-1", "mac-mini-2"}
    for u in p.hosts:
        assert 0 <= u.used_gb <= u.usable_gb
    table = p.as_table()
    assert "mac-studio-1 (head)" in table and "M2 Ultra" in table and "qwen2.5-32b#0" in table


def test_modules_do_not_import_ray() -> None:
    code = "import sys, cluster.inventory, cluster.placement; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
