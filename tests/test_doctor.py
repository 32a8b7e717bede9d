"""`mlx-serving doctor`'s checks on their own: the macOS branches with the platform patched (we have no
Mac: MLX's device_info and the iogpu sysctl are stood in for), Linux's BLAS, Ray's auth verdicts, and
an inventory against a cluster's nodes and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import doctor


def test_macos_reports_metal_memory_and_the_wired_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M2 Ultra", "memory_size": 192 * doctor.GB,
                                                    "max_recommended_working_set_size": 144 * doctor.GB})
    sysctl: dict[str, str | None] = {"iogpu.wired_limit_mb": "0", "machdep.cpu.brand_string": "Apple M2 Ultra"}
    monkeypatch.setattr(doctor, "_sysctl", lambda name: sysctl.get(name))
    checks = {c.name: c for c in doctor.memory_checks("Darwin")}
    assert checks["metal"].detail == "Apple M2 Ultra: 192.0 GiB unified memory, recommended working set 144.0 GiB"
    assert checks["wired limit"].verdict == "info" and "iogpu.wired_limit_mb" in (checks["wired limit"].fix or "")
    sysctl["iogpu.wired_limit_mb"] = "180000"
    assert {c.name: c for c in doctor.memory_checks("Darwin")}["wired limit"].verdict == "ok"
    platform_line = doctor.machine_checks("Darwin")[0]
    assert platform_line.name == "platform" and "Apple M2 Ultra" in platform_line.detail


def test_linux_reports_the_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import blas

    monkeypatch.setattr(blas, "uses_reference_blas", lambda: True)
    monkeypatch.setattr(blas, "preloaded", lambda: False)
    monkeypatch.setattr(blas, "openblas_path", lambda: None)
    (check,) = doctor.memory_checks("Linux")
    assert check.verdict == "fix" and "libopenblas0-pthread" in (check.fix or "")
    monkeypatch.setattr(blas, "preloaded", lambda: True)
    (check,) = doctor.memory_checks("Linux")
    assert (check.verdict, check.detail) == ("ok", "OpenBLAS (preloaded)")


def test_ray_auth_disabled_needs_fixing(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster import exposure

    monkeypatch.setattr(exposure, "ray_auth_mode", lambda url: "disabled")
    checks = {c.name: c for c in doctor.ray_checks("http://127.0.0.1:1", [])}
    assert checks["ray auth"].verdict == "fix" and "RAY_AUTH_MODE=token" in (checks["ray auth"].fix or "")
    lines, rc = doctor.report(list(checks.values()))
    assert rc == 1 and lines[-1] == "1 thing(s) to fix" and any(line.startswith("FIX ray auth") for line in lines)
    assert doctor.ray_checks(None, [])[-1].detail.startswith("no Ray cluster runs here")


INVENTORY: dict[str, Any] = {
    "head": "studio-1",
    "hosts": [{"name": "studio-1", "address": "127.0.0.2", "chip": "M2 Ultra", "memory_gb": 64},
              {"name": "mini-1", "address": "127.0.0.3", "chip": "M4", "memory_gb": 16}],
    "models": [{"name": "m", "source": "acme/m", "replicas": 2, "footprint_gb": 6}],
}


def test_an_inventory_against_the_clusters_nodes_and_memory(tmp_path: Path) -> None:
    inventory: dict[str, Any] = dict(INVENTORY)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(inventory))
    labels = {"n1": {"host": "studio-1"}}
    checks = {c.name: c for c in doctor.inventory_checks(path, labels, {"studio-1": 40.0})}
    assert checks["plan"].verdict == "ok"
    assert checks["nodes"].verdict == "fix" and "mini-1" in checks["nodes"].detail
    assert checks["memory on studio-1"].verdict == "ok"
    short = {c.name: c for c in doctor.inventory_checks(path, {**labels, "n2": {"host": "mini-1"}},
                                                         {"studio-1": 40.0, "mini-1": 1.0})}
    assert short["nodes"].verdict == "ok" and short["memory on mini-1"].verdict == "fix"
    path.write_text(yaml.safe_dump({**inventory, "models": [{"name": "m", "source": "acme/m", "footprint_gb": 500}]}))
    assert doctor.inventory_checks(path, labels, {})[0].verdict == "fix"


def test_doctor_says_which_hosts_lack_a_planned_hub_model(tmp_path: Path) -> None:
    inventory: dict[str, Any] = dict(INVENTORY)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(inventory))
    labels = {"n1": {"host": "studio-1"}, "n2": {"host": "mini-1"}}
    memory = {"studio-1": 40.0, "mini-1": 10.0}
    checks = {c.name: c for c in doctor.inventory_checks(path, labels, memory, {"studio-1": {"acme/m"}, "mini-1": set()})}
    lacking = checks["acme/m on hosts"]
    assert lacking.verdict == "info" and "mini-1" in lacking.detail and "studio-1" not in lacking.detail
    assert lacking.fix == f"download it once and copy it over the cluster: mlx-serving models pull acme/m --inventory {path}"
    held = {c.name: c for c in doctor.inventory_checks(path, labels, memory, {"studio-1": {"acme/m"}, "mini-1": {"acme/m"}})}
    assert held["models on hosts"].verdict == "ok"
