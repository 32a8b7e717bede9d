"""Where the CPU goes during a phase: CPU seconds per process role, from the OS's own counters.

On a small machine the model competes with Ray's processes (raylet, GCS, the Serve controller and
proxy) and with our own deployments (ingress, router). A phase's ``cpu`` entry names each role with
the CPU seconds its processes used, and its share of the phase's wall time (1.0 = one core busy).
Run it alone to watch a cluster under your own load::

    python loadtests/proc_cpu.py --seconds 30

Processes are told apart by their titles (Ray sets ``ray::ServeReplica:<app>:<deployment>`` and the
like). Every process of this user is counted; one that fits no role shows as ``other: <program>``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_SERVE_REPLICA = re.compile(r"ray::ServeReplica:[^:\s]+:([^\s.]+)")  # Ray appends ".<method>" while busy
_NAMED = (  # (substring of the command line, role); the first match wins
    ("ray::ServeController", "serve controller"),
    ("ray::ProxyActor", "serve proxy"),
    ("gcs_server", "ray gcs"),
    ("raylet", "raylet"),
    ("dashboard/agent.py", "ray dashboard agent"),
    ("dashboard.py", "ray dashboard"),
    ("ray-dashboard-", "ray dashboard"),  # the dashboard's head modules, each a process
    ("log_monitor.py", "ray log monitor"),
    ("monitor.py", "ray monitor"),
    ("runtime_env/agent", "ray runtime env agent"),
    ("ray::IDLE", "ray idle workers"),
    ("mlx_lm server", "mlx_lm.server"),
    ("mlx_lm.server", "mlx_lm.server"),
)


def role(cmdline: str, pid: int, own_pid: int) -> str:
    if pid == own_pid:
        return "bench process (clients, in-process engine)"
    m = _SERVE_REPLICA.search(cmdline)
    if m:
        return f"serve replica {m.group(1)}"
    for needle, name in _NAMED:
        if needle in cmdline:
            return name
    if cmdline.startswith("ray::"):
        return "ray worker " + cmdline.split()[0][5:]
    return "other: " + (os.path.basename(cmdline.split()[0]) if cmdline.strip() else "?")


def snapshot() -> dict[int, tuple[str, float]]:
    """Every process of this user: pid -> (role, user + system CPU seconds so far)."""
    own, uid = os.getpid(), os.getuid()
    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != uid:
                continue
            t = p.cpu_times()
            out[p.pid] = (role(" ".join(p.info["cmdline"] or []), p.pid, own), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


class PhaseCpu:
    """``start()`` before a phase, ``stop()`` after: CPU seconds per role in between. A process that
    started during the phase counts in full; one that ended is lost (the OS forgot its counters)."""

    def start(self) -> None:
        self.t0, self.before = time.perf_counter(), snapshot()

    def stop(self) -> dict[str, Any]:
        wall, after = time.perf_counter() - self.t0, snapshot()
        by_role: dict[str, float] = {}
        for pid, (name, cpu) in after.items():
            used = cpu - self.before.get(pid, (name, 0.0))[1]
            if used > 0:
                by_role[name] = by_role.get(name, 0.0) + used
        total = sum(by_role.values())
        return {
            "wall_s": round(wall, 3), "total_cpu_s": round(total, 3),
            "cores_busy": round(total / wall, 3) if wall else None,
            "by_role": {k: {"cpu_s": round(v, 3), "cores": round(v / wall, 3) if wall else None}
                        for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
        }


def busiest(cpu: dict[str, Any], n: int = 6) -> str:
    """A phase's ``n`` busiest roles, as cores: ``"serve replica model-bench 1.78, ..."``."""
    return ", ".join(f"{k} {v['cores']:.2f}" for k, v in list(cpu["by_role"].items())[:n])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU per process role over a time window (this user's processes)")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--json", help="also write the result as JSON here")
    a = p.parse_args(argv)
    cpu = PhaseCpu()
    cpu.start()
    time.sleep(a.seconds)
    out = cpu.stop()
    if a.json:
        from loadtests.common import machine_info, write_json

        write_json(a.json, {"benchmark": "proc_cpu", "machine": machine_info(), "window_s": a.seconds, **out})
    print(f"{out['cores_busy']:.2f} cores busy over {out['wall_s']:.0f} s")
    for name, v in out["by_role"].items():
        print(f"  {v['cores']:6.3f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
