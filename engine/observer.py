"""What the engine reports as it works, for metrics and logs.

The scheduler calls these from the GPU thread, so implementations must be cheap and must not block
(increment a counter, observe a histogram). The engine never imports a metrics library itself: the
in-process mode plugs in prometheus-client, a Ray replica plugs in Ray's metrics API.
"""

from __future__ import annotations


class EngineObserver:
    """No-op base: override what you need."""

    def on_admit(self, model: str, queue_wait_s: float) -> None: ...

    def on_first_token(self, model: str, ttft_s: float) -> None: ...

    def on_finish(self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                  e2e_s: float, finish_reason: str, ttft_s: float | None = None) -> None: ...

    def on_prefix_lookup(self, model: str, queried_tokens: int, hit_tokens: int) -> None:
        """A prompt looked up in the prefix cache: its length and how many of its tokens were cached."""

    def on_error(self, model: str, code: str) -> None: ...

    def on_cancel(self, model: str) -> None: ...

    def on_step(self, model: str, batch_size: int, step_s: float, running: int, waiting: int) -> None: ...

    def on_speculative(self, model: str, proposed: int, accepted: int) -> None: ...

    def on_load(self, model: str, seconds: float, nbytes: int) -> None: ...

    def on_unload(self, model: str) -> None: ...
