"""The application's arguments: what a Ray Serve config file's ``args:`` holds.

``build_app`` validates these with pydantic, so ``serve run``, ``serve deploy`` and
``mlx-serving validate`` all report the same problems with the same paths.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.config import EngineConfig
from engine.distributed import ShardMode
from engine.request import MAX_JSON_DEPTH
from engine.sources import HUB_ID, ModelSource

from .qos.config import KeyPolicy, QosConfig
from .routing.config import RouteConfig

DEFAULT_TARGET_ONGOING = 2  # Ray Serve's default autoscaling target_ongoing_requests

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def host_selector(hosts: list[str]) -> str:
    """A Ray label-selector value matching any of ``hosts``."""
    return hosts[0] if len(hosts) == 1 else "in(" + ",".join(hosts) + ")"


class FaultInjection(BaseModel):
    """Deliberate slowness or failure for canary drills and tests; off unless configured."""

    model_config = ConfigDict(extra="forbid")

    added_latency_per_token_s: float = Field(0.0, ge=0.0, le=5.0)
    error_probability: float = Field(0.0, ge=0.0, le=1.0)
    crash_process_on: str | None = Field(
        None, min_length=1, description="Drill: a request whose prompt contains this text kills the replica's "
                                        "process at once, as a crashing kernel would (a poison request).")
    crash_gpu_thread_on: str | None = Field(
        None, min_length=1, description="Drill: a request whose prompt contains this text kills the engine's GPU "
                                        "thread once it has its first tokens (the replica then takes itself out "
                                        "of service).")

    def triggered(self, marker: str | None, request: dict[str, Any]) -> bool:
        if marker is None:
            return False
        text = request.get("prompt") or request.get("messages") or ""
        return marker in (text if isinstance(text, str) else json.dumps(text))


class ShardConfig(BaseModel):
    """One replica that spans several hosts (engine/shard.py, docs/fleet.md): a model no single host
    can hold. Each host loads its shard; rank 0, on the first host, runs the engine."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[str] = Field(min_length=2, max_length=16, description="The hosts, in rank order (rank 0 first).")
    mode: ShardMode = Field(
        "pipeline", description="pipeline: each host holds whole layers, activations pass once per step (fits "
                                "Ethernet); tensor: each host holds a slice of every layer, two all-reduces per "
                                "layer (wants Thunderbolt).")
    backend: Literal["auto", "ring", "jaccl"] = Field(
        "auto", description="ring: TCP; jaccl: RDMA over Thunderbolt 5 (macOS 26.2+, needs rdma_devices); auto: "
                            "jaccl when rdma_devices are given and MLX offers it, else ring.")
    addresses: dict[str, str] = Field(
        default_factory=dict, description="host -> the IP address its ring connections use (e.g. its Thunderbolt "
                                          "bridge address); default: the address of its Ray node.")
    rdma_devices: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="jaccl: host -> {other host: the RDMA device that links them}, every pair.")
    step_timeout_s: float = Field(
        120.0, gt=0, description="Longest a step or a message between the ranks may take; then the replica is rebuilt.")
    load_timeout_s: float = Field(
        1800.0, gt=0, description="Longest loading the shards may take, once every host has the model on disk.")

    @field_validator("hosts")
    @classmethod
    def _hosts_ok(cls, v: list[str]) -> list[str]:
        return check_hosts(v)

    @model_validator(mode="after")
    def _references(self) -> ShardConfig:
        unknown = sorted((set(self.addresses) | set(self.rdma_devices)) - set(self.hosts))
        if unknown:
            raise ValueError(f"addresses / rdma_devices name host(s) outside shard.hosts: {', '.join(unknown)}")
        if self.backend == "jaccl":
            missing = [f"{a} to {b}" for a in self.hosts for b in self.hosts
                       if a != b and b not in self.rdma_devices.get(a, {})]
            if missing:
                raise ValueError(f"jaccl needs an RDMA device for every pair of hosts; missing: {', '.join(missing[:4])}")
        return self


