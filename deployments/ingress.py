"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve).

Request path: body validated by pydantic -> auth -> model handle chosen -> the replica's first item
awaited (so errors get a real status code) -> JSON, or SSE relaying each coalesced chunk. Tokens
stream straight from the replica to this process: no extra hop in the token path.

A ``model`` that names a route (canary / A-B) is resolved to a variant here, from the router
deployment's table kept locally (``route_client``), so routing adds no hop either; the outcome goes
back to the router in batches. ``/admin/rollouts`` reports and steers rollouts (admin keys only).
"""


import hmac
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from engine.errors import AuthenticationError, EngineError, EngineFailureError, InvalidRequestError, ModelNotFoundError
from engine.request import GenerationChunk

from .config import AppConfig
from .http_errors import SSE_DONE, as_replica_error, error_response, sse_event
from .logging import annotate, setup as setup_logging
from .messages import ReplicaError
from .metrics import HttpObservability
from .route_client import PermissionDeniedError, Pick, RouteClient, routing_error
from .routing.stats import Outcome
from .protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList, ModelStatus,
    ReadyResponse, TokenizeRequest, TokenizeResponse, UsageInfo, new_id,
)

VARIANT_HEADER = "x-mlx-variant"  # on every response: the variant (or, for a plain model, the model) that served it
FORCE_HEADER = "x-mlx-force-variant"  # admin keys only: pin a route's request to one variant
SESSION_HEADER = "x-session-id"  # sticky A/B key; the OpenAI `user` field when absent
REPLICA_RETRIES = 2  # attempts after a replica died before answering
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503, 504)
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 503)}

app = FastAPI(
    title="mlx-serving",
    version="0.1.0",
    description="OpenAI-compatible API over a Ray Serve cluster of MLX model replicas.",
)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    msg = err.get("msg", "invalid request")
    code = "invalid_json" if err.get("type") == "json_invalid" else "invalid_request"
    return error_response(InvalidRequestError(f"{'.'.join(loc) + ': ' if loc else ''}{msg}",
                                              param=".".join(loc) or None, code=code))


@app.exception_handler(EngineError)
async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
    return error_response(exc)


class BodyLimit:
    """413 for bodies over the limit, whether or not the client sent Content-Length."""

    class _TooLarge(BaseException):  # BaseException: FastAPI turns any Exception while reading into a 400
        pass

    def __init__(self, app: Callable, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reject(scope, receive, send, limit)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyLimit._TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except BodyLimit._TooLarge:
            await self._reject(scope, receive, send, limit)

    @staticmethod
    async def _reject(scope: dict, receive: Callable, send: Callable, limit: int) -> None:
        from engine.errors import RequestTooLargeError

        resp = error_response(RequestTooLargeError(f"request body is larger than {limit} bytes"))
        await resp(scope, receive, send)


_limits = {"max_body_bytes": 4 * 1024 * 1024}
app.add_middleware(BodyLimit, max_bytes=lambda: _limits["max_body_bytes"])
app.add_middleware(HttpObservability)  # outermost: x-request-id, JSON access log, HTTP metrics


def as_engine_error(err: ReplicaError) -> EngineError:
    """Re-raise a replica's error in this process with its status and code intact."""
    e = EngineError(err.message, param=err.param, code=err.code, retry_after=err.retry_after)
    e.http_status = err.http_status
    e.type = err.type
    return e


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _keys(env: str, configured: list[str]) -> list[bytes]:
    return [k.strip().encode() for k in os.environ.get(env, "").split(",") + configured if k.strip()]


def _matches(given: bytes, keys: list[bytes]) -> bool:
    ok = False
    for key in keys:  # compare against every key so timing does not reveal which one (or whether any) matched
        ok |= hmac.compare_digest(given, key)
    return ok


def _outcome(pick: Pick | None, t0: float, err: ReplicaError | EngineError | None = None,
             first_at: float | None = None, tokens: int = 0) -> Outcome | None:
    """What one routed request tells the router: ok or the error's code, TTFT, time per output token, e2e."""
    if pick is None:
        return None
    now = time.perf_counter()
    if err is not None:
        status = err.http_status
        return Outcome(ok=False, code=err.code, e2e_s=now - t0, client_error=400 <= status < 500 and status != 429)
    ttft = first_at - t0 if first_at is not None else None
    tpot = (now - first_at) / (tokens - 1) if first_at is not None and tokens > 1 else None
    return Outcome(ok=True, ttft_s=ttft, tpot_s=tpot, e2e_s=now - t0)


