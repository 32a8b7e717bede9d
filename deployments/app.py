"""Builders: validated config -> Ray Serve application.

``build_app`` is the ``import_path`` target of every config file in ``config/``, so ``serve run``,
``serve deploy`` and ``mlx-serving up`` all build the same application from the same arguments.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .config import AppConfig
from .ingress import Ingress
from .replica import replica_deployment


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    models = {m.name: replica_deployment(m).bind(m.model_dump(mode="json")) for m in config.models}
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=4096,  # it only relays; admission control lives at the replicas
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(config.model_dump(mode="json"), models)
