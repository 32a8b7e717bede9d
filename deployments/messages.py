"""Messages between deployments (pickled across Ray hops)."""

from __future__ import annotations

from pydantic import BaseModel

from engine.errors import EngineError
from engine.request import ModelInfo


class ReplicaError(BaseModel):
    """An engine error carried as data, so it survives the hop with its code and status intact."""

    code: str
    message: str
    type: str
    http_status: int
    param: str | None = None
    retry_after: float | None = None

    @classmethod
    def of(cls, e: EngineError) -> ReplicaError:
        return cls(code=e.code, message=e.message, type=e.type, http_status=e.http_status, param=e.param,
                   retry_after=e.retry_after)

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ReplicaInfo(BaseModel):
    """What a replica says about itself (status, readiness, tests that check pinning)."""

    model: str
    healthy: bool
    detail: str
    host: str | None
    node_id: str
    pid: int
    active: int
    waiting: int
    cancelled_total: int
    models: list[ModelInfo]
    rss_bytes: int = 0  # resident memory of the replica process (overload runs watch it)
