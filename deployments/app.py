"""Builders: validated config -> Ray Serve application.

``build_app`` is the ``import_path`` target of every config file in ``config/``, so ``serve run``,
``serve deploy`` and ``mlx-serving up`` all build the same application from the same arguments.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .config import INGRESS_DEPLOYMENT, AppConfig, IngressSettings, relay_actor_options
from .ingress import Ingress
from .replica import replica_deployment
from .router import router_deployment


def build_app(args: dict[str, Any]) -> Application:
    """Model replicas, the router (when the app has routes) and the ingress.

    The routes are the router's ``user_config`` and appear in no deployment's init args: a weight
    change is then a user_config-only update that Serve applies by calling ``reconfigure`` on the
    running router, restarting nothing. (A Serve config file's ``args`` are hashed into every
    deployment's code version, so routes edited *in args* would restart every replica under
    ``serve deploy``: ``mlx-serving up`` moves them into the router's user_config, see
    ``cluster.serve_config.for_deploy``.)
    """
    config = AppConfig.model_validate(args)
    models = {m.name: replica_deployment(m).bind(m.model_dump(mode="json")) for m in config.models}
    router = None
    if config.with_router:
        routes = {"routes": [r.model_dump(mode="json") for r in config.routes]}
        router = router_deployment().options(
            user_config=routes, ray_actor_options=relay_actor_options(config.env_vars)).bind([m.name for m in config.models])
    spread = {"max_replicas_per_node": config.ingress_max_replicas_per_node} if config.ingress_max_replicas_per_node else {}
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=4096,  # it relays; its admission gates (deployments/qos) hold what replicas cannot take
        ray_actor_options=relay_actor_options(config.env_vars),
        # Keys live in the ingress's user_config (`mlx-serving up` moves them there, as hashes): a key
        # change then reconfigures the ingress alone. `args.auth` is its default.
        user_config=IngressSettings(auth=config.auth).model_dump(mode="json"),
        **spread,
    )
    ingress_config = config.model_dump(mode="json", exclude={"routes"})
    return ingress.bind(ingress_config, models, router) if router is not None else ingress.bind(ingress_config, models)
