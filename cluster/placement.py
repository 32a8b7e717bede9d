"""Memory-aware placement of model replicas onto the fleet's Macs.

A replica needs its weights plus its KV cache budget in one host's unified memory; a host that
overcommits swaps or gets its process killed, so placement is a hard capacity problem, solved here
before anything starts. Replicas of one model go to distinct hosts where possible so that losing a
Mac never takes a model down. A model too big for any one host runs as one sharded replica whose
hosts each hold an even share of it (engine/shard.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from annotated_types import MaxLen, MinLen
from pydantic import BaseModel, Field, ValidationError, computed_field

from cluster.inventory import GB, Fleet, ModelPlacementSpec
from deployments.config import ShardConfig
from engine.distributed import ShardMode
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
    """One replica on one host; a sharded replica has one assignment per host, each with its share."""

    model: str
    replica: int
    host: str
    footprint_gb: float = Field(description="Memory the replica takes on this host (a sharded one: its share).")
    shard_hosts: list[str] = Field(
        default_factory=list, description="A sharded replica's hosts in rank order (rank 0 first); empty otherwise.")
    shard_mode: ShardMode | None = None

    @property
    def rank(self) -> int | None:
        return self.shard_hosts.index(self.host) if self.shard_hosts else None

    @property
    def label(self) -> str:
        """How the host table names it: ``m#0``, or ``m#0 (rank 1 of 2)`` for a share of a sharded replica."""
        tag = f"{self.model}#{self.replica}"
        return tag if not self.shard_hosts else f"{tag} (rank {self.rank} of {len(self.shard_hosts)})"


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
    notes: list[str] = Field(default_factory=list, description="What the planner assumed, e.g. a shard mode unchecked.")

    def hosts_for(self, model: str) -> list[str]:
        """Hosts of ``model``'s replicas, in replica order (a sharded model's: in rank order)."""
        sharded = self.shard_of(model)
        if sharded is not None:
            return list(sharded.shard_hosts)
        found = sorted((a.replica, a.host) for a in self.assignments if a.model == model)
        if not found:
            raise KeyError(f"no model {model!r} in the plan")
        return [h for _, h in found]

    def shard_of(self, model: str) -> Assignment | None:
        """Rank 0's assignment of a sharded model (its hosts, mode and per-host footprint); None otherwise."""
        return next((a for a in self.assignments if a.model == model and a.rank == 0), None)

    def shard_lines(self) -> list[str]:
        """``big  sharded (pipeline) across studio-1, studio-2  24.0 GB per host``, one per sharded model."""
        rows = [[a.model, f"sharded ({a.shard_mode}) across {', '.join(a.shard_hosts)}",
                 f"{a.footprint_gb:.1f} GB per host"] for a in self.assignments if a.rank == 0]
        widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    def as_table(self) -> str:
        """The hosts' memory, then the sharded models and the planner's notes (if any)."""
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

        extra = self.shard_lines() + [f"note: {n}" for n in self.notes]
        return "\n".join([line(head), *(line(r) for r in rows), *([""] + extra if extra else [])])


@dataclass(frozen=True)
class _Need:
    model: str
    footprint: int
    hosts: tuple[int, ...]  # eligible host indices, fleet order
    replicas: int

    @property
    def distinct(self) -> bool:
        return self.replicas <= len(self.hosts)


@dataclass(frozen=True)
class _Shard:
    """A model served as one replica across hosts: its total footprint, split evenly over them."""

    spec: ModelPlacementSpec
    footprint: int  # weights + KV budget, all hosts together
    hosts: tuple[int, ...]  # eligible host indices, fleet order; ``spec.shard.hosts`` when given


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


def _needs(fleet: Fleet, weight_bytes: Callable[..., int]) -> tuple[list[_Need], list[_Shard]]:
    """Single-host needs (decreasing footprint) and the models to shard: those asking for it, and those
    that fit on no eligible host."""
    needs, shards = [], []
    for spec in fleet.models:
        eligible = tuple(i for i, h in enumerate(fleet.hosts) if spec.selects(h))
        if not eligible:
            raise PlacementError(
                f"model {spec.name!r} selects no host (hosts={spec.hosts}, host_labels={spec.host_labels})"
            )
        fp = _footprint(fleet, spec, weight_bytes)
        if spec.shard is not None:
            shards.append(_Shard(spec, fp, _shard_hosts_given(fleet, spec, eligible)))
            continue
        biggest = max(eligible, key=lambda i: (fleet.hosts[i].usable_bytes, -i))
        cap = fleet.hosts[biggest].usable_bytes
        if fp > cap:
            too_big = (f"model {spec.name!r} needs {_gb(fp)} per replica; largest eligible host "
                       f"{fleet.hosts[biggest].name!r} has {_gb(cap)} usable (shortfall {_gb(fp - cap)})")
            if len(eligible) < _SHARD_MIN:
                raise PlacementError(too_big)
            if spec.replicas != 1:
                raise PlacementError(f"{too_big}; sharded across hosts it would run as one replica: set replicas: 1")
            shards.append(_Shard(spec, fp, eligible))
            continue
        needs.append(_Need(spec.name, fp, eligible, spec.replicas))
    # Decreasing footprint: big replicas claim the big hosts before small ones fragment them.
    needs.sort(key=lambda n: (-n.footprint, n.model))
    return needs, shards


