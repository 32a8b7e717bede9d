"""Reading and checking Ray Serve config files whose applications use ``deployments.app:build_app``."""

from __future__ import annotations

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

    from deployments.config import AppConfig

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
        try:
            AppConfig.model_validate(app.get("args") or {})
        except ValidationError as e:
            found.extend(_pydantic_problems(e, f"applications[{i}].args"))
    return found


def app_args(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [a.get("args") or {} for a in config.get("applications", []) if a.get("import_path") == BUILD_APP]
