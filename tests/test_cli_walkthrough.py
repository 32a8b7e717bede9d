"""The README and the docs followed literally on a fresh clone: every command they show, with the
inputs they name, gives the result they show. No Ray cluster starts here (tests/test_cli_up.py runs
`up`, `serve deploy` and `down` against a real one)."""

from __future__ import annotations

import re
import socket
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from cluster import local
from cluster.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"


@pytest.fixture(autouse=True)
def fresh_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh clone's machine: empty cache and home, no Ray address, auth mode or API key."""
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLX_SERVING_API_KEYS",
                "MLX_SERVING_ADMIN_KEYS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLX_SERVING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "rt"))  # Ray's address file: rt/ray/ray_current_cluster
    monkeypatch.chdir(REPO)
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def _address_file(tmp_path: Path, address: str) -> Path:
    path = tmp_path / "rt" / "ray" / "ray_current_cluster"
    path.parent.mkdir(parents=True)
    path.write_text(address)
    return path


class _CountingRun:
    """``subprocess.run`` as it is, counting the calls and the timeout each got."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Any]] = []
        self.real = subprocess.run

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append((argv, kw.get("timeout")))
        return self.real(argv, **kw)


# -- 1. `up` and a stale Ray address file --------------------------------------------------------

def test_a_stale_address_file_is_dismissed_without_running_ray_status(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    _address_file(tmp_path, f"127.0.0.1:{port}")
    run = _CountingRun()
    monkeypatch.setattr(local.subprocess, "run", run)
    said: list[str] = []

    assert local.existing_cluster(say=said.append) is None
    assert run.calls == []  # the TCP probe decided: no `ray status` (40 s of retries on a dead port)
    assert said[0] == (f"checking the Ray cluster at 127.0.0.1:{port} (from Ray's address file "
                       f"{tmp_path / 'rt' / 'ray' / 'ray_current_cluster'}) ...")
    assert said[1] == f"  nothing listens at 127.0.0.1:{port}: the address is stale; ignoring it"


def test_a_port_that_answers_but_is_no_ray_cluster_costs_one_bounded_ray_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:  # accepts connections (the kernel does), never speaks gRPC
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.setattr(local, "RAY_STATUS_TIMEOUT_S", 4.0)
        run = _CountingRun()
        monkeypatch.setattr(local.subprocess, "run", run)
        said: list[str] = []

        assert local.existing_cluster(say=said.append) is None
    # One `ray status`, cut at the timeout: silence is no auth refusal, so the token is not tried next.
    assert [(argv[1:], timeout) for argv, timeout in run.calls] == [(["status", "--address", address], 4.0)]
    assert said == [f"checking the Ray cluster at {address} (from RAY_ADDRESS) ...",
                    f"  {address} did not answer as a Ray cluster within 4 s; ignoring it"]


def test_no_address_file_means_no_probe_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _CountingRun()
    monkeypatch.setattr(local.subprocess, "run", run)
    said: list[str] = []
    assert local.existing_cluster(say=said.append) is None and run.calls == [] and said == []


# -- 4. validate: Serve configs and fleet inventories ------------------------------------------------

def test_ray_bin_is_the_venvs_else_the_one_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python with no `ray` script beside it (packages unpacked, not pip-installed) finds the one on PATH."""
    venv, elsewhere = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    venv.mkdir(parents=True), elsewhere.mkdir()
    (elsewhere / "ray").write_text("#!/bin/sh\n")
    (elsewhere / "ray").chmod(0o755)
    monkeypatch.setattr(local.sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert local.ray_bin() == str(elsewhere / "ray")
    (venv / "ray").write_text("#!/bin/sh\n")
    assert local.ray_bin() == str(venv / "ray")


def test_validate_config_glob_passes_on_every_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p.relative_to(REPO)) for p in CONFIG.glob("*.yaml"))  # what `config/*.yaml` expands to
    assert "config/fleet.example.yaml" in files and "config/fleet.sim.yaml" in files

    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    for f in files:
        assert re.search(rf"^{re.escape(f)}: ok\b", out, re.M), (f, out)
    assert "config/fleet.example.yaml: ok (fleet inventory: 3 host(s), 3 model(s))" in out
    assert "config/fleet.sim.yaml: ok (fleet inventory: 3 host(s), 2 model(s))" in out
    assert "Field required" not in out


