"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve): routes only, each a few lines.

Request path: ``http.limits`` (body size, UTF-8, JSON depth) -> body validated by pydantic
(``protocol``) -> ``http.auth`` (key -> tenant) -> ``serving.targets`` (model or route -> replica)
-> ``serving.generation`` (engine request, replica call through ``http.relay``, JSON or SSE).
Tokens stream straight from the replica to this process: no extra hop in the token path. Keys live
in this deployment's ``user_config`` (hashes), so rotating them reconfigures the ingress alone.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at runtime,
# through Serve's wrapper of this class.

import asyncio
import logging
import time
from functools import partial
from typing import Any, Literal

import ray
from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.errors import InvalidRequestError

from . import admin
from .admin import RolloutCommand, StageCommand
from .config import AppConfig, IngressSettings
from .gcs_kv import RayInternalKV
from .http.auth import Authenticator, check_exposure
from .http.errors import install_handlers
from .http.limits import RequestLimits
from .http.relay import unary
from .logging import setup as setup_logging
from .metrics import HttpObservability
from .protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, ReadyResponse, TokenizeRequest, TokenizeResponse,
)
from .qos.service import TICK_S, Qos
from .qos.shares import DemandBoard
from .readiness import Readiness
from .route_client import RouteClient
from .serving import chat, completions
from .serving.generation import GenerationFlow
from .serving.targets import Targets

log = logging.getLogger("mlx_serving.ingress")

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503, 504)
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 503)}

app = FastAPI(
    title="mlx-serving",
    version="0.1.0",
    description="OpenAI-compatible API over a Ray Serve cluster of MLX model replicas.",
)
install_handlers(app)
_limits = {"max_body_bytes": 4 * 1024 * 1024, "max_json_depth": 64}
app.add_middleware(RequestLimits, limits=lambda: (_limits["max_body_bytes"], _limits["max_json_depth"]))
app.add_middleware(HttpObservability)  # outermost: x-request-id, JSON access log, HTTP metrics


def _rank() -> int:
    """This ingress replica's rank in its deployment (0 when Serve does not say)."""
    try:
        return int(serve.get_replica_context().rank.rank)
    except Exception:  # noqa: BLE001 - older Serve: no ranks
        return 0


def _demand_board() -> DemandBoard | None:
    """Where this ingress's gates learn the other ingresses' demands (None outside a Ray worker)."""
    if not RayInternalKV.available():
        return None
    context = serve.get_replica_context()
    return DemandBoard(context.app_name, context.replica_id.unique_id)


