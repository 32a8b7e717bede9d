"""Memory-aware placement of model replicas onto the fleet's Macs.

A replica needs its weights plus its KV cache budget in one host's unified memory; a host that
overcommits swaps or gets its process killed, so placement is a hard capacity problem, solved here
before anything starts. Replicas of one model go to distinct hosts where possible so that losing a
Mac never takes a model down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, computed_field

from cluster.inventory import GB, Fleet, ModelPlacementSpec
from engine.sources import HUB_ID

# The safetensors format caps the JSON header at 100 MB; a larger length means a corrupt file.
_MAX_HEADER = 100_000_000


class PlacementError(ValueError):
    """No assignment fits the fleet's memory under the spread and selector rules."""


class FootprintError(ValueError):
    """A model's weight size cannot be measured here."""


def safetensors_bytes(path: str | Path) -> int:
    """Bytes of tensor data in one safetensors file, read from its header alone."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FootprintError(f"{path}: too short to be a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > _MAX_HEADER or n > size - 8:
            raise FootprintError(f"{path}: header length {n} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FootprintError(f"{path}: header is not valid JSON ({err})") from None
    total, end = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FootprintError(f"{path}: tensor {name!r} has no valid data_offsets") from None
        total += stop - start
        end = max(end, stop)
    if end > size - 8 - n:  # an interrupted download keeps its header but loses data
        raise FootprintError(f"{path}: truncated (tensors end at byte {end} of a {size - 8 - n}-byte data section)")
    return total


def _hf_cache_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot directory of an already-downloaded hub model, so hub ids need no footprint_gb."""
    if os.environ.get("HF_HUB_CACHE"):
        cache = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        cache = Path(os.environ["HF_HOME"]) / "hub"
    else:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if revision is not None and (repo / "snapshots" / revision).is_dir():  # a commit hash
        return repo / "snapshots" / revision
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        return snap if snap.is_dir() else None
    if revision is not None:
        return None
    snaps = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    return snaps[0] if len(snaps) == 1 else None


def _weight_files(names: list[str]) -> list[str]:
    """``model*.safetensors`` when present, the files mlx-lm loads (a repository that also ships a
    ``consolidated.safetensors`` is not counted twice); otherwise every ``*.safetensors``."""
    safetensors = [n for n in names if n.endswith(".safetensors")]
    return [n for n in safetensors if Path(n).name.startswith("model")] or safetensors


def hub_weight_bytes(repo_id: str, revision: str | None = None) -> int:
    """Weight bytes of a hub model from its safetensors headers, read over the network (a few KB per
    file: no weights are downloaded). FootprintError offline or when the hub cannot say."""
    from huggingface_hub import constants, get_safetensors_metadata

    where = f"{repo_id!r}" + (f" at {revision!r}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        raise FootprintError(f"cannot measure {where}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             "set footprint_gb for this model")
    try:
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as e:  # noqa: BLE001 - unreachable hub, unknown repo, no safetensors
        raise FootprintError(f"cannot measure {where} from the hub ({type(e).__name__}: {e}); "
                             "set footprint_gb for this model") from e
    files = _weight_files(list(meta.files_metadata))
    return sum(t.data_offsets[1] - t.data_offsets[0] for f in files for t in meta.files_metadata[f].tensors.values())


