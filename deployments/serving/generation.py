"""The flow chat and completions share: validated body -> engine request -> one replica call -> JSON or SSE.

Each endpoint module gives the shape of its answers (``SseShape`` and a whole-answer builder); this
module does the rest: the tenant from the key, the target from the model or route, the engine
request, the replica call (retried before the first byte), SSE framing with an error event when the
replica fails mid-stream, and the outcome each routed request reports to the router.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray.serve.handle import DeploymentResponseGenerator

from engine.errors import EngineError, InvalidRequestError
from engine.request import GenerationChunk

from ..config import LimitsConfig
from ..http import relay
from ..http.auth import Authenticator
from ..http.errors import SSE_DONE, error_response, internal_error, sse_event
from ..logging import annotate
from ..messages import ReplicaError
from ..protocol import ChatCompletionRequest, CompletionRequest, UsageInfo, new_id
from ..qos.service import CLIENT_CLOSED, Qos, Ticket
from ..route_client import Pick, RouteClient
from ..routing.stats import Outcome
from ..statuses import status_of
from .targets import Targets

VARIANT_HEADER = "x-mlx-variant"  # on every response: the variant (or, for a plain model, the model) that served it

GenerationBody = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class SseShape:
    """How one endpoint frames its stream: an opening event per choice (or none), one event per chunk,
    the usage event."""

    opening: Callable[[int], str | None]
    event: Callable[[GenerationChunk], str]
    usage: Callable[[UsageInfo], str]


@dataclass(frozen=True)
class _Track:
    """A routed stream being timed: its decision, arrival and first-item times (perf_counter)."""

    pick: Pick
    t0: float
    first_at: float


def cache_scope(tenant: str, salt: str | None) -> str:
    """Prefix-cache scope: the tenant, split further by the request's ``cache_salt``."""
    return tenant if not salt else f"{tenant}:{hashlib.sha256(salt.encode()).hexdigest()[:32]}"


def outcome(t0: float, err: ReplicaError | EngineError | None = None, first_at: float | None = None,
            tokens: int = 0) -> Outcome:
    """What one routed request tells the router: ok or the error's code, TTFT, time per output token, e2e.

    A 4xx (a bad request, a 429 of a saturated replica) is the client's or the load's doing, not the
    variant's: it is reported as a client error, which no breaker or rollback counts as a failure."""
    now = time.perf_counter()
    if err is not None:
        status = err.http_status if isinstance(err, ReplicaError) else status_of(err)
        return Outcome(ok=False, code=err.code, e2e_s=now - t0, client_error=400 <= status < 500)
    ttft = first_at - t0 if first_at is not None else None
    tpot = (now - first_at) / (tokens - 1) if first_at is not None and tokens > 1 else None
    return Outcome(ok=True, ttft_s=ttft, tpot_s=tpot, e2e_s=now - t0)