def check_hosts(v: list[str]) -> list[str]:
    for h in v:
        if not _HOST.match(h):
            raise ValueError(f"host {h!r} is not a valid Ray label value (1-63 letters, digits, '-', '_', '.')")
    dupes = sorted({h for h in v if v.count(h) > 1})
    if dupes:
        raise ValueError(f"repeated host(s): {', '.join(dupes)}")
    return v


class ModelDeploymentConfig(BaseModel):
    """One model variant = one Serve deployment of engine replicas."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The id clients put in `model` (and the deployment's name suffix).")
    source: str = Field(description="Local directory, Hugging Face repo id, or demo:tiny / demo:bench / demo:vision.")
    revision: str | None = Field(
        None, min_length=1, description="With a hub id: a branch, tag or commit (default: the hub's main).")
    adapter_path: str | None = Field(
        None, min_length=1, description="A LoRA adapter to serve on the weights: a directory with adapters.safetensors "
                                        "and adapter_config.json (mlx_lm.lora's output), or a hub id holding them.")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment of this model's replicas (their Ray runtime_env), e.g. HF_ENDPOINT for a "
                                          "hub mirror. Secrets such as HF_TOKEN belong in the hosts' environment: "
                                          "the Serve config is readable on the dashboard.")
    draft_model: str | None = Field(
        None, description="A small model with the same tokenizer for speculative decoding (engine.num_draft_tokens per step).")
    num_replicas: int | None = Field(1, ge=0, le=512)
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...).")
    max_ongoing_requests: int = Field(64, ge=1, le=4096, description="Per replica; size it for the batch, not Serve's default 5.")
    max_queued_requests: int = Field(256, ge=-1, description="Requests waiting for a replica before 429; -1 is unbounded.")
    hosts: list[str] = Field(default_factory=list, description="Pin replicas to these hosts (Ray node label `host`).")
    fallback_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a replica may use when none of `hosts` can take it (one is down or full); needs `hosts`.")
    max_replicas_per_node: int | None = Field(
        None, ge=1, le=100,
        description="Serve's hard cap of replicas per Ray node (one node per Mac): 1 spreads replicas over distinct hosts.")
    memory_gb: float | None = Field(
        None, gt=0.0,
        description="Memory Ray reserves per replica (weights + KV cache, GB of 2**30 bytes); a host offers what "
                    "`ray start --memory` gave it (`mlx-serving cluster up --inventory` sets its usable memory).")
    routing: Literal["load", "prefix"] = Field(
        "load", description="How a request picks among this model's replicas: `load` (Serve's power of two "
                            "choices) or `prefix` (the replica whose prompt cache likely holds the request's "
                            "prefix, balanced against load: deployments/routing/prefix_affinity.py).")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves per replica.")
    num_gpus: float = Field(
        0.0, ge=0.0, description="GPUs Ray reserves per replica: for MLX's CUDA backend on Linux (Ray then sets "
                                 "CUDA_VISIBLE_DEVICES); leave 0 on Macs, where Ray sees no GPU.")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0.0, description="In-flight streams get this long to finish.")
    health_check_period_s: float = Field(10.0, gt=0.0)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    qos: QosConfig = Field(default_factory=QosConfig, description="Deadlines, SLOs and remediation (docs/qos.md).")
    fault: FaultInjection | None = None
    shard: ShardConfig | None = Field(
        None, description="Serve this model with one replica across several hosts (docs/fleet.md).")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("model names use letters, digits and . _ : / - (at most 128 characters)")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> ModelDeploymentConfig:
        if self.autoscaling_config is not None:
            self.num_replicas = None
            target = self.autoscaling_config.get("target_ongoing_requests", DEFAULT_TARGET_ONGOING)
            if isinstance(target, (int, float)) and target >= self.max_ongoing_requests:
                # The ingress's admission gate keeps what a replica cannot take (never more than
                # max_ongoing_requests each), so Serve's autoscaler would never see a load above target.
                raise ValueError(f"autoscaling_config.target_ongoing_requests ({target}) must be below "
                                 f"max_ongoing_requests ({self.max_ongoing_requests}) to ever scale out")
        elif self.num_replicas is None:
            raise ValueError("give num_replicas or autoscaling_config")
        return self

    @property
    def planned_replicas(self) -> int:
        """Replicas to expect before Serve says how many run: num_replicas, else the autoscaling start."""
        if self.num_replicas is not None:
            return self.num_replicas
        a = self.autoscaling_config or {}
        return int(a.get("initial_replicas") or a.get("min_replicas") or 1)

    @field_validator("hosts", "fallback_hosts")
    @classmethod
    def _hosts_ok(cls, v: list[str]) -> list[str]:
        return check_hosts(v)

    @model_validator(mode="after")
    def _sharded(self) -> ModelDeploymentConfig:
        """A sharded replica is one placement group over its hosts: what would place it otherwise, or
        run a forward pass outside its batch, is refused here."""
        if self.shard is None:
            return self
        clash = [name for name, given in (
            ("hosts", self.hosts), ("fallback_hosts", self.fallback_hosts),
            ("max_replicas_per_node", self.max_replicas_per_node is not None),
            ("autoscaling_config", self.autoscaling_config is not None), ("draft_model", self.draft_model),
            ("adapter_path", self.adapter_path)) if given]
        if clash:
            raise ValueError(f"a sharded model takes none of: {', '.join(clash)} (shard.hosts places it)")
        if self.num_replicas != 1:
            raise ValueError("a sharded model has one replica (num_replicas: 1): it already spans its hosts")
        if self.routing == "prefix":
            raise ValueError("routing: prefix needs several replicas and a prefix cache; a sharded model has neither")
        return self

    @model_validator(mode="after")
    def _revision_needs_a_hub_id(self) -> ModelDeploymentConfig:
        if self.revision is not None and not HUB_ID.match(self.source):
            raise ValueError(f"revision applies to a hub id, not to source {self.source!r}")
        return self

    def model_source(self) -> ModelSource:
        return ModelSource(self.source, self.revision, self.adapter_path)

    @model_validator(mode="after")
    def _fallback(self) -> ModelDeploymentConfig:
        if self.fallback_hosts and not self.hosts:
            raise ValueError("fallback_hosts needs hosts: without a pin every host is already allowed")
        both = sorted(set(self.hosts) & set(self.fallback_hosts))
        if both:
            raise ValueError(f"host(s) in both hosts and fallback_hosts: {', '.join(both)}")
        return self

    @property
    def deployment_name(self) -> str:
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    def engine_config(self) -> EngineConfig:
        """The engine's settings; its memory limit is the replica's memory_gb unless set on its own."""
        if self.engine.memory_limit_gb is not None or self.memory_gb is None:
            return self.engine
        return self.engine.model_copy(update={"memory_limit_gb": self.memory_gb * 2**30 / 1e9})

    def ray_actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.hosts:
            opts["label_selector"] = {"host": host_selector(self.hosts)}
        if self.fallback_hosts:
            # Tried only when no host of `hosts` can take the replica: a failover target, not a spread target.
            opts["fallback_strategy"] = [{"label_selector": {"host": host_selector(self.fallback_hosts)}}]
        if self.memory_gb is not None:
            opts["memory"] = int(self.memory_gb * 2**30)
        if self.env_vars:
            opts["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return opts


class AuthConfig(BaseModel):
    """Who may call the API. Keys are given as hashes (``sha256:<hex>``, ``mlx-serving keys hash KEY``), so
    this config, ``serve config`` and the dashboard never hold a usable key; plain keys belong in
    ``MLX_SERVING_API_KEYS`` / ``MLX_SERVING_ADMIN_KEYS`` when running ``mlx-serving up``, which hashes them."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(default_factory=list, description="Hashes of the bearer keys for the API routes.")
    admin_keys: list[str] = Field(default_factory=list, description="Hashes of the keys for /admin routes and forced variants.")
    allow_unauthenticated_network: bool = Field(
        False, description="Allow serving HTTP on a non-loopback address with no API key (anyone who reaches the "
                           "port may use the models). `mlx-serving up --allow-unauthenticated-network` sets it.")
    keys: list[KeyPolicy] = Field(
        default_factory=list, description="API keys with a name and limits (priority ceiling, requests and tokens "
                                          "per minute, concurrency); each is an API key too (docs/qos.md).")

    @model_validator(mode="after")
    def _unique_keys(self) -> AuthConfig:
        for what, values in (("key", [k.key for k in self.keys]), ("name", [k.name for k in self.keys])):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"auth.keys: repeated {what}(s): {', '.join(dupes)}")
        return self

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _hashes_only(cls, v: list[str]) -> list[str]:
        from .http.auth import HASH_RE

        for k in v:
            if not HASH_RE.match(k):
                raise ValueError("give key hashes (sha256:<64 hex digits>), not keys: `mlx-serving keys hash KEY` "
                                 "prints one; or pass plain keys in MLX_SERVING_API_KEYS / MLX_SERVING_ADMIN_KEYS to "
                                 "`mlx-serving up`, which stores only their hashes")
        return v


