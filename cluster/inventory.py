"""Fleet inventory: which Macs exist, how much memory each may give to models, which models to run.

The file is plain YAML validated by pydantic. Loading reports every problem at once, each with its
path in the file (``models.1.hosts.0: unknown host 'mac-9'``), because an operator fixing a fleet
file one error per run is an operator wasting an afternoon.

Memory sizes are in GB of 2**30 bytes, the unit macOS uses for unified memory ("192 GB").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.config import ShardConfig, check_hosts

GB = 2**30

# Ray node labels follow Kubernetes label-value syntax; a host name is used as one (``host=<name>``)
# and as a custom resource name, so it must be valid there.
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$")
# Set by the cluster tooling from the host name; a user value would break replica pinning.
RESERVED_LABEL = "host"
# Fields of a model's Serve deployment that the placement plan decides (cluster/pins.py).
PLANNED_FIELDS = frozenset({"name", "source", "num_replicas", "autoscaling_config", "hosts", "fallback_hosts",
                            "max_replicas_per_node", "memory_gb", "shard"})


def _check_label(value: str, what: str) -> str:
    if not _LABEL_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is not label-safe: use 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return value


class Host(BaseModel):
    """One Mac. Only ``usable_gb`` of its unified memory is offered to model replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Label-safe id; becomes the Ray node label host=<name>.")
    address: str = Field(description="Host name or IP address the cluster tooling reaches it at.")
    chip: str = Field(min_length=1, description='Apple Silicon chip, e.g. "M2 Ultra".')
    memory_gb: float = Field(gt=0, description="Unified memory in GB.")
    # macOS keeps part of unified memory for itself; MLX's recommended wired limit is about 75%.
    usable_fraction: float = Field(default=0.75, gt=0, le=1)
    reserved_gb: float = Field(default=0.0, ge=0, description="Held back for Ray, the OS and other work.")
    labels: dict[str, str] = Field(default_factory=dict)
    ssh_user: str | None = None

    @field_validator("name")
    @classmethod
    def _name_label_safe(cls, v: str) -> str:
        return _check_label(v, "host name")

    @field_validator("address")
    @classmethod
    def _address_valid(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        if not _HOSTNAME_RE.match(v):
            raise ValueError(f"address {v!r} is neither an IP address nor a valid host name")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, v: dict[str, str]) -> dict[str, str]:
        if RESERVED_LABEL in v:
            raise ValueError(f"label {RESERVED_LABEL!r} is reserved: it is set to the host name automatically")
        for key, value in v.items():
            _check_label(key, "label key")
            _check_label(value, f"label {key!r} value")
        return v

    @model_validator(mode="after")
    def _some_memory_left(self) -> Host:
        if self.usable_gb <= 0:
            raise ValueError(
                f"no usable memory: {self.memory_gb} GB x {self.usable_fraction} - reserved {self.reserved_gb} GB "
                f"= {self.usable_gb:.1f} GB"
            )
        return self

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_gb * self.usable_fraction * GB) - int(self.reserved_gb * GB)

    @property
    def usable_gb(self) -> float:
        return self.usable_bytes / GB

    def ray_labels(self) -> dict[str, str]:
        """Labels for ``ray start --labels``: the pinning label plus the user's."""
        return {RESERVED_LABEL: self.name, **self.labels}


_SHARD_HOSTS = ShardConfig.model_fields["hosts"]


