"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve).

Request path: body validated by pydantic -> auth -> model handle chosen -> the replica's first item
awaited (so errors get a real status code) -> JSON, or SSE relaying each coalesced chunk. Tokens
stream straight from the replica to this process: no extra hop in the token path.
"""


import hmac
import os
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from engine.errors import AuthenticationError, EngineError, EngineFailureError, InvalidRequestError, ModelNotFoundError
from engine.request import GenerationChunk

from .config import AppConfig
from .http_errors import SSE_DONE, as_replica_error, error_response, sse_event
from .messages import ReplicaError
from .protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList, ModelStatus,
    ReadyResponse, TokenizeRequest, TokenizeResponse, UsageInfo, new_id,
)

VARIANT_HEADER = "x-mlx-variant"
REPLICA_RETRIES = 2  # attempts after a replica died before answering
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503, 504)
}

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


def as_engine_error(err: ReplicaError) -> EngineError:
    """Re-raise a replica's error in this process with its status and code intact."""
    e = EngineError(err.message, param=err.param, code=err.code, retry_after=err.retry_after)
    e.http_status = err.http_status
    e.type = err.type
    return e


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle]) -> None:
        self.config = AppConfig.model_validate(config)
        _limits["max_body_bytes"] = self.config.limits.max_body_bytes
        self.models = models
        self.created = int(time.time())
        env_keys = [k.strip() for k in os.environ.get("MLX_SERVING_API_KEYS", "").split(",") if k.strip()]
        self.api_keys = [k.encode() for k in env_keys + self.config.auth.api_keys + self.config.auth.admin_keys]

    # -- plumbing -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        # compare against every key so timing does not reveal which one (or whether any) matched
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise AuthenticationError("invalid API key")

    def _handle(self, model: str) -> tuple[DeploymentHandle, str]:
        handle = self.models.get(model)
        if handle is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist; GET /v1/models lists the models served",
                                     param="model")
        return handle, model

    def _engine_request(self, body: ChatCompletionRequest | CompletionRequest, prefix: str) -> dict[str, Any]:
        limits = self.config.limits
        try:
            req = body.to_engine(limits.default_max_tokens, limits.request_timeout_s, new_id(prefix))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            raise InvalidRequestError(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), param=loc or None) from e
        return req.model_dump(mode="json")

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

    async def _relay(self, gen: DeploymentResponseGenerator, first: GenerationChunk) -> AsyncIterator[GenerationChunk | ReplicaError]:
        """Chunks from the replica; a failure mid-stream becomes a final ``ReplicaError``."""
        item: GenerationChunk | ReplicaError = first
        finished = False
        try:
            while True:
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
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in self.models])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._authorize(request)
        handle, variant = self._handle(body.model)
        payload = self._engine_request(body, "chatcmpl")
        headers = {VARIANT_HEADER: variant}
        if body.stream:
            gen, first = await self._open_stream(handle, payload)
            return StreamingResponse(self._chat_sse(body, payload["request_id"], gen, first),
                                     media_type="text/event-stream", headers=headers)
        result = await self._complete(handle, payload)
        return JSONResponse(ChatCompletionResponse(
            id=payload["request_id"], model=body.model,
            choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason,
                                logprobs=ChatLogprobs.of(result.logprobs))],
            usage=UsageInfo.of(result),
        ).model_dump(mode="json", exclude_none=True), headers=headers)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._authorize(request)
        handle, variant = self._handle(body.model)
        payload = self._engine_request(body, "cmpl")
        headers = {VARIANT_HEADER: variant}
        if body.stream:
            gen, first = await self._open_stream(handle, payload)
            return StreamingResponse(self._completion_sse(body, payload["request_id"], gen, first),
                                     media_type="text/event-stream", headers=headers)
        result = await self._complete(handle, payload)
        text = (body.prompt if body.echo and isinstance(body.prompt, str) else "") + result.text
        return JSONResponse(CompletionResponse(
            id=payload["request_id"], model=body.model,
            choices=[CompletionChoice(text=text, finish_reason=result.finish_reason,
                                      logprobs=CompletionLogprobs.of(result.logprobs))],
            usage=UsageInfo.of(result),
        ).model_dump(mode="json", exclude_none=True), headers=headers)

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

    async def _chat_sse(self, body: ChatCompletionRequest, rid: str, gen: DeploymentResponseGenerator,
                        first: GenerationChunk) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None,
                  usage: UsageInfo | None = None, choices: bool = True) -> str:
            c = ChatCompletionChunk(
                id=rid, created=created, model=body.model, usage=usage,
                choices=[ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else [],
            )
            return sse_event(c.model_dump_json(exclude_none=True))

        yield chunk(ChatDelta(role="assistant", content=""))
        last: GenerationChunk | None = None
        async for item in self._relay(gen, first):
            if isinstance(item, ReplicaError):
                yield sse_event(item.to_openai())
                break
            last = item
            if item.text or item.finish_reason or item.logprobs:
                yield chunk(ChatDelta(content=item.text), item.finish_reason, ChatLogprobs.of(item.logprobs))
        if body.include_usage and last is not None and last.usage is not None:
            yield chunk(ChatDelta(), usage=UsageInfo.of(last), choices=False)
        yield SSE_DONE

    async def _completion_sse(self, body: CompletionRequest, rid: str, gen: DeploymentResponseGenerator,
                              first: GenerationChunk) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            c = CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage)
            return sse_event(c.model_dump_json(exclude_none=True))

        if body.echo and isinstance(body.prompt, str):
            yield chunk([CompletionChoice(text=body.prompt)])
        last: GenerationChunk | None = None
        async for item in self._relay(gen, first):
            if isinstance(item, ReplicaError):
                yield sse_event(item.to_openai())
                break
            last = item
            if item.text or item.finish_reason or item.logprobs:
                yield chunk([CompletionChoice(text=item.text, finish_reason=item.finish_reason,
                                              logprobs=CompletionLogprobs.of(item.logprobs))])
        if body.include_usage and last is not None and last.usage is not None:
            yield chunk([], usage=UsageInfo.of(last))
        yield SSE_DONE

    # -- tokens ---------------------------------------------------------------------------------
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(self, body: TokenizeRequest, request: Request) -> TokenizeResponse:
        self._authorize(request)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        handle, _ = self._handle(body.model)
        messages = [m.model_dump(mode="json", exclude_none=True) for m in body.messages] if body.messages else None
        tokens = await self._unary(handle.tokenize.remote(body.prompt, messages, body.add_generation_prompt))
        return TokenizeResponse(tokens=tokens, count=len(tokens))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        self._authorize(request)
        handle, _ = self._handle(body.model)
        return DetokenizeResponse(prompt=await self._unary(handle.detokenize.remote(body.tokens)))

    async def _unary(self, response: Any) -> Any:
        try:
            result = await response
        except Exception as e:  # noqa: BLE001
            raise as_engine_error(as_replica_error(e)) from e
        if isinstance(result, ReplicaError):
            raise as_engine_error(result)
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
            d = deployments.get(m.deployment_name)
            if d is None:
                out.append(ModelStatus(name=m.name, ready=False, detail="deployment not found"))
                continue
            running = int(d.replica_states.get("RUNNING", 0))
            out.append(ModelStatus(name=m.name, ready=running > 0,
                                   replicas_healthy=running, detail=f"{_status_name(d.status)} {d.message}".strip()))
        return out
