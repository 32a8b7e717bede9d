"""Routing failures. Kept free of ``engine`` imports so routing stays importable without MLX; the
router deployment maps them onto ``engine.errors`` (404 model_not_found, 503 not_ready)."""

from __future__ import annotations


class RoutingError(Exception):
    """Base class of every error the routing logic raises."""


class UnknownRouteError(RoutingError, LookupError):
    def __init__(self, route: str) -> None:
        super().__init__(f"no route named {route!r}")
        self.route = route


class UnknownVariantError(RoutingError, LookupError):
    def __init__(self, route: str, variant: str) -> None:
        super().__init__(f"route {route!r} has no variant named {variant!r}")
        self.route = route
        self.variant = variant


class NoVariantAvailableError(RoutingError):
    """Every variant with traffic share has an open circuit; ``retry_after`` is the soonest reopening."""

    def __init__(self, route: str, retry_after: float | None = None) -> None:
        super().__init__(f"route {route!r}: no variant is available (circuits open or weights zero)")
        self.route = route
        self.retry_after = retry_after


class InvalidTransitionError(RoutingError, ValueError):
    """A manual rollout command that does not apply in the current state (e.g. resume when not paused)."""


class NoRolloutError(RoutingError, LookupError):
    def __init__(self, route: str) -> None:
        super().__init__(f"route {route!r} has no rollout configured")
        self.route = route
