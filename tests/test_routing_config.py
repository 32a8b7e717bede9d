"""Routing config validation: bad configs fail with messages that name the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from deployments.routing import CircuitBreakerConfig, RolloutPolicy, RouteConfig, RoutingConfig, VariantConfig


def route(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "chat", "variants": [{"name": "stable", "weight": 95}, {"name": "canary", "weight": 5}]}
    base.update(kw)
    return base


def test_defaults() -> None:
    cfg = RouteConfig.model_validate(route())
    assert cfg.baseline == "stable"
    assert cfg.sticky is True
    assert cfg.variants[0].deployment == "stable"
    assert cfg.circuit_breaker == CircuitBreakerConfig()
    explicit = VariantConfig(name="a", deployment="llama-3b-q4", weight=2)
    assert explicit.deployment == "llama-3b-q4"


@pytest.mark.parametrize("variants, message", [
    ([{"name": "a", "weight": 1}, {"name": "a", "weight": 2}], "variant names must be unique, duplicated: ['a']"),
    ([{"name": "a", "weight": 0}, {"name": "b", "weight": 0}], "at least one variant needs a positive weight"),
    ([{"name": "a", "weight": -1}], "greater than or equal to 0"),
    ([], "at least 1 item"),
])
def test_variant_errors(variants: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RouteConfig.model_validate(route(variants=variants))


def test_baseline_and_canary_must_exist() -> None:
    with pytest.raises(ValidationError, match="baseline 'nope' is not one of its variants"):
        RouteConfig.model_validate(route(baseline="nope"))
    with pytest.raises(ValidationError, match="rollout canary 'ghost' is not one of its variants"):
        RouteConfig.model_validate(route(rollout={"canary": "ghost"}))
    with pytest.raises(ValidationError, match="cannot also be the baseline"):
        RouteConfig.model_validate(route(rollout={"canary": "stable"}))
    ok = RouteConfig.model_validate(route(baseline="canary", rollout={"canary": "stable"}))
    assert ok.baseline == "canary"


@pytest.mark.parametrize("stages, message", [
    ([], "at least one canary percentage"),
    ([5, 5, 50], "strictly increasing"),
    ([50, 10], "strictly increasing"),
    ([0, 50], r"must be in \(0, 100\]"),
    ([50, 101], r"must be in \(0, 100\]"),
])
def test_stage_errors(stages: list[float], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RolloutPolicy(canary="c", stages=stages)


def test_guard_and_breaker_bounds() -> None:
    with pytest.raises(ValidationError, match="metric"):
        RolloutPolicy.model_validate({"canary": "c", "latency": {"metric": "p99"}})
    with pytest.raises(ValidationError, match="alpha"):
        RolloutPolicy.model_validate({"canary": "c", "latency": {"alpha": 1.5}})
    with pytest.raises(ValidationError, match="min_requests .* cannot exceed window"):
        CircuitBreakerConfig(window=5, min_requests=10)
    assert RolloutPolicy.model_validate({"canary": "c", "latency": None}).latency is None


def test_typos_are_rejected() -> None:
    with pytest.raises(ValidationError, match="weigth"):
        RouteConfig.model_validate(route(variants=[{"name": "a", "weigth": 1}]))


def test_routing_config_unique_routes() -> None:
    with pytest.raises(ValidationError, match=r"route names must be unique, duplicated: \['chat'\]"):
        RoutingConfig.model_validate({"routes": [route(), route()]})
    assert len(RoutingConfig.model_validate({"routes": [route(), route(name="code")]}).routes) == 2


def test_routing_imports_neither_ray_nor_mlx() -> None:
    code = "import sys, deployments.routing; print(sorted(m for m in ('ray', 'mlx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
