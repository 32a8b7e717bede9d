"""Messages between deployments (pickled across Ray hops)."""

from __future__ import annotations

from pydantic import BaseModel

from engine.errors import EngineError

from .statuses import kind_of, status_of, type_of
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
        if isinstance(e, RemoteError):  # a replica's error on its way to the client: as it came
            return e.error
        return cls(code=e.code, message=e.message, type=type_of(e), http_status=status_of(e), param=e.param,
                   retry_after=e.retry_after)

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RankInfo(BaseModel):
    """One rank of a sharded replica (rank 0 is the replica itself)."""

    rank: int
    host: str | None
    address: str  # ip:port of its ring connections
    pid: int
    node_id: str


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
    submitted_total: int = 0  # requests that reached the engine
    models: list[ModelInfo]
    rss_bytes: int = 0  # resident memory of the replica process (overload runs watch it)
    ranks: list[RankInfo] = []  # a sharded replica: every rank, itself first


class RemoteError(EngineError):
    """A ``ReplicaError`` raised in the ingress: it keeps the replica's status, type and code intact."""

    def __init__(self, error: ReplicaError) -> None:
        super().__init__(error.message, param=error.param, code=error.code, retry_after=error.retry_after)
        self.kind = kind_of(error.http_status)  # what SLOs, canary stats and logs count it as
        self.error = error
