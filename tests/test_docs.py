"""The docs guard: the shell blocks of README.md, docs/ and loadtests/README.md as a reader copies them.

Every ``mlx-serving`` command in them must parse with the real CLI, every benchmark command with its
script's own parser, and every repository file they name must exist (or be made earlier on the same
page). Blocks marked ``<!-- guard: run -->`` are run, in order, in a shell with a fresh HOME against
the cluster they start themselves (tests/docs_blocks.py says how blocks are marked).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import build_parser
from conftest import kill_processes_naming
from docs_blocks import ROOT, blocks, segments

DOCS = ["README.md", "loadtests/README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
REPO_PATH = re.compile(r"^(?:\./)?((?:config|docs|loadtests|deployments|engine|cluster)/[\w./-]*\w)$")
MAKES = {"--emit-config", "--json", "--write-agents", ">", "-o"}  # the next word is a file the command makes


def _parses(parse, argv: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def _script_parser(path: str):
    if not path.startswith("loadtests/"):
        return None
    module = importlib.import_module(path[:-3].replace("/", "."))
    return getattr(module, "parse_args", None)


def problems(doc: str) -> list[str]:
    parser = build_parser()
    found: list[str] = []
    made: set[str] = set()
    for b in blocks(doc):
        for command in b.commands:
            for argv in segments(command):
                made.update(argv[i + 1] for i, a in enumerate(argv[:-1]) if a in MAKES)
                if argv[0] == "cp" and len(argv) == 3:
                    made.add(argv[2])
                if argv[0] == "mlx-serving":
                    if (err := _parses(parser.parse_args, argv[1:])) is not None:
                        found.append(f"{b.where}: `{' '.join(argv)}`: {err}")
                elif argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
                    if not (ROOT / argv[1]).is_file():
                        found.append(f"{b.where}: `{' '.join(argv)}`: no file {argv[1]}")
                    elif (parse := _script_parser(argv[1])) and (err := _parses(parse, argv[2:])) is not None:
                        found.append(f"{b.where}: `{' '.join(argv)}`: {err}")
                for word in argv:
                    m = REPO_PATH.match(word)
                    if m and not (ROOT / m.group(1)).exists() and m.group(1) not in made and word not in made:
                        found.append(f"{b.where}: `{' '.join(argv)}`: no {m.group(1)} in the repository")
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_in_the_docs_parses_and_every_file_exists(doc: str) -> None:
    assert problems(doc) == []


def test_the_guard_finds_drift() -> None:
    """The check itself can fail: a flag that does not exist, a file that does not."""
    from docs_blocks import Block, _commands

    parser = build_parser()
    assert _parses(parser.parse_args, ["up", "--prot", "8100"]) is not None
    assert _parses(parser.parse_args, ["up", "--port", "8100"]) is None
    assert _commands("console", ["$ mlx-serving plan \\", "  config/fleet.sim.yaml", "HOST ..."]) == [
        "mlx-serving plan config/fleet.sim.yaml"]
    assert segments("RAY_AUTH_MODE=token serve status && mlx-serving down | tee x") == [
        ["serve", "status"], ["mlx-serving", "down"], ["tee", "x"]]
    assert Block("d", 1, "bash", []).where == "d:1"


# -- the walkthroughs, run ------------------------------------------------------------------------

RUN_DOCS = [d for d in DOCS if any(b.mark == "run" for b in blocks(d))]
CLEANUP = ["mlx-serving down", "mlx-serving cluster down"]  # whatever a failed walkthrough left running
STEP_TIMEOUT_S = 600


def _fresh_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """A new user's shell: their own HOME, this checkout's `mlx-serving` on PATH, no setting of ours
    (the test session's cache, Ray address and switches) and a Ray temp dir apart from the session's."""
    drop = ("MLX_SERVING_CACHE", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MLX_SERVING_API_KEYS", "MLX_SERVING_ADMIN_KEYS", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def _run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=STEP_TIMEOUT_S)


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_the_walkthroughs_run_as_written(doc: str, tmp_path: Path, ray_cluster: Any) -> None:
    """Each ``guard: run`` block of the page, in order, as a new user on this machine would type it.
    (``ray_cluster``: the session's own Ray is up meanwhile, as a user's other Ray might be.)"""
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="mlxg-", dir="/tmp"))  # Ray's socket paths must stay short
    env = _fresh_env(home, ray_tmp)
    transcript: list[str] = []
    try:
        for b in (b for b in blocks(doc) if b.mark == "run"):
            if b.lang == "python":
                script = tmp_path / f"block-{b.line}.py"
                script.write_text("\n".join(b.lines) + "\n")
                steps = [f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"]
            else:
                steps = b.commands
            for command in steps:
                done = _run(command, env, ROOT)
                transcript.append(f"$ {command}\n{done.stdout}{done.stderr}")
                assert done.returncode == 0, (f"{b.where}: `{command}` exited {done.returncode}:\n"
                                              + "\n".join(transcript[-3:])[-6000:])
    finally:
        for command in CLEANUP:
            try:
                _run(command, env, ROOT)
            except subprocess.TimeoutExpired:
                pass
        own = [a[i + 1] for b in blocks(doc) if b.mark == "run" for c in b.commands for a in segments(c)
               for i, w in enumerate(a[:-1]) if w == "--temp-dir"]  # simulated hosts' own Ray dirs
        for d in [ray_tmp, *map(Path, own)]:
            kill_processes_naming(d)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (tmp_path / "transcript.txt").write_text("\n".join(transcript))
