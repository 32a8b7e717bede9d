"""launchd LaunchAgents for the worker Macs: the plist, the CLI that writes and installs them, and the
shell they are installed with.

There is no Mac and no ssh target here: the plists are checked with ``plistlib``, ssh is stood in for
by patching ``subprocess.run``, and the install shell runs for real under ``sh`` and ``bash`` with
stand-ins for ``launchctl`` and ``pgrep`` (macOS runs it under zsh, which this machine lacks).
"""

from __future__ import annotations

import os
import plistlib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cluster import agents, nodes
from cluster.cli import main
from cluster.inventory import load_fleet

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "fleet.example.yaml"
RAY = "/Users/mlx/mlx-serving/.venv/bin/ray"
MEMORY_MINI = 48 * 2**30  # 64 GB x 0.75


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cluster state of this machine, and a known token file."""
    monkeypatch.setenv("MLX_SERVING_CACHE", str(tmp_path / "cache"))
    token = tmp_path / "auth_token"
    token.write_text("f00d" * 16)
    monkeypatch.setenv(nodes.TOKEN_PATH_ENV, str(token))
    monkeypatch.delenv(nodes.TOKEN_ENV, raising=False)
    return token


def test_plist_runs_the_workers_ray_start_block_with_its_labels_token_file_and_keepalive() -> None:
    fleet = load_fleet(EXAMPLE)
    made = agents.agents_for(fleet, port=6380, ray="~/mlx-serving/.venv/bin/ray")
    assert [a.host for a in made] == ["mac-mini-1", "mac-mini-2"]  # the head gets none
    p = plistlib.loads(made[0].plist_bytes())
    assert made[0].plist_bytes().startswith(b"<?xml")  # XML, as launchd's own files
    assert p["Label"] == "io.mlx-serving.ray.mac-mini-1"
    assert p["ProgramArguments"] == [
        RAY, "start", "--address=10.0.0.10:6380", "--labels=host=mac-mini-1,tier=small",
        '--resources={"host:mac-mini-1":1000}', f"--memory={MEMORY_MINI}", "--disable-usage-stats", "--block"]
    assert p["EnvironmentVariables"] == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0",
        "RAY_AUTH_TOKEN_PATH": "/Users/mlx/.ray/auth_token",  # the file install-agents copies: no secret here
        "PATH": "/Users/mlx/mlx-serving/.venv/bin:/usr/bin:/bin:/usr/sbin:/sbin"}
    assert p["RunAtLoad"] is True
    assert p["KeepAlive"] == {"SuccessfulExit": False}
    assert p["ThrottleInterval"] == 30 and p["ExitTimeOut"] == 60 and p["ProcessType"] == "Interactive"
    assert p["StandardOutPath"] == p["StandardErrorPath"] == "/Users/mlx/Library/Logs/mlx-serving/ray-node.log"
    assert p["WorkingDirectory"] == "/Users/mlx"
    assert "--labels=host=mac-mini-2,tier=small" in plistlib.loads(made[1].plist_bytes())["ProgramArguments"]
    # Other homes, and the paths launchd cannot run.
    other = agents.agents_for(fleet, port=6379, ray=RAY, home="/Volumes/data/{user}")[0].plist()
    assert other["StandardOutPath"] == "/Volumes/data/mlx/Library/Logs/mlx-serving/ray-node.log"
    assert other["ProgramArguments"][0] == RAY
    with pytest.raises(agents.AgentError, match="not an absolute path: launchd runs no shell"):
        agents.agents_for(fleet, port=6379, ray="ray")
    with pytest.raises(agents.AgentError, match="mac-studio-1 runs the Ray head"):
        agents.worker_hosts(fleet, ["mac-studio-1"])
    with pytest.raises(agents.AgentError, match="unknown host"):
        agents.worker_hosts(fleet, ["mac-9"])


def test_cluster_up_write_agents_writes_one_plist_per_worker_and_starts_nothing(
        isolated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "agents"
    # launchd cannot run a bare `ray`: refused before anything is written or started.
    assert main(["cluster", "up", "--inventory", str(EXAMPLE), "--dry-run", "--write-agents", str(out_dir)]) == 1
    assert "--write-agents: --remote-ray 'ray' is not an absolute path" in capsys.readouterr().err
    assert not out_dir.exists()

    assert main(["cluster", "up", "--inventory", str(EXAMPLE), "--dry-run", "--write-agents", str(out_dir),
                 "--remote-ray", RAY, "--port", "6390"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["io.mlx-serving.ray.mac-mini-1.plist",
                                                         "io.mlx-serving.ray.mac-mini-2.plist"]
    for name in ("mac-mini-1", "mac-mini-2"):
        p = plistlib.loads((out_dir / f"io.mlx-serving.ray.{name}.plist").read_bytes())
        assert p["ProgramArguments"][:3] == [RAY, "start", "--address=10.0.0.10:6390"]
        assert f"--labels=host={name},tier=small" in p["ProgramArguments"] and p["ProgramArguments"][-1] == "--block"
        assert p["EnvironmentVariables"]["RAY_AUTH_MODE"] == "token"
    assert f"mlx-serving cluster install-agents --inventory {EXAMPLE} --remote-ray {RAY} --port 6390" in out
    assert ("ssh mlx@mac-mini-2.local 'mkdir -p ~/Library/LaunchAgents ~/Library/Logs/mlx-serving && cp "
            "io.mlx-serving.ray.mac-mini-2.plist ~/Library/LaunchAgents/ && launchctl bootstrap gui/$(id -u) "
            "~/Library/LaunchAgents/io.mlx-serving.ray.mac-mini-2.plist'") in out
    assert f"< {isolated}" in out  # the token copy, from the token file
    assert "start the other Macs" not in out  # the agents start them
    assert not nodes.state_file().exists()


class FakeSsh:
    """Stands in for ``subprocess.run`` of ssh: records argv and stdin; ``down`` hosts refuse the connection."""

    def __init__(self, down: set[str] = frozenset(), fail_script: dict[str, tuple[int, str]] | None = None) -> None:
        self.calls: list[tuple[list[str], bytes]] = []
        self.down = down
        self.fail_script = fail_script or {}

    def __call__(self, argv: list[str], input: bytes = b"", **kw: Any) -> subprocess.CompletedProcess:
        assert kw.get("capture_output") and kw.get("timeout")
        self.calls.append((argv, input))
        target = argv[5]
        if any(target.endswith("@" + h) for h in self.down):
            return subprocess.CompletedProcess(argv, 255, b"", f"ssh: connect to host {target.split('@')[1]} port 22: "
                                                                "Connection refused\n".encode())
        for h, (rc, err) in self.fail_script.items():
            if target.endswith("@" + h) and argv[-1] != agents.TOKEN_REMOTE:
                return subprocess.CompletedProcess(argv, rc, b"", err.encode())
        return subprocess.CompletedProcess(argv, 0, b"", b"")


def test_install_agents_copies_the_token_then_pipes_the_plist_and_reports_a_failing_host(
        isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSsh(down={"mac-mini-2.local"})
    monkeypatch.setattr(subprocess, "run", fake)
    assert main(["cluster", "install-agents", "--inventory", str(EXAMPLE), "--remote-ray", RAY]) == 1
    cap = capsys.readouterr()
    fleet = load_fleet(EXAMPLE)
    mini1 = agents.agent_for(fleet, fleet.host("mac-mini-1"), port=6379, ray=RAY)
    (token_argv, token_in), (inst_argv, inst_in), (down_argv, down_in) = fake.calls  # mac-mini-2: no 2nd step
    assert token_argv == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "mlx@mac-mini-1.local",
                          "mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token"]
    assert token_in == isolated.read_bytes()
    assert inst_argv[:6] == token_argv[:6] and inst_argv[6] == agents.install_script(mini1)
    assert inst_in == mini1.plist_bytes()
    installed = plistlib.loads(inst_in)
    assert installed["Label"] == "io.mlx-serving.ray.mac-mini-1" and installed["KeepAlive"] == {"SuccessfulExit": False}
    assert down_argv[5] == "mlx@mac-mini-2.local" and down_in == token_in
    assert ("mac-mini-1: ok: agent io.mlx-serving.ray.mac-mini-1 loaded; log "
            "/Users/mlx/Library/Logs/mlx-serving/ray-node.log") in cap.out
    assert ("mac-mini-2: FAILED: copying the token failed: exit 255: ssh: connect to host mac-mini-2.local port 22: "
            "Connection refused") in cap.err
    assert "1 of 2 Mac(s) failed: mac-mini-2" in cap.err

    # The Mac's own refusal (here: nobody logged in) comes back word for word; --host picks one Mac.
    fake = FakeSsh(fail_script={"mac-mini-2.local": (3, "mlx has no login session on this Mac")})
    monkeypatch.setattr(subprocess, "run", fake)
    assert main(["cluster", "install-agents", "--inventory", str(EXAMPLE), "--remote-ray", RAY,
                 "--host", "mac-mini-2"]) == 1
    assert {argv[5] for argv, _ in fake.calls} == {"mlx@mac-mini-2.local"}
    assert "mac-mini-2: FAILED: installing the agent failed: exit 3: mlx has no login session" in capsys.readouterr().err


def test_install_agents_needs_the_heads_token_and_dry_run_runs_nothing(
        isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSsh()
    monkeypatch.setattr(subprocess, "run", fake)
    assert main(["cluster", "install-agents", "--inventory", str(EXAMPLE), "--remote-ray", RAY, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"ssh mlx@mac-mini-1.local 'mkdir -p ~/.ray && umask 077 && cat > ~/.ray/auth_token' < {isolated}" in out
    assert "launchctl bootstrap gui/$(id -u) /Users/mlx/Library/LaunchAgents/io.mlx-serving.ray.mac-mini-2.plist' " \
           "< io.mlx-serving.ray.mac-mini-2.plist" in out
    isolated.unlink()  # no token made here: install-agents must not invent one the head does not have
    assert main(["cluster", "install-agents", "--inventory", str(EXAMPLE), "--remote-ray", RAY]) == 1
    assert f"no Ray token at {isolated}" in capsys.readouterr().err
    assert fake.calls == [] and not isolated.exists()


def test_uninstall_agents_boots_out_and_removes_and_reports_a_failing_host(
        isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSsh(down={"mac-mini-1.local"})
    monkeypatch.setattr(subprocess, "run", fake)
    assert main(["cluster", "uninstall-agents", "--inventory", str(EXAMPLE)]) == 1
    cap = capsys.readouterr()
    assert [argv[5] for argv, _ in fake.calls] == ["mlx@mac-mini-1.local", "mlx@mac-mini-2.local"]
    script = fake.calls[1][0][6]
    assert script == agents.uninstall_script("mac-mini-2")
    assert "launchctl bootout gui/$(id -u)/io.mlx-serving.ray.mac-mini-2" in script
    assert script.endswith("rm -f ~/Library/LaunchAgents/io.mlx-serving.ray.mac-mini-2.plist")
    assert "mac-mini-2: ok: agent io.mlx-serving.ray.mac-mini-2 unloaded and removed" in cap.out
    assert "mac-mini-1: FAILED: removing the agent failed: exit 255: ssh: connect to host" in cap.err
    assert main(["cluster", "uninstall-agents", "--inventory", str(EXAMPLE), "--host", "mac-studio-1"]) == 1
    assert "runs the Ray head" in capsys.readouterr().err


# --- the install shell itself, run for real with stand-in tools ----------------------------------------

LAUNCHCTL = """#!/bin/sh
echo "$*" >> "$STUB/log"
case "$1" in
  print) case "$2" in gui/*/*) [ -e "$STUB/loaded" ] ;; *) [ ! -e "$STUB/no-gui" ] ;; esac ;;
  bootout) [ -e "$STUB/loaded" ] || exit 3; rm "$STUB/loaded" ;;
  bootstrap) touch "$STUB/loaded" ;;
esac
"""


@pytest.fixture()
def mac(tmp_path: Path) -> dict[str, Any]:
    """A home with a `ray`, and stand-ins for launchctl and pgrep that keep their state in files."""
    home = tmp_path / "home"
    ray = home / "venv" / "bin" / "ray"
    ray.parent.mkdir(parents=True)
    ray.write_text("#!/bin/sh\n")
    ray.chmod(0o755)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "launchctl").write_text(LAUNCHCTL)
    (stub / "pgrep").write_text('#!/bin/sh\n[ -e "$STUB/raylet" ]\n')
    for tool in ("launchctl", "pgrep"):
        (stub / tool).chmod(0o755)
    fleet = load_fleet(EXAMPLE)
    agent = agents.agent_for(fleet, fleet.host("mac-mini-1"), port=6379, ray="~/venv/bin/ray", home=str(home))
    env = {"PATH": f"{stub}:/usr/bin:/bin", "HOME": str(home), "STUB": str(stub)}
    return {"home": home, "stub": stub, "agent": agent, "env": env}


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_install_shell_replaces_a_loaded_agent_and_refuses_what_would_break(mac: dict[str, Any], shell: str) -> None:
    a, stub, home = mac["agent"], mac["stub"], mac["home"]
    uid = os.getuid()

    def install(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([shell, "-c", agents.install_script(a)], input=a.plist_bytes(), capture_output=True,
                              env={**mac["env"], **env}, timeout=60)

    (stub / "loaded").touch()  # an older agent is loaded: booted out, waited for, replaced
    res = install()
    assert res.returncode == 0, res.stderr
    plist = home / "Library" / "LaunchAgents" / "io.mlx-serving.ray.mac-mini-1.plist"
    assert plist.read_bytes() == a.plist_bytes()
    assert (home / "Library" / "Logs" / "mlx-serving").is_dir()
    calls = (stub / "log").read_text().splitlines()
    service = f"gui/{uid}/io.mlx-serving.ray.mac-mini-1"
    assert calls == [f"bootout {service}", f"print {service}", f"print gui/{uid}", f"enable {service}",
                     f"bootstrap gui/{uid} {plist}"]

    plist.unlink()
    (stub / "log").unlink()
    (stub / "raylet").touch()  # a node `cluster up --ssh` started: two nodes for one host would be wrong
    res = install()
    assert res.returncode == 4 and "a Ray node not started by this agent runs here" in res.stderr.decode()
    assert not plist.exists() and "bootstrap" not in (stub / "log").read_text()
    (stub / "raylet").unlink()

    (stub / "no-gui").touch()  # nobody logged in: the plist waits for the next login, and the user is told
    res = install()
    assert res.returncode == 3 and "has no login session on this Mac" in res.stderr.decode()
    assert plist.read_bytes() == a.plist_bytes() and not (stub / "loaded").exists()
    (stub / "no-gui").unlink()
    plist.unlink()

    res = install(HOME=str(home.parent))
    assert res.returncode == 2 and f"not {home}: pass --remote-home" in res.stderr.decode()
    assert not plist.exists()

    (stub / "loaded").touch()
    res = subprocess.run([shell, "-c", agents.uninstall_script("mac-mini-1")], capture_output=True, env=mac["env"],
                         timeout=60)
    assert res.returncode == 0 and not (stub / "loaded").exists()
    plist.write_bytes(a.plist_bytes())
    res = subprocess.run([shell, "-c", agents.uninstall_script("mac-mini-1")], capture_output=True, env=mac["env"],
                         timeout=60)
    assert res.returncode == 0 and not plist.exists()  # not loaded any more: still removed
