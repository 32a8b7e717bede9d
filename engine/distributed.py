"""The ranks of one sharded model: their ``mx.distributed`` group, what rank 0 sends the others, and
the watchdog that keeps any rank from waiting forever in a collective.

A group is set up the way ``mlx.launch`` sets one up (MLX reads it from the environment): the ring
backend takes a host file with each rank's ``ip:port`` addresses (TCP over Ethernet, or over a
Thunderbolt bridge when those addresses are given); JACCL (RDMA over Thunderbolt 5, macOS 26.2+)
takes the matrix of RDMA devices that link each pair of ranks and rank 0's address as coordinator.
A replica process holds one group, so setting the environment of the process is safe.

Messages from rank 0 are JSON (not pickle: a rank never runs what it receives) and travel as
``all_sum`` of a byte array to which the other ranks add zeros, as ``mlx_lm.server`` shares its
requests; every collective runs on the batch's stream, so all of them keep one order on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import mlx.core as mx
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("mlx_serving.engine")

ShardMode = Literal["pipeline", "tensor"]


class ShardLost(BaseException):
    """The group broke (a rank's process or host is gone, or a collective timed out). Not an
    ``Exception``: it must not be caught as one request's failure, since no step of this model can
    run again; the GPU thread dies of it and the replica is rebuilt."""


class ShardSpec(BaseModel):
    """One rank's part in a sharded model: the group, and how long a collective may take."""

    model_config = ConfigDict(extra="forbid")

    mode: ShardMode
    rank: int = Field(ge=0)
    size: int = Field(ge=2)
    backend: Literal["ring", "jaccl"] = "ring"
    addresses: list[list[str]] = Field(
        default_factory=list, description="ring: each rank's 'ip:port' addresses, in rank order.")
    rdma_devices: list[list[str | None]] | None = Field(
        None, description="jaccl: row i names the RDMA device that links rank i to each rank j (null for i == j).")
    coordinator: str | None = Field(None, description="jaccl: rank 0's 'ip:port'.")
    step_timeout_s: float = Field(
        120.0, gt=0, description="Longest a collective (a step, a message, setting up the group) may take.")
    load_timeout_s: float = Field(
        1800.0, gt=0, description="Longest loading the shards may take (the ranks meet at its end, so the fastest "
                                  "waits for the slowest disk).")
    keepalive_s: float = Field(1.0, gt=0, description="How often an idle rank 0 tells the others it is alive.")

    @model_validator(mode="after")
    def _complete(self) -> ShardSpec:
        if self.rank >= self.size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.size}")
        if self.backend == "ring" and len(self.addresses) != self.size:
            raise ValueError(f"the ring needs {self.size} ranks' addresses, got {len(self.addresses)}")
        if self.backend == "jaccl" and (self.rdma_devices is None or len(self.rdma_devices) != self.size
                                        or self.coordinator is None):
            raise ValueError("jaccl needs an RDMA device matrix with a row per rank, and a coordinator")
        return self


def init_group(spec: ShardSpec) -> Any:
    """Join the group (blocks until every rank has joined). Once per process: MLX keeps the first."""
    if not mx.distributed.is_available(spec.backend):
        raise RuntimeError(f"MLX's {spec.backend!r} distributed backend is not available on this machine")
    os.environ["MLX_RANK"] = str(spec.rank)
    if spec.backend == "ring":
        os.environ["MLX_HOSTFILE"] = _write_json(spec.addresses, "hostfile")
    else:
        os.environ["MLX_IBV_DEVICES"] = _write_json(spec.rdma_devices, "ibv-devices")
        os.environ["MLX_JACCL_COORDINATOR"] = str(spec.coordinator)
    group = mx.distributed.init(strict=True, backend=spec.backend)
    if group.size() != spec.size or group.rank() != spec.rank:  # MLX keeps the first group a process joins
        raise RuntimeError(f"this process is rank {group.rank()} of a group of {group.size()} already, "
                           f"not rank {spec.rank} of {spec.size}: a process joins one group")
    return group


def _write_json(obj: Any, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"mlx-serving-{name}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    return path


def send(group: Any, message: Any, stream: Any) -> None:
    """Rank 0: send ``message`` (JSON-able) to every other rank; returns once they have it."""
    data = json.dumps(message, separators=(",", ":")).encode()
    mx.eval(mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group, stream=stream))
    mx.eval(mx.distributed.all_sum(mx.array(memoryview(data), dtype=mx.uint8), group=group, stream=stream))


def receive(group: Any, stream: Any) -> Any:
    """Any other rank: the next message of rank 0 (blocks until it comes)."""
    size = int(mx.distributed.all_sum(mx.zeros((1,), dtype=mx.int32), group=group, stream=stream).item())
    data = mx.distributed.all_sum(mx.zeros((size,), dtype=mx.uint8), group=group, stream=stream)
    mx.eval(data)
    return json.loads(bytes(memoryview(data)))


def share_tokens(tokens: mx.array, group: Any, stream: Any, *, source: bool) -> mx.array:
    """Rank 0's sampled tokens on every rank (lazy: it runs with the next step). Only rank 0 samples:
    logits processors, grammars and seeds live there alone, and the ranks cannot drift apart."""
    mine = tokens.astype(mx.int32) if source else mx.zeros(tokens.shape, dtype=mx.int32)
    return mx.distributed.all_sum(mine, group=group, stream=stream).astype(tokens.dtype)


class Watchdog:
    """Calls ``on_expire(what)`` (once, from its own thread) when a collective runs past the timeout.

    A rank blocked inside MLX cannot be interrupted from Python; what the watchdog can do is declare
    the group lost, so the process that holds it is replaced."""

    def __init__(self, timeout_s: float, on_expire: Callable[[str], None]) -> None:
        self.timeout_s = timeout_s
        self._on_expire = on_expire
        self._armed: tuple[str, float] | None = None
        self._fired = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="mlx-shard-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def armed(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        with self._lock:
            self._armed = (what, time.monotonic() + (timeout_s or self.timeout_s))
        try:
            yield
        finally:
            with self._lock:
                self._armed = None

    @property
    def fired(self) -> bool:
        return self._fired

    def _watch(self) -> None:
        while not self._fired:
            time.sleep(min(0.5, self.timeout_s / 4))
            with self._lock:
                armed = self._armed
                expired = armed is not None and time.monotonic() > armed[1]
                if expired:
                    self._fired = True
            if expired:
                assert armed is not None
                log.error("sharded model: %s took too long; the group is lost", armed[0])
                self._on_expire(armed[0])
