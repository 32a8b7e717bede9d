"""QoS settings: a model's SLOs and remediation, an API key's limits. Validated where the config is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Priority = Literal["interactive", "batch"]
PRIORITY_RANK: dict[str, int] = {"interactive": 0, "batch": 1}  # lower is served first


class SloConfig(BaseModel):
    """Targets of one model, each optional. A latency target reads "95% of requests at most this"."""

    model_config = ConfigDict(extra="forbid")

    ttft_p95_s: float | None = Field(None, gt=0, description="Time to first token, 95th percentile.")
    tpot_p95_s: float | None = Field(None, gt=0, description="Time per output token, 95th percentile.")
    error_rate: float | None = Field(None, gt=0, lt=1, description="Most of the requests that may fail (5xx).")
    availability: float | None = Field(None, gt=0, lt=1, description="Least of the requests that must be answered "
                                                                     "(not 5xx, not 429): e.g. 0.999.")

    def objectives(self) -> dict[str, float]:
        """Each set SLO as the share of requests allowed to be bad (its error budget)."""
        out = {}
        if self.ttft_p95_s is not None:
            out["ttft"] = 0.05
        if self.tpot_p95_s is not None:
            out["tpot"] = 0.05
        if self.error_rate is not None:
            out["errors"] = self.error_rate
        if self.availability is not None:
            out["availability"] = 1.0 - self.availability
        return out


class QosConfig(BaseModel):
    """Per model: how long a request may take, how many may wait at the ingress, its SLOs and what the
    ingress does when they burn."""

    model_config = ConfigDict(extra="forbid")

    default_timeout_s: float | None = Field(
        None, gt=0, description="A request's deadline when it gives none (default: limits.request_timeout_s).")
    max_queued: int = Field(256, ge=0, description="Requests waiting at one ingress for this model before 429.")
    interactive_reserve: float = Field(
        0.125, ge=0.0, lt=1.0, description="Share of the model's slots batch requests never take, so an interactive "
                                           "request starts at once instead of waiting for a batch answer to end.")
    slo: SloConfig | None = None
    shed_batch_on_burn: bool = Field(
        False, description="While an SLO burns (5-minute burn rate over shed_burn_rate), batch-priority requests "
                           "get 429 so interactive ones keep their targets.")
    shed_burn_rate: float = Field(2.0, gt=0, description="The 5-minute burn rate that switches shedding on; it "
                                                         "switches off below half of it.")

    @model_validator(mode="after")
    def _shedding_needs_slo(self) -> QosConfig:
        if self.shed_batch_on_burn and not (self.slo and self.slo.objectives()):
            raise ValueError("shed_batch_on_burn needs an slo to watch")
        return self


class KeyPolicy(BaseModel):
    """An API key with a name and limits (its hash, as in auth.api_keys)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="sha256:<hex> hash of the key (mlx-serving keys hash KEY).")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Shown in metrics and logs instead of the key.")
    max_priority: Priority = Field("interactive", description="A higher priority asked for is lowered to this.")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt plus completion tokens.")
    max_concurrent: int | None = Field(None, ge=1, description="Requests of this key in flight at once.")

    @model_validator(mode="after")
    def _hash(self) -> KeyPolicy:
        from ..http.auth import HASH_RE

        if not HASH_RE.match(self.key):
            raise ValueError("key is a hash (sha256:<64 hex digits>), not a key: `mlx-serving keys hash KEY`")
        return self
