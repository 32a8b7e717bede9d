"""Reading and checking Ray Serve config files whose applications use ``deployments.app:build_app``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

BUILD_APP = "deployments.app:build_app"
REPO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
DEFAULT_CONFIG = REPO_CONFIG_DIR / "demo.yaml"


def load(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping with an `applications:` list")
    return data


def _pydantic_problems(e: ValidationError, prefix: str) -> list[str]:
    out = []
    for err in e.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ()))
        out.append(f"{prefix}{loc}: {err.get('msg')}")
    return out


def problems(config: dict[str, Any]) -> list[str]:
    """Every problem in a Serve config file, each with its path; empty when the file is valid."""
    from ray.serve.schema import ServeDeploySchema

    found: list[str] = []
    try:
        ServeDeploySchema.parse_obj(config)
    except Exception as e:  # Ray's schema is pydantic v1: its errors() has the same shape
        errors = getattr(e, "errors", None)
        if callable(errors):
            for err in errors():
                loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ()))
                found.append(f"{loc.lstrip('.')}: {err.get('msg')}")
        else:
            found.append(str(e))
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        if not found:
            found.append("applications: give at least one application")
        return found
    for i, app in enumerate(apps):
        if not isinstance(app, dict) or app.get("import_path") != BUILD_APP:
            continue
        found.extend(_app_problems(app, f"applications[{i}]"))
    return found


def _loc(path: tuple) -> str:
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in path)


def _router_override(app: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """``(index, entry)`` of the router's entry in the app's ``deployments:`` overrides, if any."""
    from deployments.config import ROUTER_DEPLOYMENT

    for j, d in enumerate(app.get("deployments") or []):
        if isinstance(d, dict) and d.get("name") == ROUTER_DEPLOYMENT:
            return j, d
    return None


def _app_problems(app: dict[str, Any], where: str) -> list[str]:
    """An application's args, and its routes (in ``args.routes`` or in the router's user_config)
    checked against its models, every problem with its path."""
    from deployments.config import AppConfig, route_problems
    from deployments.routing.config import RouteConfig, RoutingConfig

    args = app.get("args") or {}
    found: list[str] = []
    try:
        AppConfig.model_validate(args)
        args_ok = True
    except ValidationError as e:
        args_ok = False
        root_msgs = [err.get("msg", "") for err in e.errors() if not err.get("loc")]
        found.extend(p for p, err in zip(_pydantic_problems(e, f"{where}.args"), e.errors())
                     if err.get("loc"))  # route problems (root level) are reported below, with their paths
    models = [m.get("name") for m in args.get("models") or [] if isinstance(m, dict)] if isinstance(args, dict) else []
    route_msgs: list[tuple[str, str]] = []
    for k, r in enumerate(args.get("routes") or [] if isinstance(args, dict) else []):
        try:
            route = RouteConfig.model_validate(r)
        except ValidationError:
            continue  # reported above with its path
        route_msgs += [(f"{where}.args.routes[{k}]{_loc(path[1:])}", msg) for path, msg in route_problems([route], models)]
    found.extend(f"{p}: {m}" for p, m in route_msgs)
    if not args_ok:  # root-level problems that are not route problems (unique names, replicas)
        found.extend(f"{where}.args: {m}" for m in root_msgs if not any(rm in m for _, rm in route_msgs))
    found.extend(_ingress_problems(app, where))
    found.extend(shard_mode_problems(app, where)[0])
    override = _router_override(app)
    if override is not None:
        j, entry = override
        uc_where = f"{where}.deployments[{j}].user_config"
        uc = entry.get("user_config")
        if isinstance(args, dict) and args.get("routes"):
            found.append(f"{uc_where}: routes are given twice (here and in args.routes); keep one")
        if isinstance(args, dict) and not args.get("routes") and args.get("router") is not True:
            found.append(f"{where}.args.router: set `router: true` so the router deployment that this "
                         f"user_config configures exists")
        try:
            cfg = RoutingConfig.model_validate(uc or {})
        except ValidationError as e:
            found.extend(_pydantic_problems(e, uc_where))
        else:
            found.extend(f"{uc_where}.routes{_loc(path)}: {msg}" for path, msg in route_problems(cfg.routes, models))
    return found


def shard_mode_problems(app: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: each sharded model whose architecture lacks its ``shard.mode``; notes for
    those whose architecture is not here to look at (a hub id not downloaded yet)."""
    from . import shard_modes

    return shard_modes.check(shard_modes.in_app_args(app.get("args"), f"{where}.args"))


def _override(app: dict[str, Any], name: str) -> dict[str, Any]:
    """The app's ``deployments:`` entry for deployment ``name``, added if missing."""
    deployments = app.setdefault("deployments", [])
    for d in deployments:
        if isinstance(d, dict) and d.get("name") == name:
            return d
    entry: dict[str, Any] = {"name": name}
    deployments.append(entry)
    return entry