def model_weight_bytes(source: str | Path, revision: str | None = None) -> int:
    """Bytes of weights a model holds, from safetensors headers (weights never load): a local
    directory, a hub model in the local cache, else the hub's own headers (``hub_weight_bytes``)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        if not HUB_ID.match(str(source)):
            raise FootprintError(f"cannot measure {str(source)!r} (missing directory); set footprint_gb for this model")
        snap = _hf_cache_snapshot(str(source), revision)
        if snap is None:
            return hub_weight_bytes(str(source), revision)
        path = snap
    files = [path / n for n in _weight_files(sorted(p.name for p in path.glob("*.safetensors")))]
    if not files:
        raise FootprintError(f"no *.safetensors files in {path}; set footprint_gb for this model")
    return sum(safetensors_bytes(f) for f in files)


class Assignment(BaseModel):
    model: str
    replica: int
    host: str
    footprint_gb: float


class HostUsage(BaseModel):
    host: str
    chip: str
    usable_gb: float
    used_gb: float
    replicas: list[str]

    @computed_field
    @property
    def free_gb(self) -> float:
        return self.usable_gb - self.used_gb


class Plan(BaseModel):
    """Where every replica runs and what each host has left."""

    head: str
    assignments: list[Assignment]
    hosts: list[HostUsage]

    def hosts_for(self, model: str) -> list[str]:
        """Hosts of ``model``'s replicas, in replica order."""
        found = sorted((a.replica, a.host) for a in self.assignments if a.model == model)
        if not found:
            raise KeyError(f"no model {model!r} in the plan")
        return [h for _, h in found]

    def as_table(self) -> str:
        head = ["HOST", "CHIP", "USABLE GB", "USED GB", "FREE GB", "REPLICAS"]
        rows = [
            [
                u.host + (" (head)" if u.host == self.head else ""),
                u.chip,
                f"{u.usable_gb:.1f}",
                f"{u.used_gb:.1f}",
                f"{u.free_gb:.1f}",
                ", ".join(u.replicas) or "-",
            ]
            for u in self.hosts
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        numeric = {2, 3, 4}

        def line(cells: list[str]) -> str:
            parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
            return "  ".join(parts).rstrip()

        return "\n".join([line(head), *(line(r) for r in rows)])


@dataclass(frozen=True)
class _Need:
    model: str
    footprint: int
    hosts: tuple[int, ...]  # eligible host indices, fleet order
    replicas: int

    @property
    def distinct(self) -> bool:
        return self.replicas <= len(self.hosts)


def _footprint(fleet: Fleet, spec: ModelPlacementSpec, weight_bytes: Callable[..., int]) -> int:
    if spec.footprint_gb is not None:
        weights = int(spec.footprint_gb * GB)
    else:
        try:
            revision = spec.deployment.get("revision")
            weights = weight_bytes(spec.source, revision) if revision else weight_bytes(spec.source)
        except (FootprintError, OSError) as err:
            raise PlacementError(f"model {spec.name!r}: {err}") from err
    return weights + int(fleet.kv_cache_gb(spec) * GB)


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def _needs(fleet: Fleet, weight_bytes: Callable[..., int]) -> list[_Need]:
    needs = []
    for spec in fleet.models:
        eligible = tuple(i for i, h in enumerate(fleet.hosts) if spec.selects(h))
        if not eligible:
            raise PlacementError(
                f"model {spec.name!r} selects no host (hosts={spec.hosts}, host_labels={spec.host_labels})"
            )
        fp = _footprint(fleet, spec, weight_bytes)
        biggest = max(eligible, key=lambda i: (fleet.hosts[i].usable_bytes, -i))
        cap = fleet.hosts[biggest].usable_bytes
        if fp > cap:
            raise PlacementError(
                f"model {spec.name!r} needs {_gb(fp)} per replica; largest eligible host "
                f"{fleet.hosts[biggest].name!r} has {_gb(cap)} usable (shortfall {_gb(fp - cap)})"
            )
        needs.append(_Need(spec.name, fp, eligible, spec.replicas))
    # Decreasing footprint: big replicas claim the big hosts before small ones fragment them.
    needs.sort(key=lambda n: (-n.footprint, n.model))
    return needs


class _Search:
    """Depth-first search whose first path is first-fit-decreasing; it backtracks only when that fails."""

    def __init__(self, fleet: Fleet, needs: list[_Need], max_steps: int) -> None:
        self.fleet = fleet
        self.slots = [(n, r) for n in needs for r in range(n.replicas)]
        self.free = [h.usable_bytes for h in fleet.hosts]
        self.count: dict[str, list[int]] = {n.model: [0] * len(fleet.hosts) for n in needs}
        self.chosen: list[int] = []
        self.steps = 0
        self.max_steps = max_steps
        self.first_failure: str | None = None

    def candidates(self, need: _Need, replica: int) -> list[int]:
        count = self.count[need.model]
        fits = [i for i in need.hosts if self.free[i] >= need.footprint]
        if need.distinct:
            # Replicas are interchangeable: only ascending host indices, so each host set is tried once.
            last = self.chosen[-1] if replica > 0 else -1
            return [i for i in fits if count[i] == 0 and i > last]
        return sorted(fits, key=lambda i: (count[i], i))

    def describe_failure(self, need: _Need, replica: int) -> str:
        pool = [i for i in need.hosts if not need.distinct or self.count[need.model][i] == 0]
        best = max(pool, key=lambda i: (self.free[i], -i))
        where = "largest free host" + (" without a replica of it" if need.distinct and replica else "")
        where += f" {self.fleet.hosts[best].name!r}"
        return (
            f"model {need.model!r} needs {_gb(need.footprint)} per replica (replica {replica + 1} of {need.replicas}); "
            f"{where} has {_gb(max(self.free[best], 0))} (shortfall {_gb(need.footprint - self.free[best])})"
        )

    def run(self, k: int = 0) -> bool:
        if k == len(self.slots):
            return True
        self.steps += 1
        if self.steps > self.max_steps:
            return False
        need, replica = self.slots[k]
        options = self.candidates(need, replica)
        if not options and self.first_failure is None:
            self.first_failure = self.describe_failure(need, replica)
        for i in options:
            self.free[i] -= need.footprint
            self.count[need.model][i] += 1
            self.chosen.append(i)
            if self.run(k + 1):
                return True
            self.chosen.pop()
            self.count[need.model][i] -= 1
            self.free[i] += need.footprint
        return False


def plan(fleet: Fleet, *, weight_bytes: Callable[..., int] = model_weight_bytes, max_steps: int = 100_000) -> Plan:
    """Assign every replica to a host without exceeding any host's usable memory.

    Hosts are tried in fleet-file order (list preferred hosts first), models in decreasing footprint.
    Local sources are measured on this machine; every host must hold the model at the same path.
    Raises ``PlacementError`` naming the model and the shortfall when nothing fits.
    """
    needs = _needs(fleet, weight_bytes)
    search = _Search(fleet, needs, max_steps)
    if not search.run():
        reason = search.first_failure or "no assignment found"
        if search.steps > max_steps:
            reason += f" (search stopped after {max_steps} steps; a different host order may fit)"
        raise PlacementError(reason)

    assignments = [
        Assignment(model=need.model, replica=r, host=fleet.hosts[i].name, footprint_gb=need.footprint / GB)
        for (need, r), i in zip(search.slots, search.chosen)
    ]
    usage = []
    for i, h in enumerate(fleet.hosts):
        mine = [a for a in assignments if a.host == h.name]
        used = sum(n.footprint for (n, _), j in zip(search.slots, search.chosen) if j == i)
        usage.append(HostUsage(
            host=h.name, chip=h.chip, usable_gb=h.usable_gb, used_gb=used / GB,
            replicas=[f"{a.model}#{a.replica}" for a in mine],
        ))
    return Plan(head=fleet.head, assignments=assignments, hosts=usage)