class FleetShard(ShardConfig):
    """A fleet model's ``shard:``: the Serve config's ShardConfig with ``hosts`` optional; without them
    the planner chooses the hosts (cluster/placement.py) and, unless ``mode`` is given, the mode."""

    hosts: Annotated[(_SHARD_HOSTS.annotation, *_SHARD_HOSTS.metadata)] | None = Field(  # type: ignore[valid-type]
        None, description=f"{_SHARD_HOSTS.description} Default: the fewest hosts that hold the model.")

    @field_validator("hosts")
    @classmethod
    def _hosts_ok(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else check_hosts(v)

    @model_validator(mode="after")
    def _references(self) -> FleetShard:
        # Without hosts, addresses and rdma_devices may name any host of the fleet (reference_problems);
        # the planner keeps those of the hosts it chooses and checks them as a ShardConfig.
        return self if self.hosts is None else super()._references()


class ModelPlacementSpec(BaseModel):
    """How many replicas of a model to run and where they may go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^\S+$")
    source: str = Field(min_length=1, description="Local model directory or Hugging Face hub id.")
    replicas: int = Field(default=1, ge=1)
    hosts: list[str] | None = Field(default=None, min_length=1, description="Allow-list of host names.")
    host_labels: dict[str, str] = Field(default_factory=dict, description="Every label must match.")
    footprint_gb: float | None = Field(
        default=None, gt=0,
        description="Weights in GB, instead of measuring the safetensors files; the KV budget is added.",
    )
    kv_cache_gb: float | None = Field(default=None, ge=0, description="KV cache budget per replica.")
    shard: FleetShard | None = Field(
        default=None,
        description="Run one replica across several hosts, each holding a shard (a model no single host can "
                    "hold). A model that fits on no eligible host is sharded without it.",
    )
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="More fields of the model's Serve deployment (engine, num_cpus, max_ongoing_requests, ...); "
                    "the placement fields come from the plan.",
    )

    @field_validator("deployment")
    @classmethod
    def _no_placement_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(v) & PLANNED_FIELDS)
        if taken:
            verb = "is" if len(taken) == 1 else "are"
            raise ValueError(f"{', '.join(taken)} {verb} set from the plan; use replicas, hosts, host_labels and "
                             "shard instead")
        return v

    @model_validator(mode="after")
    def _one_sharded_replica(self) -> ModelPlacementSpec:
        if self.shard is not None and self.replicas != 1:
            raise ValueError("a sharded model has one replica (replicas: 1): it already spans its hosts")
        return self

    def selects(self, host: Host) -> bool:
        """Whether ``host`` passes both the allow-list and the label selector."""
        if self.hosts is not None and host.name not in self.hosts:
            return False
        return all(host.labels.get(k) == v for k, v in self.host_labels.items())


class Fleet(BaseModel):
    """The whole inventory. Cross-references (head, allow-lists, selectors) are checked here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: list[Host] = Field(min_length=1)
    head: str = Field(description="Name of the host that runs the Ray head.")
    default_kv_cache_gb: float = Field(default=1.0, ge=0)
    models: list[ModelPlacementSpec] = Field(default_factory=list)
    app: dict[str, Any] = Field(
        default_factory=dict,
        description="More arguments of the Serve application (auth, limits, ...) for the config made from the plan.",
    )

    @field_validator("app")
    @classmethod
    def _app_without_models(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "models" in v:
            raise ValueError("models come from the fleet's `models:` list, not from `app`")
        return v

    @model_validator(mode="after")
    def _references_resolve(self) -> Fleet:
        problems = reference_problems(self.model_dump())
        if problems:
            raise ValueError("\n".join(f"{loc}: {msg}" for loc, msg in problems))
        return self

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in the fleet")

    def kv_cache_gb(self, model: ModelPlacementSpec) -> float:
        return self.default_kv_cache_gb if model.kv_cache_gb is None else model.kv_cache_gb


def reference_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems that span fields, as (path, message).

    Works on raw, possibly invalid data (skipping entries it cannot read) so that ``load_fleet`` can
    report these alongside field errors: pydantic skips after-validators once a field fails.
    """
    problems: list[tuple[str, str]] = []
    hosts = data.get("hosts") if isinstance(data.get("hosts"), list) else []
    first_seen: dict[str, int] = {}
    labels_by_host: dict[str, dict[str, Any]] = {}
    for i, h in enumerate(hosts):
        name = h.get("name") if isinstance(h, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in first_seen:
            problems.append((f"hosts.{i}.name", f"duplicate host name {name!r} (also hosts.{first_seen[name]}.name)"))
            continue
        first_seen[name] = i
        labels = h.get("labels")
        labels_by_host[name] = labels if isinstance(labels, Mapping) else {}
    known = ", ".join(first_seen) or "none"

    head = data.get("head")
    if isinstance(head, str) and first_seen and head not in first_seen:
        problems.append(("head", f"head {head!r} is not one of the hosts ({known})"))

    models = data.get("models") if isinstance(data.get("models"), list) else []
    model_seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if not isinstance(m, Mapping):
            continue
        name = m.get("name")
        if isinstance(name, str):
            if name in model_seen:
                problems.append((f"models.{i}.name", f"duplicate model name {name!r} (also models.{model_seen[name]}.name)"))
            else:
                model_seen[name] = i
        allow = m.get("hosts")
        allow_ok = isinstance(allow, list)
        if allow_ok:
            for j, hn in enumerate(allow):
                if isinstance(hn, str) and first_seen and hn not in first_seen:
                    problems.append((f"models.{i}.hosts.{j}", f"unknown host {hn!r} (hosts are {known})"))
        if first_seen:
            problems += _shard_host_problems(m.get("shard"), f"models.{i}.shard", first_seen, known)
        selector = m.get("host_labels")
        if not first_seen or (selector is not None and not isinstance(selector, Mapping)):
            continue
        candidates = [hn for hn in first_seen if not allow_ok or hn in allow]
        if selector and candidates and not any(
            all(labels_by_host[hn].get(k) == v for k, v in selector.items()) for hn in candidates
        ):
            scope = "allowed host" if allow_ok else "host"
            problems.append((f"models.{i}.host_labels", f"selector {dict(selector)} matches no {scope}"))
    return problems


def _shard_host_problems(shard: Any, where: str, hosts: Mapping[str, int], known: str) -> list[tuple[str, str]]:
    """Host names in a model's ``shard:`` that are not hosts of the fleet."""
    if not isinstance(shard, Mapping):
        return []
    found = []
    if isinstance(shard.get("hosts"), list):
        found += [(f"{where}.hosts.{j}", f"unknown host {hn!r} (hosts are {known})")
                  for j, hn in enumerate(shard["hosts"]) if isinstance(hn, str) and hn not in hosts]
    for field in ("addresses", "rdma_devices"):
        named = shard.get(field)
        if isinstance(named, Mapping):
            found += [(f"{where}.{field}.{hn}", f"unknown host {hn!r} (hosts are {known})")
                      for hn in named if isinstance(hn, str) and hn not in hosts]
    return found


class FleetError(ValueError):
    """An invalid fleet file; ``problems`` holds every (path, message) found."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {loc or '<root>'}: {msg}" for loc, msg in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid fleet file {source} ({len(problems)} {noun}):\n{lines}")


def _field_problems(err: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for e in err.errors():
        if not e["loc"]:  # the cross-reference validator: reported separately, one line per problem
            continue
        msg = e["msg"].removeprefix("Value error, ")
        out.append((".".join(str(p) for p in e["loc"]), msg))
    return out


def _path_key(loc: str) -> tuple[tuple[int, int | str], ...]:
    """Order problems as they appear in the file: hosts.2 before hosts.10."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in loc.split("."))


def parse_fleet(data: Any, source: str = "<fleet>") -> Fleet:
    """Validate already-parsed data, raising ``FleetError`` with every problem found."""
    if not isinstance(data, Mapping):
        raise FleetError(source, [("", f"expected a mapping with 'hosts', 'head' and 'models', got {type(data).__name__}")])
    try:
        return Fleet.model_validate(data)
    except ValidationError as err:
        problems = list(dict.fromkeys(_field_problems(err) + reference_problems(data)))
        raise FleetError(source, sorted(problems, key=lambda p: _path_key(p[0]))) from None


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a YAML fleet file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise FleetError(str(path), [("", f"not valid YAML: {err}")]) from None
    return parse_fleet(data, str(path))
