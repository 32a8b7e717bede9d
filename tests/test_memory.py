"""Unified memory: MLX's limits per replica, and admission that keeps KV caches inside them, so an
oversubscribed Mac queues (then answers 429) instead of swapping. The Metal branch runs with the
platform stood in for: we have no Mac."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from deployments.config import ModelDeploymentConfig
from engine import memory
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import RequestTooLargeError
from engine.memory import ACTIVATION_MARGIN, apply_limits, kv_bytes_per_token, restore_limits


def kv_formula(model_dir: Path) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * 4  # float32 keys and values


def test_kv_bytes_per_token_is_measured_on_the_model(tiny_model_dir: Path) -> None:
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model_dir))
    assert kv_bytes_per_token(model) == kv_formula(tiny_model_dir) == 2 * 2 * 2 * 16 * 4


def body(prompt: str, max_tokens: int, no_eos: dict[int, float]) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt,
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "logit_bias": no_eos}}


def test_requests_wait_for_memory_and_one_that_never_fits_gets_413(tiny_model_dir: Path) -> None:
    probe = Engine(EngineConfig(warmup=False))
    asyncio.run(probe.load_model("tiny", str(tiny_model_dir)))
    weights, prompt = probe._model("tiny").nbytes, "The lighthouse keeper counted the ships"
    prompt_tokens = len(probe._model("tiny").tokenizer.encode(prompt))
    no_eos = {i: -100.0 for i in probe._model("tiny").eos_ids}
    solo = asyncio.run(probe.complete(body(prompt, 40, no_eos))).text
    asyncio.run(probe.shutdown())

    kv = kv_formula(tiny_model_dir)
    one = (prompt_tokens + 40) * kv
    # Room for the weights and one such request's KV cache, not two.
    limit_gb = (weights + int(1.5 * one) / (1 - ACTIVATION_MARGIN)) / 1e9
    e = Engine(EngineConfig(memory_limit_gb=limit_gb, warmup=False))
    try:
        asyncio.run(e.load_model("tiny", str(tiny_model_dir)))
        assert e._model("tiny").kv_per_token == kv

        async def timed(b: dict[str, Any]) -> tuple[float, float, str]:
            first = last = 0.0
            text = ""
            async for chunk in e.generate(b):
                now = time.perf_counter()
                first = first or now
                last = now
                text += chunk.text
            return first, last, text

        async def three() -> list[tuple[float, float, str]]:
            return await asyncio.gather(*(timed(body(prompt, 40, no_eos)) for _ in range(3)))

        runs = sorted(asyncio.run(three()))
        assert [t for _, _, t in runs] == [solo] * 3  # each one's output is what it gives alone
        for (_, last, _), (first, _, _) in zip(runs, runs[1:]):
            assert first >= last, "a second request ran beside the first although memory holds one"

        # Asking for more tokens than the limit leaves room for can never run: 413, not a wait forever.
        with pytest.raises(RequestTooLargeError, match="more than this replica's memory limit") as err:
            asyncio.run(e.complete(body(prompt, 400, no_eos)))
        assert err.value.param == "max_tokens" and err.value.code == "request_too_large"
        assert asyncio.run(e.complete(body(prompt, 40, no_eos))).text == solo  # and the engine goes on
    finally:
        asyncio.run(e.shutdown())
    now = mx.set_memory_limit(2**40)
    mx.set_memory_limit(now)
    assert now != int(limit_gb * 1e9)  # the engine gave the process its limit back


class FakeMetal:
    """What MLX on a Mac answers: Metal available, a recommended working set (a 64 GB Mac: 48 GiB)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        self.limits = {"memory": 72 * 2**30, "wired": 0}
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
        monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 48 * 2**30,
                                                        "memory_size": 64 * 2**30})
        monkeypatch.setattr(mx, "set_memory_limit", lambda n: self._set("memory", n))
        monkeypatch.setattr(mx, "set_wired_limit", lambda n: self._set("wired", n))

    def _set(self, name: str, n: int) -> int:
        self.calls.append((name, n))
        previous, self.limits[name] = self.limits[name], n
        return previous


def test_on_metal_the_wired_limit_follows_the_replica_and_stops_at_the_recommended_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    metal = FakeMetal(monkeypatch)
    applied = apply_limits(20 * 2**30)
    assert metal.calls == [("memory", 20 * 2**30), ("wired", 20 * 2**30)]
    restore_limits(applied)
    assert metal.limits == {"memory": 72 * 2**30, "wired": 0}
    metal.calls.clear()
    assert apply_limits(60 * 2**30)["wired_limit"] == (48 * 2**30, 0)  # capped at the recommended working set
    metal.calls.clear()
    apply_limits(None)  # no replica limit: the wired limit mlx-lm sets, the recommended working set
    assert metal.calls == [("wired", 48 * 2**30)]


def test_off_metal_only_the_memory_limit_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    calls: list[int] = []
    monkeypatch.setattr(mx, "set_memory_limit", lambda n: calls.append(n) or 0)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("no wired limit off Metal"))
    assert apply_limits(2**30) == {"memory_limit": (2**30, 0)} and calls == [2**30]
    assert apply_limits(None) == {}


def test_a_replica_takes_its_memory_gb_as_the_engine_limit() -> None:
    m = ModelDeploymentConfig(name="m", source="demo:tiny", memory_gb=6)
    assert m.engine_config().memory_limit_bytes == 6 * 2**30
    explicit = ModelDeploymentConfig(name="m", source="demo:tiny", memory_gb=6, engine={"memory_limit_gb": 2})
    assert explicit.engine_config().memory_limit_gb == 2
    assert ModelDeploymentConfig(name="m", source="demo:tiny").engine_config().memory_limit_gb is None
    assert memory.MemoryBudget(None).fits(10**12, 0, 10**12, 10**12)
    # A plan's memory_gb is weights + KV budget: the KV budget goes to KV caches, less the margin.
    plan = memory.MemoryBudget(int(5.5 * 2**30))
    assert plan.kv_room(int(4.5 * 2**30)) == int(2**30 * (1 - ACTIVATION_MARGIN))
    assert plan.fits(int(4.5 * 2**30), 2**28, 0, int(0.85 * 2**30))  # alone: the prompt cache does not block it
    assert not plan.fits(int(4.5 * 2**30), 2**28, 2**20, int(0.85 * 2**30))