class GenerationFlow:
    def __init__(self, targets: Targets, routes: RouteClient, qos: Qos) -> None:
        self.targets = targets
        self.routes = routes
        self.qos = qos

    async def run(self, body: GenerationBody, request: Request, auth: Authenticator, limits: LimitsConfig,
                  prefix: str, shape: Callable[[str], SseShape],
                  whole: Callable[[str, list[GenerationChunk]], BaseModel]) -> Any:
        tenant, key_hash = auth.identify(request)
        t0 = time.perf_counter()
        target = await self.targets.resolve(body.model, request, auth, body.user)
        headers = {VARIANT_HEADER: target.variant}
        pick = target.pick
        ticket: Ticket | None = None
        try:
            payload = engine_payload(body, limits, prefix, cache_scope(tenant, body.cache_salt), pick)
            ticket = await self.qos.admit(target.model, key_hash, tenant, body.priority, body.timeout)
            headers.update(ticket.headers)
            stamp(payload, ticket)
            if body.stream:
                gen, first = await relay.open_stream(target.handle, payload)
                track = _Track(pick, t0, time.perf_counter()) if pick is not None else None
                events = self._sse(body, gen, first, track, shape(request_id_of(payload)), ticket)
                weakref.finalize(events, _abandoned, asyncio.get_running_loop(), ticket, gen)
                ticket = None  # the stream owns it now
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            results = await relay.complete(target.handle, payload)
            ticket.finish(200, *_timing(results))
        except EngineError as e:
            if pick is not None:
                self.routes.record(pick, outcome(t0, e))
            if ticket is not None:
                ticket.finish(status_of(e))
            return error_response(e, headers | getattr(e, "headers", {}))
        finally:
            if ticket is not None and not ticket.done:  # the client left while it waited
                ticket.finish(CLIENT_CLOSED)
        if pick is not None:  # a whole answer: its end-to-end latency and mean time per output token
            n = sum(r.usage.completion_tokens if r.usage is not None else len(r.token_ids) for r in results)
            e2e = time.perf_counter() - t0
            self.routes.record(pick, Outcome(ok=True, e2e_s=e2e, tpot_s=e2e / n if n else None))
        return JSONResponse(whole(request_id_of(payload), results).model_dump(mode="json", exclude_none=True),
                            headers=headers)

    async def _sse(self, body: GenerationBody, gen: DeploymentResponseGenerator, first: GenerationChunk,
                   track: _Track | None, shape: SseShape, ticket: Ticket) -> AsyncIterator[str]:
        """One SSE stream as OpenAI sends it: events with content, an error event if the replica
        failed, the usage event when asked for, then ``[DONE]``."""
        status = CLIENT_CLOSED  # unless the stream gets to its end
        finals: list[GenerationChunk] = []  # each choice's last chunk: its usage
        try:
            for index in range(body.choices):
                opening = shape.opening(index)
                if opening is not None:
                    yield opening
            async for item in relay.relay(gen, first, body.choices, self._tracker(track, body.choices)):
                if isinstance(item, ReplicaError):
                    status = item.http_status
                    yield sse_event(item.to_openai())
                    break
                if item.finish_reason is not None:
                    finals.append(item)
                    if len(finals) == body.choices:
                        status = 200
                if item.text or item.reasoning or item.tool_calls or item.finish_reason or item.logprobs:
                    yield shape.event(item)
            if body.include_usage and len(finals) == body.choices:
                yield shape.usage(UsageInfo.total(finals))
        except Exception as e:  # noqa: BLE001 - a bug while framing: the client still gets an error event
            status = 500
            yield sse_event(ReplicaError.of(internal_error(e)).to_openai())
        finally:
            ticket.finish(status, *_timing(finals))
        yield SSE_DONE
    def _tracker(self, track: _Track | None, choices: int) -> Callable[[GenerationChunk | ReplicaError], None] | None:
        """For a routed stream: the outcome goes to the router when every choice has ended (not when the
        client went away: a cancelled request says nothing about the variant)."""
        if track is None:
            return None
        tokens = 0
        left = choices

        def on_item(item: GenerationChunk | ReplicaError) -> None:
            nonlocal tokens, left
            if isinstance(item, ReplicaError):
                self.routes.record(track.pick, outcome(track.t0, item))
                return
            tokens += len(item.token_ids)
            if item.finish_reason is not None:
                left -= 1
                if left == 0:
                    self.routes.record(track.pick, outcome(track.t0, first_at=track.first_at, tokens=tokens))

        return on_item


def _timing(finals: list[GenerationChunk]) -> tuple[int, int, float | None, float | None]:
    """Prompt and completion tokens, and the replica's TTFT and time per output token, of an answer."""
    usages = [c.usage for c in finals if c.usage is not None]
    if not usages:
        return 0, 0, None, None
    ttfts = [u.ttft_s for u in usages if u.ttft_s is not None]
    tpots = [u.tpot_s for u in usages if u.tpot_s is not None]
    return (usages[0].prompt_tokens, sum(u.completion_tokens for u in usages), min(ttfts) if ttfts else None,
            sum(tpots) / len(tpots) if tpots else None)


def _abandoned(loop: asyncio.AbstractEventLoop, ticket: Ticket, gen: DeploymentResponseGenerator) -> None:
    """A stream's body was dropped without running to its end (its client left before the first
    byte): free its slot and stop its generation."""
    def drop() -> None:
        if not ticket.done:
            gen.cancel()
            ticket.finish(CLIENT_CLOSED)

    if not ticket.done:
        try:
            loop.call_soon_threadsafe(drop)
        except RuntimeError:  # the loop is gone (the ingress is shutting down): nothing left to free
            pass


def stamp(payload: dict[str, Any] | list[dict[str, Any]], ticket: Ticket) -> None:
    """The priority the ingress settled on and the time left before the deadline, for the engine."""
    for p in payload if isinstance(payload, list) else [payload]:
        p["priority"] = ticket.priority
        p["timeout_s"] = ticket.remaining_s()


def engine_payload(body: GenerationBody, limits: LimitsConfig, prefix: str, scope: str,
                   pick: Pick | None) -> dict[str, Any] | list[dict[str, Any]]:
    """What the replica receives across the Ray hop: one engine request as a dict, or a list of them
    (several prompts: the replica runs them together)."""
    annotate(model=body.model)  # for the access log and the HTTP metrics (a known model or route here)
    body.check_fields()
    try:
        reqs = body.to_engine(limits.default_max_tokens, limits.request_timeout_s, new_id(prefix), scope)
        payloads = [r.model_dump(mode="json") for r in reqs]
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise InvalidRequestError(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), param=loc or None) from None
    except ValueError as e:  # pydantic's serializer refusing a value (PydanticSerializationError)
        raise InvalidRequestError(f"the request cannot be serialized: {str(e)[:200]}") from None
    annotate(completion_id=reqs[0].request_id)
    if pick is not None:  # the replica knows its model by its own name, not the route's
        for payload in payloads:
            payload["model"] = pick.deployment
    return payloads[0] if len(payloads) == 1 else payloads


def request_id_of(payload: dict[str, Any] | list[dict[str, Any]]) -> str:
    return (payload[0] if isinstance(payload, list) else payload)["request_id"]