def test_validate_gives_a_broken_inventorys_field_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("head: mac-9\nhosts:\n  - {name: mac-1, address: 10.0.0.1, memory_gb: -4}\n"
                   "models:\n  - {name: m, source: demo:tiny, hosts: [mac-2]}\n")

    assert main(["validate", str(bad), str(CONFIG / "demo.yaml")]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[:5] == [
        f"{bad}: 4 problem(s)",
        "  - head: head 'mac-9' is not one of the hosts (mac-1)",
        "  - hosts.0.chip: Field required",
        "  - hosts.0.memory_gb: Input should be greater than 0",
        "  - models.0.hosts.0: unknown host 'mac-2' (hosts are mac-1)",
    ], out
    assert "applications" not in out  # judged as an inventory, not as a Serve config
    assert f"{CONFIG / 'demo.yaml'}: ok" in out  # the next file is still checked


# -- 5. plan on a fresh machine ----------------------------------------------------------------------

def test_plan_of_the_example_fleet_works_on_a_fresh_cache(fresh_machine: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert not (fresh_machine / "cache").exists()

    assert main(["plan", "config/fleet.example.yaml"]) == 0
    out = capsys.readouterr().out
    # docs/fleet.md, section 3, to the character
    assert out.splitlines() == [
        "HOST                 CHIP      USABLE GB  USED GB  FREE GB  REPLICAS",
        "mac-studio-1 (head)  M2 Ultra      136.0     27.5    108.5  qwen2.5-32b#0, llama-3.1-8b#0",
        "mac-mini-1           M4 Pro         48.0      5.8     42.2  llama-3.1-8b#1, demo-tiny#0",
        "mac-mini-2           M4 Pro         48.0      0.0     48.0  -",
    ]
    assert (fresh_machine / "cache" / "models" / "demo-tiny" / "model.safetensors").is_file()  # built to measure it


# -- 6. the quick start's client is installed by `pip install -e .` ----------------------------------

def test_openai_is_a_regular_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert "openai" in reqs, project["dependencies"]
    assert version("openai") in reqs["openai"].specifier  # the installed client satisfies it
    assert not any(Requirement(r).name == "openai" for r in project["optional-dependencies"]["dev"])


# -- 7. the inputs the docs use are shipped ----------------------------------------------------------

def test_validate_of_the_shipped_bad_config_gives_the_documented_problems(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "config/examples/bad.yaml"]) == 1
    assert capsys.readouterr().out.splitlines() == [  # docs/canary.md, section 1
        "config/examples/bad.yaml: 3 problem(s)",
        "  - applications[0].args.routes[0].variants[0].weight: Input should be greater than or equal to 0",
        "  - applications[0].args.routes[2]: Value error, route 'ok': at least one variant needs a positive weight",
        "  - applications[0].args.routes[1].name: route 'stable' has the name of a model that is not one of its "
        "variants: it would hide that model; rename the route or make the model a variant",
    ]


def test_plan_of_the_shipped_too_big_fleet_gives_the_documented_placement_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "config/examples/too-big.yaml"]) == 0  # a valid inventory ...
    capsys.readouterr()
    assert main(["plan", "config/examples/too-big.yaml"]) == 1  # ... whose plan cannot fit
    err = capsys.readouterr().err
    assert err.strip() == (  # docs/fleet.md, section 3
        "model 'llama-3.1-70b' needs 51.0 GB per replica (replica 2 of 2); largest free host without a replica of "
        "it 'mac-mini-1' has 48.0 GB (shortfall 3.0 GB)")