@dataclass(frozen=True)
class _Track:
    """A routed stream being timed: its decision, arrival and first-item times (perf_counter)."""

    pick: Pick
    t0: float
    first_at: float


class RolloutCommand(BaseModel):
    reason: str | None = Field(None, max_length=500, description="Recorded with the decision.")


class StageCommand(RolloutCommand):
    stage: int = Field(ge=0, description="Index into the rollout policy's stages.")


@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle],
                 router: DeploymentHandle | None = None) -> None:
        setup_logging("ingress")
        self.config = AppConfig.model_validate(config)
        _limits["max_body_bytes"] = self.config.limits.max_body_bytes
        self.models = models
        self.routes = RouteClient(router)  # routes live in the router's user_config, not in these init args
        self.router = router
        self.created = int(time.time())
        try:
            self.routes.start()  # fetch the routing table now, not on the first request
        except RuntimeError:
            pass  # no running event loop: the first request starts it
        self.admin_keys = _keys("MLX_SERVING_ADMIN_KEYS", self.config.auth.admin_keys)
        api_keys = _keys("MLX_SERVING_API_KEYS", self.config.auth.api_keys)
        # Admin keys are API keys too, but they alone do not close the API: with no API key configured
        # the /v1 routes stay open and admin keys only guard /admin and the forced-variant header.
        self.api_keys = api_keys + self.admin_keys if api_keys else []

    # -- plumbing -------------------------------------------------------------------------------
    @staticmethod
    def _bearer(request: Request, what: str = "API key") -> bytes:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(f"missing {what}: send 'Authorization: Bearer <key>'")
        return token.strip().encode()

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        if not _matches(self._bearer(request), self.api_keys):
            raise AuthenticationError("invalid API key")

    def _authorize_admin(self, request: Request) -> None:
        """401 without a valid key; 403 for a valid non-admin key, and when no admin key is configured."""
        if not self.admin_keys:
            raise PermissionDeniedError("the admin API is disabled: no admin keys are configured (set auth.admin_keys "
                                        "in the config or MLX_SERVING_ADMIN_KEYS)", code="admin_disabled")
        given = self._bearer(request, "admin key")
        if _matches(given, self.admin_keys):
            return
        if self.api_keys and _matches(given, self.api_keys):
            raise PermissionDeniedError("this API key is not an admin key")
        raise AuthenticationError("invalid admin key")

    async def _target(self, model: str, request: Request, user: str | None = None) -> tuple[DeploymentHandle, str, Pick | None]:
        """The handle, the variant name for ``x-mlx-variant``, and the route decision (None for a plain model).

        A plain model costs one dict lookup once the routing table is loaded; a route is decided
        locally from the router's table (sticky on ``x-session-id``, else ``user``)."""
        force = request.headers.get(FORCE_HEADER)
        if force is not None:
            self._authorize_admin(request)
        if not self.routes.loaded:
            await self.routes.ensure_loaded()
        if not self.routes.is_route(model):
            if force is not None and force != model:
                raise InvalidRequestError(f"{FORCE_HEADER} applies to routes; {model!r} is a model, not a route",
                                          param=FORCE_HEADER)
            handle, name = self._handle(model)
            return handle, name, None
        pick = await self.routes.pick(model, request.headers.get(SESSION_HEADER) or user, force)
        handle = self.models.get(pick.deployment)
        if handle is None:  # validated at deploy time; a stale table during a redeploy could still say so
            raise routing_error({"error": "NoVariantAvailableError",
                                 "message": f"route {model!r}: variant {pick.variant!r} sends to unknown model {pick.deployment!r}"})
        return handle, pick.variant, pick

    def _handle(self, model: str) -> tuple[DeploymentHandle, str]:
        handle = self.models.get(model)
        if handle is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist; GET /v1/models lists the models served",
                                     param="model")
        return handle, model

    def _engine_request(self, body: ChatCompletionRequest | CompletionRequest, prefix: str,
                        pick: Pick | None = None) -> dict[str, Any]:
        limits = self.config.limits
        annotate(model=body.model)  # for the access log and the HTTP metrics (a known model or route here)
        try:
            req = body.to_engine(limits.default_max_tokens, limits.request_timeout_s, new_id(prefix))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            raise InvalidRequestError(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), param=loc or None) from e
        payload = req.model_dump(mode="json")
        annotate(completion_id=req.request_id)
        if pick is not None:  # the replica knows its model by its own name, not the route's
            payload["model"] = pick.deployment
        return payload

    async def _open_stream(self, handle: DeploymentHandle, payload: dict) -> tuple[DeploymentResponseGenerator, GenerationChunk]:
        """Start streaming and wait for the first item, so failures still get a proper status.

        A replica (or its host) that dies before producing anything costs the client nothing: the
        request goes to another replica, since no byte of the response has been sent yet.
        """
        for attempt in range(REPLICA_RETRIES + 1):
            gen = handle.options(stream=True).generate.remote(payload)
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                raise as_engine_error(ReplicaError.of(EngineFailureError("the replica produced no output")))
            except RayActorError:
                if attempt < REPLICA_RETRIES:
                    continue
                raise as_engine_error(as_replica_error(RayActorError())) from None
            except Exception as e:  # noqa: BLE001 - Ray and Serve errors become OpenAI errors
                raise as_engine_error(as_replica_error(e)) from e
            if isinstance(first, ReplicaError):
                gen.cancel()
                raise as_engine_error(first)
            return gen, first
        raise AssertionError("unreachable")

    async def _relay(self, gen: DeploymentResponseGenerator, first: GenerationChunk,
                     track: _Track | None = None) -> AsyncIterator[GenerationChunk | ReplicaError]:
        """Chunks from the replica; a failure mid-stream becomes a final ``ReplicaError``.

        For a routed request (``track``) the outcome goes to the router when the stream ends (not when
        the client went away: a cancelled request says nothing about the variant)."""
        item: GenerationChunk | ReplicaError = first
        finished = False
        tokens = 0
        try:
            while True:
                if track is not None:
                    if isinstance(item, ReplicaError):
                        self.routes.record(track.pick, _outcome(track.pick, track.t0, item))
                    else:
                        tokens += len(item.token_ids)
                        if item.finish_reason is not None:
                            n = item.usage.completion_tokens if item.usage is not None else tokens
                            self.routes.record(track.pick, _outcome(track.pick, track.t0, first_at=track.first_at, tokens=n))
                yield item
                if isinstance(item, ReplicaError) or item.finish_reason is not None:
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
            if not finished:  # the client went away: cancel all the way down to the GPU batch
                gen.cancel()

    # -- OpenAI API -----------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models(self, request: Request) -> ModelList:
        self._authorize(request)
        if not self.routes.loaded:
            await self.routes.ensure_loaded()
        names = list(self.models) + [r for r in self.routes.routes if r not in self.models]
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in names])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        def whole(rid: str, result: GenerationChunk) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=rid, model=body.model, usage=UsageInfo.of(result),
                choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason,
                                    logprobs=ChatLogprobs.of(result.logprobs))])

        return await self._generate(body, request, "chatcmpl", self._chat_sse, whole)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        def whole(rid: str, result: GenerationChunk) -> CompletionResponse:
            text = (body.prompt if body.echo and isinstance(body.prompt, str) else "") + result.text
            return CompletionResponse(
                id=rid, model=body.model, usage=UsageInfo.of(result),
                choices=[CompletionChoice(text=text, finish_reason=result.finish_reason,
                                          logprobs=CompletionLogprobs.of(result.logprobs))])

        return await self._generate(body, request, "cmpl", self._completion_sse, whole)

    async def _generate(self, body: Any, request: Request, prefix: str, sse: Callable[..., AsyncIterator[str]],
                        whole: Callable[[str, GenerationChunk], BaseModel]) -> Any:
        """The flow both generation routes share: auth, routing to a variant, one replica call (streamed
        as SSE, or ``whole`` for the complete answer), and the outcome reported to the router."""
        self._authorize(request)
        t0 = time.perf_counter()
        handle, variant, pick = await self._target(body.model, request, body.user)
        headers = {VARIANT_HEADER: variant}
        try:
            payload = self._engine_request(body, prefix, pick)
            if body.stream:
                gen, first = await self._open_stream(handle, payload)
                track = _Track(pick, t0, time.perf_counter()) if pick is not None else None
                return StreamingResponse(sse(body, payload["request_id"], gen, first, track),
                                         media_type="text/event-stream", headers=headers)
            result = await self._complete(handle, payload)
        except EngineError as e:
            return self._failed(pick, t0, e, headers)
        self._succeeded(pick, t0, result)
        return JSONResponse(whole(payload["request_id"], result).model_dump(mode="json", exclude_none=True),
                            headers=headers)

    def _failed(self, pick: Pick | None, t0: float, e: EngineError, headers: dict[str, str]) -> JSONResponse:
        if pick is not None:
            self.routes.record(pick, _outcome(pick, t0, e))
        return error_response(e, headers)

    def _succeeded(self, pick: Pick | None, t0: float, result: GenerationChunk) -> None:
        if pick is not None:  # a whole answer: its end-to-end latency and mean time per output token
            n = result.usage.completion_tokens if result.usage is not None else len(result.token_ids)
            e2e = time.perf_counter() - t0
            self.routes.record(pick, Outcome(ok=True, e2e_s=e2e, tpot_s=e2e / n if n else None))

    async def _complete(self, handle: DeploymentHandle, payload: dict) -> GenerationChunk:
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                result = await handle.complete.remote(payload)
                break
            except RayActorError as e:  # nothing was sent to the client yet: another replica may serve it
                if attempt == REPLICA_RETRIES:
                    raise as_engine_error(as_replica_error(e)) from e
            except Exception as e:  # noqa: BLE001
                raise as_engine_error(as_replica_error(e)) from e
        if isinstance(result, ReplicaError):
            raise as_engine_error(result)
        return result

    def _chat_sse(self, body: ChatCompletionRequest, rid: str, gen: DeploymentResponseGenerator,
                  first: GenerationChunk, track: _Track | None = None) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None,
                  usage: UsageInfo | None = None, choices: bool = True) -> str:
            c = ChatCompletionChunk(
                id=rid, created=created, model=body.model, usage=usage,
                choices=[ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else [],
            )
            return sse_event(c.model_dump_json(exclude_none=True))

        return self._sse(body, gen, first, track, opening=chunk(ChatDelta(role="assistant", content="")),
                         event=lambda item: chunk(ChatDelta(content=item.text), item.finish_reason,
                                                  ChatLogprobs.of(item.logprobs)),
                         usage_event=lambda usage: chunk(ChatDelta(), usage=usage, choices=False))

    def _completion_sse(self, body: CompletionRequest, rid: str, gen: DeploymentResponseGenerator,
                        first: GenerationChunk, track: _Track | None = None) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            c = CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage)
            return sse_event(c.model_dump_json(exclude_none=True))

        echo = chunk([CompletionChoice(text=body.prompt)]) if body.echo and isinstance(body.prompt, str) else None
        return self._sse(body, gen, first, track, opening=echo,
                         event=lambda item: chunk([CompletionChoice(text=item.text, finish_reason=item.finish_reason,
                                                                    logprobs=CompletionLogprobs.of(item.logprobs))]),
                         usage_event=lambda usage: chunk([], usage=usage))

    async def _sse(self, body: Any, gen: DeploymentResponseGenerator, first: GenerationChunk, track: _Track | None, *,
                   opening: str | None, event: Callable[[GenerationChunk], str],
                   usage_event: Callable[[UsageInfo], str]) -> AsyncIterator[str]:
        """One SSE stream as OpenAI sends it: events with content, an error event if the replica
        failed, the usage event when asked for, then ``[DONE]``."""
        if opening is not None:
            yield opening
        last: GenerationChunk | None = None
        async for item in self._relay(gen, first, track):
            if isinstance(item, ReplicaError):
                yield sse_event(item.to_openai())
                break
            last = item
            if item.text or item.finish_reason or item.logprobs:
                yield event(item)
        if body.include_usage and last is not None and last.usage is not None:
            yield usage_event(UsageInfo.of(last))
        yield SSE_DONE

    # -- tokens ---------------------------------------------------------------------------------
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(self, body: TokenizeRequest, request: Request) -> TokenizeResponse:
        self._authorize(request)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        handle, _, _ = await self._target(body.model, request)
        messages = [m.model_dump(mode="json", exclude_none=True) for m in body.messages] if body.messages else None
        tokens = await self._unary(handle.tokenize.remote(body.prompt, messages, body.add_generation_prompt))
        return TokenizeResponse(tokens=tokens, count=len(tokens))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        self._authorize(request)
        handle, _, _ = await self._target(body.model, request)
        return DetokenizeResponse(prompt=await self._unary(handle.detokenize.remote(body.tokens)))

    async def _unary(self, response: Any) -> Any:
        try:
            result = await response
        except Exception as e:  # noqa: BLE001
            raise as_engine_error(as_replica_error(e)) from e
        if isinstance(result, ReplicaError):
            raise as_engine_error(result)
        return result

    # -- rollouts (admin) -----------------------------------------------------------------------
    @app.get("/admin/rollouts", responses=ADMIN_ERRORS)
    async def rollouts(self, request: Request) -> dict[str, Any]:
        """Every route: variants, weights, breakers, per-variant counts and latency summaries, rollout
        stage and state, the last Welch test and decision, and recent events."""
        self._authorize_admin(request)
        ingress = {"table_version": self.routes.version, "routes": self.routes.routes,
                   "outcomes_dropped": self.routes.dropped}
        if self.router is None:
            return {"routes": {}, "recent_events": [], "router": None, "ingress": ingress,
                    "detail": "no router deployed: this application has no routes"}
        try:
            report = await self.router.report.remote()
        except Exception as e:  # noqa: BLE001
            raise as_engine_error(as_replica_error(e)) from e
        return {**report, "ingress": ingress}

    @app.post("/admin/rollouts/{route}/stage", responses=ADMIN_ERRORS)
    async def set_stage(self, route: str, body: StageCommand, request: Request) -> dict[str, Any]:
        """Jump a route's rollout to a stage (from any state: also restarts a rolled-back one)."""
        return await self._rollout_command(request, route, "set_stage", body.stage, body.reason)

    @app.post("/admin/rollouts/{route}/{action}", responses=ADMIN_ERRORS)
    async def rollout_action(self, route: str, action: Literal["promote", "rollback", "pause", "resume", "start"],
                             request: Request, body: RolloutCommand | None = Body(None)) -> dict[str, Any]:
        """promote (canary to 100%), rollback (canary to 0%), pause / resume judgement, start a pending rollout."""
        return await self._rollout_command(request, route, action, None, body.reason if body else None)

    async def _rollout_command(self, request: Request, route: str, action: str, stage: int | None,
                               reason: str | None) -> dict[str, Any]:
        self._authorize_admin(request)
        if self.router is None:
            raise ModelNotFoundError(f"no route named {route!r}: this application has no routes", param="route")
        try:
            result = await self.router.command.remote(route, action, stage, reason or f"manual {action} (admin API)")
        except Exception as e:  # noqa: BLE001
            raise as_engine_error(as_replica_error(e)) from e
        if "error" in result:
            raise routing_error(result)
        return result

    # -- health ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready(self) -> JSONResponse:
        statuses = self._model_statuses()
        body = ReadyResponse(ready=all(s.ready for s in statuses), models=statuses)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)

    def _model_statuses(self) -> list[ModelStatus]:
        """Readiness from Serve's own view: a model is ready when a replica of it is running and healthy."""
        app_name = serve.get_replica_context().app_name
        try:
            deployments = serve.status().applications[app_name].deployments
        except Exception as e:  # noqa: BLE001 - the controller is briefly unreachable
            return [ModelStatus(name=m.name, ready=False, detail=f"status unavailable: {e}") for m in self.config.models]
        out = []
        for m in self.config.models:
            target = m.num_replicas if m.num_replicas is not None else int((m.autoscaling_config or {}).get("min_replicas", 1))
            d = deployments.get(m.deployment_name)
            if d is None:
                out.append(ModelStatus(name=m.name, ready=False, detail="deployment not found", replicas_target=target))
                continue
            # A model stays ready while one replica runs; fewer than configured (a host is down, its
            # replicas wait for it or for room elsewhere) is reported as degraded, not as down.
            running = int(d.replica_states.get("RUNNING", 0))
            # Serve's message may hold a whole traceback: its first line says enough.
            message = (d.message or "").strip().splitlines()[0][:200] if (d.message or "").strip() else ""
            message = message.removesuffix("Error:").strip()
            detail = f"{_status_name(d.status)} {message}".strip()
            if running < target:
                detail += f" ({running} of {target} replicas running)"
            out.append(ModelStatus(name=m.name, ready=running > 0, replicas_healthy=running, detail=detail,
                                   replicas_target=target, degraded=0 < running < target))
        return out
