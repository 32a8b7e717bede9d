"""Talking to model replicas: open a stream or a unary call, retry before the first byte, cancel on leave.

A replica (or its host) that dies before producing anything costs the client nothing: nothing of the
response has been sent, so the request goes to another replica, once. If that replica dies too, the
request itself is the likely cause (a poison request must not walk through a whole fleet): the
client gets 503 and the request id is logged as suspect. A client that goes away cancels its work
all the way down to the GPU batch, whether it was streaming or waiting for a whole answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from engine.errors import EngineError, EngineFailureError
from engine.request import GenerationChunk

from ..messages import RemoteError, ReplicaError
from .errors import RETRY_AFTER_S, as_replica_error

log = logging.getLogger("mlx_serving.ingress")

REPLICA_RETRIES = 1  # attempts on another replica after one died before answering
RETRYABLE = frozenset({"replica_died", "engine_dead"})  # nothing was generated: safe to send elsewhere


def as_engine_error(err: ReplicaError) -> EngineError:
    """Re-raise a replica's error in this process with its status and code intact."""
    return RemoteError(err)


def _retryable(e: BaseException | ReplicaError) -> bool:
    return isinstance(e, RayActorError) or (isinstance(e, ReplicaError) and e.code in RETRYABLE)


def _gave_up(payload: Payload, last: BaseException | ReplicaError) -> EngineError:
    rid = _id(payload)
    model = (payload[0] if isinstance(payload, list) else payload).get("model")
    log.warning("request %s: its replica died on %d attempts; not retried again (suspect request)",
                rid, REPLICA_RETRIES + 1, extra={"event": "suspect_request", "completion_id": rid,
                                                 "model": model, "detail": repr(last)[:300]})
    return EngineFailureError(f"the model replicas serving this request died {REPLICA_RETRIES + 1} times; it was "
                              f"not retried again (request id {rid})", code="replica_died", retry_after=RETRY_AFTER_S)


Payload = dict[str, Any] | list[dict[str, Any]]  # one engine request, or several (prompts run together)


def _id(payload: Payload) -> str | None:
    return (payload[0] if isinstance(payload, list) else payload).get("request_id")


async def open_stream(handle: DeploymentHandle, payload: Payload) -> tuple[DeploymentResponseGenerator, GenerationChunk]:
    """Start streaming and wait for the first item, so failures still get a proper status."""
    last: BaseException | ReplicaError | None = None
    for _ in range(REPLICA_RETRIES + 1):
        gen = handle.options(stream=True).generate.remote(payload)
        try:
            first = await gen.__anext__()
        except asyncio.CancelledError:  # the client left before the first token
            gen.cancel()
            raise
        except StopAsyncIteration:
            raise as_engine_error(ReplicaError.of(EngineFailureError("the replica produced no output"))) from None
        except Exception as e:  # noqa: BLE001 - Ray and Serve errors become OpenAI errors
            if not _retryable(e):
                raise as_engine_error(as_replica_error(e)) from None
            as_replica_error(e)  # logs the death
            last = e
            continue
        if isinstance(first, ReplicaError):
            gen.cancel()
            if _retryable(first):
                last = first
                continue
            raise as_engine_error(first)
        return gen, first
    assert last is not None
    raise _gave_up(payload, last)


async def complete(handle: DeploymentHandle, payload: Payload) -> list[GenerationChunk]:
    """The whole answer of a unary call (each choice's, in order), with the same retry as a stream."""
    last: BaseException | ReplicaError | None = None
    for _ in range(REPLICA_RETRIES + 1):
        response = handle.complete.remote(payload)
        try:
            result = await response
        except asyncio.CancelledError:  # the client left: stop the generation too
            response.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            if not _retryable(e):
                raise as_engine_error(as_replica_error(e)) from None
            as_replica_error(e)
            last = e
            continue
        if isinstance(result, ReplicaError):
            if _retryable(result):
                last = result
                continue
            raise as_engine_error(result)
        return result
    assert last is not None
    raise _gave_up(payload, last)


async def unary(call: Callable[[], Any]) -> Any:
    """A replica method's result (tokenize, detokenize, reports), errors mapped to ours."""
    response = call()
    try:
        result = await response
    except asyncio.CancelledError:
        response.cancel()
        raise
    except Exception as e:  # noqa: BLE001
        raise as_engine_error(as_replica_error(e)) from None
    if isinstance(result, ReplicaError):
        raise as_engine_error(result)
    return result


async def relay(gen: DeploymentResponseGenerator, first: GenerationChunk, choices: int = 1,
                on_item: Callable[[GenerationChunk | ReplicaError], None] | None = None
                ) -> AsyncIterator[GenerationChunk | ReplicaError]:
    """Chunks from the replica until all ``choices`` have finished; a failure mid-stream becomes a
    final ``ReplicaError``.

    ``on_item`` sees every item (the routed-outcome bookkeeping); a client that goes away cancels
    the replica's stream, and so its sequences in the GPU batch."""
    item: GenerationChunk | ReplicaError = first
    finished = False
    left = choices
    try:
        while True:
            if on_item is not None:
                on_item(item)
            yield item
            if isinstance(item, ReplicaError):
                finished = True
                return
            if item.finish_reason is not None:
                left -= 1
                if left == 0:
                    finished = True
                    return
            try:
                item = await gen.__anext__()
            except StopAsyncIteration:
                finished = True
                return
            except Exception as e:  # noqa: BLE001 - the replica died or vanished mid-stream
                item = as_replica_error(e)
    finally:
        if not finished:
            gen.cancel()