def _proxy_host() -> str | None:
    """The address Serve's HTTP proxies listen on (asked of the controller once, at start)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception as e:  # noqa: BLE001 - the check is then left to `mlx-serving up`
        log.warning("could not read Serve's HTTP options: %r", e)
        return None


@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle],
                 router: DeploymentHandle | None = None) -> None:
        setup_logging("ingress")
        self.config = AppConfig.model_validate(config)
        _limits.update(max_body_bytes=self.config.limits.max_body_bytes,
                       max_json_depth=self.config.limits.max_json_depth)
        self.router = router
        self.routes = RouteClient(router)  # routes live in the router's user_config, not in these init args
        self.targets = Targets(models, self.routes)
        self.qos = Qos(self.config, self.config.auth.keys)
        self.qos.reports_scaling = _rank() == 0  # one ingress replica reports the autoscaler's moves
        self.demands = _demand_board()
        if self.demands is not None:
            self.qos.me = self.demands.me  # its name among the demands the board returns
        self.flow = GenerationFlow(self.targets, self.routes, self.qos)
        self.readiness = Readiness(serve.get_replica_context().app_name)
        self.created = int(time.time())
        self.http_host = _proxy_host()
        self._qos_task: asyncio.Task | None = None
        self.reconfigure({"auth": self.config.auth.model_dump()})  # until Serve hands over the user_config
        try:
            self.routes.start()  # fetch the routing table now, not on the first request
            self._start_qos()
        except RuntimeError:
            pass  # no running event loop: the first request starts them

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Keys changed (``serve deploy`` of a new user_config): only this deployment picks them up."""
        settings = IngressSettings.model_validate(user_config or {})
        auth = Authenticator(settings.auth)
        check_exposure(auth, self.http_host)
        self.auth = auth
        self.qos.set_policies(settings.auth.keys)

    def _start_qos(self) -> None:
        if self._qos_task is None:
            self._qos_task = asyncio.get_running_loop().create_task(self._qos_forever())

    async def _qos_forever(self) -> None:
        """Gates sized to the replicas that run and the ingresses' demands, the autoscaler's moves,
        shedding, gauges: every TICK_S."""
        while True:
            try:
                statuses = await self.readiness.statuses(self.config)
                peers = await asyncio.to_thread(self.demands.exchange, self.qos.demand()) if self.demands else None
                self.qos.refresh(statuses, peers)
            except RuntimeError as e:
                if "after shutdown" in str(e):  # the replica is stopping: its thread pool is gone
                    return
                log.exception("QoS refresh failed")
            except Exception:  # noqa: BLE001 - QoS bookkeeping must never take the ingress down
                log.exception("QoS refresh failed")
            await asyncio.sleep(TICK_S)

    # -- OpenAI API -----------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models(self, request: Request) -> ModelList:
        self.auth.tenant(request)
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in await self.targets.names()])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._start_qos()
        return await self.flow.run(body, request, self.auth, self.config.limits, "chatcmpl",
                                   partial(chat.stream_shape, body), partial(chat.whole, body))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._start_qos()
        return await self.flow.run(body, request, self.auth, self.config.limits, "cmpl",
                                   partial(completions.stream_shape, body), partial(completions.whole, body))

    # -- tokens ---------------------------------------------------------------------------------
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(self, body: TokenizeRequest, request: Request) -> TokenizeResponse:
        self.auth.tenant(request)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        target = await self.targets.resolve(body.model, request, self.auth)
        messages = [m.model_dump(mode="json", exclude_none=True) for m in body.messages] if body.messages else None
        tools = [t.model_dump(mode="json", exclude_none=True) for t in body.tools] if body.tools else None
        tokens = await unary(lambda: target.handle.tokenize.remote(body.prompt, messages, body.add_generation_prompt,
                                                                   tools, body.chat_template_kwargs))
        return TokenizeResponse(tokens=tokens, count=len(tokens))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        self.auth.tenant(request)
        target = await self.targets.resolve(body.model, request, self.auth)
        return DetokenizeResponse(prompt=await unary(lambda: target.handle.detokenize.remote(body.tokens)))

    # -- rollouts (admin) -----------------------------------------------------------------------
    @app.get("/admin/rollouts", responses=ADMIN_ERRORS)
    async def rollouts(self, request: Request) -> dict[str, Any]:
        """Every route: variants, weights, breakers, per-variant counts and latency summaries, rollout
        stage and state, the last Welch test and decision, and recent events."""
        self.auth.admin(request)
        return await admin.report(self.router, self.routes)

    @app.post("/admin/rollouts/{route}/stage", responses=ADMIN_ERRORS)
    async def set_stage(self, route: str, body: StageCommand, request: Request) -> dict[str, Any]:
        """Jump a route's rollout to a stage (from any state: also restarts a rolled-back one)."""
        self.auth.admin(request)
        return await admin.command(self.router, route, "set_stage", body.stage, body.reason)

    @app.post("/admin/rollouts/{route}/{action}", responses=ADMIN_ERRORS)
    async def rollout_action(self, route: str, action: Literal["promote", "rollback", "pause", "resume", "start"],
                             request: Request, body: RolloutCommand | None = Body(None)) -> dict[str, Any]:
        """promote (canary to 100%), rollback (canary to 0%), pause / resume judgement, start a pending rollout."""
        self.auth.admin(request)
        return await admin.command(self.router, route, action, None, body.reason if body else None)

    # -- quality of service ----------------------------------------------------------------------
    @app.get("/qos", responses=ERRORS)
    async def qos_report(self, request: Request) -> dict[str, Any]:
        """This ingress replica's view: per model its admission gate, SLO burn rates and shedding; the
        caller's key's limits and what is left of them."""
        _, key_hash = self.auth.identify(request)
        return self.qos.report(key_hash)

    # -- health ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready(self) -> JSONResponse:
        statuses = await self.readiness.statuses(self.config)
        body = ReadyResponse(ready=all(s.ready for s in statuses), models=statuses)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)
