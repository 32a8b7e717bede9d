"""The application's arguments: what a Ray Serve config file's ``args:`` holds.

``build_app`` validates these with pydantic, so ``serve run``, ``serve deploy`` and
``mlx-serving validate`` all report the same problems with the same paths.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.config import EngineConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class FaultInjection(BaseModel):
    """Deliberate slowness or failure for canary drills and tests; off unless configured."""

    model_config = ConfigDict(extra="forbid")

    added_latency_per_token_s: float = Field(0.0, ge=0.0, le=5.0)
    error_probability: float = Field(0.0, ge=0.0, le=1.0)


class ModelDeploymentConfig(BaseModel):
    """One model variant = one Serve deployment of engine replicas."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The id clients put in `model` (and the deployment's name suffix).")
    source: str = Field(description="Local directory, Hugging Face repo id, or demo:tiny / demo:bench / demo:vision.")
    num_replicas: int | None = Field(1, ge=0, le=512)
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...).")
    max_ongoing_requests: int = Field(64, ge=1, le=4096, description="Per replica; size it for the batch, not Serve's default 5.")
    max_queued_requests: int = Field(256, ge=-1, description="Requests waiting for a replica before 429; -1 is unbounded.")
    hosts: list[str] = Field(default_factory=list, description="Pin replicas to these hosts (Ray node label `host`).")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves per replica.")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0.0, description="In-flight streams get this long to finish.")
    health_check_period_s: float = Field(10.0, gt=0.0)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    fault: FaultInjection | None = None

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
        elif self.num_replicas is None:
            raise ValueError("give num_replicas or autoscaling_config")
        return self

    @property
    def deployment_name(self) -> str:
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    def ray_actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.hosts:
            value = self.hosts[0] if len(self.hosts) == 1 else "in(" + ",".join(self.hosts) + ")"
            opts["label_selector"] = {"host": value}
        return opts


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(default_factory=list, description="Bearer keys for /v1 routes (plus MLX_SERVING_API_KEYS).")
    admin_keys: list[str] = Field(default_factory=list, description="Keys for /admin routes and forced variants.")


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(600.0, gt=0.0, description="Deadline of one generation; 504 when it passes.")
    default_max_tokens: int = Field(512, ge=1)


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelDeploymentConfig] = Field(min_length=1)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    ingress_replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self