# -- sharded models ---------------------------------------------------------------------------------

def _hosts_bound(kind: type, attr: str) -> int:
    """A bound of ShardConfig.hosts, read from its declaration (declared there once)."""
    return next(getattr(m, attr) for m in ShardConfig.model_fields["hosts"].metadata if isinstance(m, kind))


_SHARD_MIN, _SHARD_MAX = _hosts_bound(MinLen, "min_length"), _hosts_bound(MaxLen, "max_length")


def _shard_hosts_given(fleet: Fleet, spec: ModelPlacementSpec, eligible: tuple[int, ...]) -> tuple[int, ...]:
    """``spec.shard.hosts`` as host indices in rank order, each allowed by the model's constraints;
    ``eligible`` when the planner is to choose."""
    assert spec.shard is not None
    if spec.shard.hosts is None:
        if len(eligible) < _SHARD_MIN:
            raise PlacementError(f"model {spec.name!r} asks to be sharded, but only {len(eligible)} host selects it "
                                 f"(hosts={spec.hosts}, host_labels={spec.host_labels}); a shard needs {_SHARD_MIN}")
        return eligible
    index = {h.name: i for i, h in enumerate(fleet.hosts)}
    for name in spec.shard.hosts:
        if index[name] not in eligible:
            raise PlacementError(f"model {spec.name!r}: shard host {name!r} is not allowed by the model's hosts / "
                                 f"host_labels (hosts={spec.hosts}, host_labels={spec.host_labels})")
    return tuple(index[name] for name in spec.shard.hosts)