def _ingress_problems(app: dict[str, Any], where: str) -> list[str]:
    from deployments.config import INGRESS_DEPLOYMENT, IngressSettings

    for j, d in enumerate(app.get("deployments") or []):
        if isinstance(d, dict) and d.get("name") == INGRESS_DEPLOYMENT and d.get("user_config") is not None:
            try:
                IngressSettings.model_validate(d["user_config"])
            except ValidationError as e:
                return _pydantic_problems(e, f"{where}.deployments[{j}].user_config")
    return []


def for_deploy(config: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The config as ``mlx-serving up`` deploys it: routes and keys moved into user_configs.

    Serve hashes an application's ``args`` into the code version of every deployment, so a weight or
    a key edited in ``args`` would restart every replica. In a ``user_config`` (a ``deployments:``
    override) the same edit is applied live by ``reconfigure``: ``args.routes`` go to the router's,
    ``args.auth`` to the ingress's, together with the hashes of the keys in ``MLX_SERVING_API_KEYS`` /
    ``MLX_SERVING_ADMIN_KEYS`` of this environment (so they reach the ingress wherever it runs, and no
    plain key is ever deployed). ``args.router: true`` keeps the router in the app, so ``args`` stay
    the same from one edit to the next.
    """
    from deployments.config import INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT
    from deployments.http.auth import ADMIN_KEYS_ENV, API_KEYS_ENV, env_key_hashes

    out = copy.deepcopy(config)
    for app in out.get("applications") or []:
        if not isinstance(app, dict) or app.get("import_path") != BUILD_APP:
            continue
        args = app.get("args")
        if not isinstance(args, dict):
            continue
        if "routes" in args:
            routes = args.pop("routes") or []
            args["router"] = True
            _override(app, ROUTER_DEPLOYMENT)["user_config"] = {"routes": routes}
        ingress = _override(app, INGRESS_DEPLOYMENT)
        settings = dict(ingress.get("user_config") or {})
        auth = {**(args.pop("auth", None) or {}), **(settings.get("auth") or {})}
        for field, env in (("api_keys", API_KEYS_ENV), ("admin_keys", ADMIN_KEYS_ENV)):
            auth[field] = list(dict.fromkeys([*(auth.get(field) or []), *env_key_hashes(env, environ)]))
        ingress["user_config"] = {**settings, "auth": auth}
    return out


def api_keys_configured(config: dict[str, Any], environ: dict[str, str] | None = None) -> bool:
    """Whether every application's API requires a key (from its config or this environment)."""
    deployed = for_deploy(config, environ)
    apps = [a for a in deployed.get("applications") or [] if isinstance(a, dict) and a.get("import_path") == BUILD_APP]
    return bool(apps) and all(api_key_count(ingress_auth(a)) for a in apps)


def allows_unauthenticated_network(config: dict[str, Any]) -> bool:
    """Whether the config opts in to an unauthenticated API on a non-loopback address."""
    apps = [a for a in for_deploy(config, {}).get("applications") or [] if isinstance(a, dict)
            and a.get("import_path") == BUILD_APP]
    return any(ingress_auth(a).get("allow_unauthenticated_network") for a in apps)


def api_key_count(auth: dict[str, Any]) -> int:
    """Keys that open the API: plain hashes and keys with a policy (docs/qos.md) alike."""
    return len(auth.get("api_keys") or []) + len(auth.get("keys") or [])


def ingress_auth(app: dict[str, Any]) -> dict[str, Any]:
    """The ``auth`` section of a deployed application's ingress ``user_config``."""
    from deployments.config import INGRESS_DEPLOYMENT

    for d in app.get("deployments") or []:
        if isinstance(d, dict) and d.get("name") == INGRESS_DEPLOYMENT:
            return dict((d.get("user_config") or {}).get("auth") or {})
    return {}


def app_args(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [a.get("args") or {} for a in config.get("applications", []) if a.get("import_path") == BUILD_APP]


def model_name_of(source: str) -> str:
    """The API name ``serve`` gives a source: a hub id's or a path's last part, ``demo`` for demo models."""
    if source.startswith("demo:"):
        return "demo"
    return Path(source.rstrip("/")).name or source


def one_model(source: str, *, name: str | None = None, replicas: int = 1,
              hosts: list[str] | None = None) -> dict[str, Any]:
    """The Serve config of ``mlx-serving serve``: the demo config's settings, serving one model."""
    config = load(DEFAULT_CONFIG)
    model: dict[str, Any] = {"name": name or model_name_of(source), "source": source, "num_replicas": replicas,
                             "num_cpus": 0.5}
    if hosts:
        model["hosts"] = hosts
    config["applications"][0]["args"]["models"] = [model]
    return config