class IngressSettings(BaseModel):
    """The ingress deployment's ``user_config``: what changes live, with no replica restarted (keys)."""

    model_config = ConfigDict(extra="forbid")

    auth: AuthConfig = Field(default_factory=AuthConfig)


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(MAX_JSON_DEPTH, ge=8, le=1000, description="Nesting of a request body's JSON; "
                                "deeper bodies get 400 json_too_deep before they are parsed.")
    request_timeout_s: float = Field(600.0, gt=0.0, description="Deadline of one generation; 504 when it passes.")
    default_max_tokens: int = Field(512, ge=1)


ROUTER_DEPLOYMENT = "router"
INGRESS_DEPLOYMENT = "ingress"


def route_problems(routes: list[RouteConfig], models: list[str]) -> list[tuple[tuple[int | str, ...], str]]:
    """Routes checked against the models of the same application: ``[(path, message)]``, empty if fine.

    Every variant must send to a model of ``models`` (its ``deployment``, which defaults to the
    variant's name). A route may take a model's name only to *shadow* it: when that model is one of
    the route's own variants (clients keep asking for ``chat`` while a canary of it rolls out);
    a route hiding an unrelated model is refused.
    """
    known = set(models)
    found: list[tuple[tuple[int | str, ...], str]] = []
    for i, r in enumerate(routes):
        for j, v in enumerate(r.variants):
            if v.deployment not in known:
                found.append(((i, "variants", j, "deployment"),
                              f"route {r.name!r}: variant {v.name!r} sends to {v.deployment!r}, which is not a model "
                              f"of this application ({', '.join(sorted(known)) or 'none'})"))
        if r.name in known and r.name not in {v.deployment for v in r.variants}:
            found.append(((i, "name"), f"route {r.name!r} has the name of a model that is not one of its variants: "
                                       "it would hide that model; rename the route or make the model a variant"))
    return found


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelDeploymentConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description="Model names clients use that split traffic over variants (canary / A/B). They become the "
                    "router deployment's user_config: `mlx-serving up` moves them there, so editing them never "
                    "restarts a replica.")
    router: bool | None = Field(
        None, description="Deploy the router deployment. Default: when `routes` is given. Set it when the routes "
                          "live in the router's user_config (`deployments: [{name: router, user_config: {routes: "
                          "[...]}}]`, the form `serve deploy` updates in place).")
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment of the ingress and router replicas (their Ray runtime_env), e.g. "
                                          "Serve's own settings such as RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD; a "
                                          "model's replicas take theirs from the model's `env_vars`.")
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_replicas_per_node: int | None = Field(
        None, ge=1, description="With `proxy_location: EveryNode`, `ingress_replicas` = the number of Macs and 1 here "
                                "give each Mac's HTTP proxy an ingress of its own (a proxy prefers its node's "
                                "replicas), so no single Mac relays every token.")

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        route_names = [r.name for r in self.routes]
        dupes = sorted({n for n in route_names if route_names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique; repeated: {', '.join(dupes)}")
        found = route_problems(self.routes, names)
        if found:
            raise ValueError("; ".join(msg for _, msg in found))
        return self

    @property
    def with_router(self) -> bool:
        return bool(self.routes) if self.router is None else self.router


def relay_actor_options(env_vars: dict[str, str]) -> dict[str, Any]:
    """The ingress's and the router's ``ray_actor_options``: they relay, so they reserve no CPU."""
    return {"num_cpus": 0, **({"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {})}