def _share(footprint: int, hosts: int) -> int:
    """Each host's share: weights and KV budget split evenly (layers in pipeline mode, slices of each
    layer in tensor mode), rounded up to a byte."""
    return -(-footprint // hosts)


def _choose_hosts(fleet: Fleet, shard: _Shard, free: list[int]) -> tuple[int, ...]:
    """The fewest eligible hosts whose free memory holds an even share each, largest first (ties by name)."""
    order = sorted(shard.hosts, key=lambda i: (-free[i], fleet.hosts[i].name))
    counts = range(_SHARD_MIN, min(_SHARD_MAX, len(order)) + 1)
    for k in counts:
        if free[order[k - 1]] >= _share(shard.footprint, k):
            return tuple(order[:k])
    name, total = shard.spec.name, sum(max(free[i], 0) for i in order[:_SHARD_MAX])
    if total < shard.footprint:
        biggest = "all" if len(order) <= _SHARD_MAX else f"the {_SHARD_MAX} largest of the"
        raise PlacementError(f"model {name!r} needs {_gb(shard.footprint)}: even {biggest} {len(order)} eligible hosts "
                             f"together have {_gb(total)} (shortfall {_gb(shard.footprint - total)})")
    k = min(counts, key=lambda k: (_share(shard.footprint, k) - free[order[k - 1]], k))
    short = fleet.hosts[order[k - 1]]
    share, has = _share(shard.footprint, k), free[order[k - 1]]
    raise PlacementError(f"model {name!r} needs {_gb(shard.footprint)} and no even split over its eligible hosts "
                         f"holds it: over {k} hosts it needs {_gb(share)} per host, but {short.name!r} has "
                         f"{_gb(max(has, 0))} (shortfall {_gb(share - has)})")


def _shard_mode(spec: ModelPlacementSpec) -> tuple[ShardMode, str | None]:
    """The spec's mode (checked against the architecture where it is here), else pipeline where the
    architecture offers it, else tensor; ``(mode, note)``."""
    from . import shard_modes

    revision = spec.deployment.get("revision")
    if spec.shard is not None and "mode" in spec.shard.model_fields_set:
        arch = shard_modes.architecture(spec.source, revision)
        problem = None if arch is None else shard_modes.mode_problem(spec.source, arch, spec.shard.mode)
        if problem:
            raise PlacementError(f"model {spec.name!r}: shard.mode: {problem}")
        return spec.shard.mode, None
    try:
        mode, note = shard_modes.pick_mode(spec.source, revision)
    except ValueError as e:
        raise PlacementError(f"model {spec.name!r} cannot be sharded: {e}") from None
    return mode, None if note is None else f"model {spec.name!r}: {note}"


def shard_config(spec: ModelPlacementSpec, hosts: list[str], mode: ShardMode) -> ShardConfig:
    """The Serve config's ``shard:`` of a planned sharded model: its hosts and mode, and those of the
    spec's settings that it sets (addresses and RDMA devices of the chosen hosts only)."""
    given = spec.shard.model_dump(exclude_unset=True, exclude={"hosts", "mode"}) if spec.shard is not None else {}
    if "addresses" in given:
        given["addresses"] = {h: a for h, a in given["addresses"].items() if h in hosts}
    if "rdma_devices" in given:
        given["rdma_devices"] = {h: {o: d for o, d in links.items() if o in hosts}
                                 for h, links in given["rdma_devices"].items() if h in hosts}
    try:
        return ShardConfig.model_validate({"hosts": hosts, "mode": mode, **given})
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise PlacementError(f"model {spec.name!r} sharded across {', '.join(hosts)}: {msgs}") from None


def _place_shards(fleet: Fleet, shards: list[_Shard], free: list[int]) -> list[tuple[_Shard, tuple[int, ...]]]:
    """Take each sharded model's share from its hosts' ``free`` memory: given hosts first, then the
    chosen ones, largest model first. Hosts in rank order (chosen ones are reordered by ``_rank_order``)."""
    placed = []
    for shard in sorted(shards, key=lambda s: (s.spec.shard is None or s.spec.shard.hosts is None, -s.footprint,
                                               s.spec.name)):
        given = shard.spec.shard is not None and shard.spec.shard.hosts is not None
        hosts = shard.hosts if given else _choose_hosts(fleet, shard, free)
        share = _share(shard.footprint, len(hosts))
        for i in hosts:
            if free[i] < share:
                h = fleet.hosts[i]
                left = "usable" if free[i] == h.usable_bytes else "free after the models placed before it"
                raise PlacementError(
                    f"model {shard.spec.name!r} sharded across {', '.join(fleet.hosts[j].name for j in hosts)} needs "
                    f"{_gb(share)} per host ({_gb(shard.footprint)} / {len(hosts)}); host {h.name!r} has "
                    f"{_gb(max(free[i], 0))} {left} (shortfall {_gb(share - free[i])})")
        for i in hosts:
            free[i] -= share
        placed.append((shard, hosts))
    return placed


def _rank_order(fleet: Fleet, hosts: tuple[int, ...], free: list[int]) -> tuple[int, ...]:
    """Chosen hosts with rank 0 (which also runs the engine) on the one with most free memory left,
    the head when tied; the others keep their order."""
    head = next(i for i, h in enumerate(fleet.hosts) if h.name == fleet.head)
    first = min(hosts, key=lambda i: (-free[i], i != head, hosts.index(i)))
    return (first, *(i for i in hosts if i != first))


# -- single-host replicas ---------------------------------------------------------------------------

class _Search:
    """Depth-first search whose first path is first-fit-decreasing; it backtracks only when that fails."""

    def __init__(self, fleet: Fleet, needs: list[_Need], max_steps: int, free: list[int]) -> None:
        self.fleet = fleet
        self.slots = [(n, r) for n in needs for r in range(n.replicas)]
        self.free = free
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

    Sharded models are placed first: on their ``shard.hosts``, or on the fewest eligible hosts that
    hold an even share each, largest first; a model that fits on no single eligible host is sharded
    too. Then single-host replicas: hosts tried in fleet-file order (list preferred hosts first),
    models in decreasing footprint. Local sources are measured on this machine; every host must hold
    the model at the same path. Raises ``PlacementError`` naming the model and the shortfall when
    nothing fits.
    """
    needs, shards = _needs(fleet, weight_bytes)
    modes = {s.spec.name: _shard_mode(s.spec) for s in shards}
    free = [h.usable_bytes for h in fleet.hosts]
    placed = _place_shards(fleet, shards, free)
    search = _Search(fleet, needs, max_steps, free)
    if not search.run():
        reason = search.first_failure or "no assignment found"
        if search.steps > max_steps:
            reason += f" (search stopped after {max_steps} steps; a different host order may fit)"
        raise PlacementError(reason)

    assignments, notes = [], []
    for shard, hosts in placed:
        if shard.spec.shard is None or shard.spec.shard.hosts is None:
            hosts = _rank_order(fleet, hosts, free)
        mode, note = modes[shard.spec.name]
        names = [fleet.hosts[i].name for i in hosts]
        shard_config(shard.spec, names, mode)  # addresses, RDMA devices of the chosen hosts: checked now
        notes += [note] if note else []
        assignments += [Assignment(model=shard.spec.name, replica=0, host=name, shard_hosts=names, shard_mode=mode,
                                   footprint_gb=_share(shard.footprint, len(hosts)) / GB) for name in names]
    assignments += [
        Assignment(model=need.model, replica=r, host=fleet.hosts[i].name, footprint_gb=need.footprint / GB)
        for (need, r), i in zip(search.slots, search.chosen)
    ]
    usage = [
        HostUsage(host=h.name, chip=h.chip, usable_gb=h.usable_gb, used_gb=(h.usable_bytes - free[i]) / GB,
                  replicas=[a.label for a in assignments if a.host == h.name])
        for i, h in enumerate(fleet.hosts)
    ]
    return Plan(head=fleet.head, assignments=assignments, hosts=usage, notes=notes)
