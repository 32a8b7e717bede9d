"""Model sources against a local fake hub (huggingface_hub's cache layout in a temp dir, offline):
a hub id resolves to its snapshot before anything inspects it (a vision model by hub id is served as
one), a revision picks its own snapshot, a LoRA adapter changes what the model says, and a model
missing from the cache fails its load with a message that names it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import ModelLoadError
from engine.sources import ModelSource, resolve
from fake_hub import publish

MAIN, V1 = "a" * 40, "b" * 40


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter for ``model_dir`` with random (non-zero) weights, as mlx_lm.lora writes one."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(7)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters())
               if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                         "lora_parameters": params}))
    return out


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache of our own (the hub client reads its location at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


async def greedy(engine: Engine, name: str) -> str:
    no_eos = {str(t): -100.0 for t in engine._model(name).eos_ids}
    body = {"model": name, "prompt": "The weather", "sampling": {"max_tokens": 8, "temperature": 0.0,
                                                                 "logit_bias": no_eos}}
    return (await engine.complete(body)).text


def test_a_hub_id_at_a_revision_resolves_to_its_own_snapshot(hub: Path, tiny_model_dir: Path,
                                                               vision_model_dir: Path) -> None:
    main = publish(hub, "acme/chat", tiny_model_dir, MAIN)
    v1 = publish(hub, "acme/chat", vision_model_dir, V1, refs=("v1",))
    assert resolve("acme/chat") == str(main)
    assert resolve("acme/chat", "v1") == str(v1)
    assert resolve("acme/chat", V1) == str(v1)  # a commit hash names its snapshot directly
    assert resolve(str(tiny_model_dir)) == str(tiny_model_dir)  # a path stays a path
    with pytest.raises(ValueError, match="hub ids only"):
        resolve(str(tiny_model_dir), "v1")
    assert str(ModelSource("acme/chat", "v1", "acme/lora")) == "acme/chat@v1 + adapter acme/lora"


def test_a_vision_model_by_hub_id_is_served_as_one_and_an_adapter_changes_the_output(
        hub: Path, tiny_model_dir: Path, vision_model_dir: Path, tmp_path: Path) -> None:
    publish(hub, "acme/see", vision_model_dir, MAIN)
    publish(hub, "acme/chat", tiny_model_dir, MAIN)
    publish(hub, "acme/chat-lora", make_adapter(tiny_model_dir, tmp_path / "adapter"), MAIN)
    async def go() -> None:
        e = Engine(EngineConfig(warmup=False))
        try:
            vision = await e.load_model("see", ModelSource("acme/see"))
            assert vision.kind == "vision" and vision.source == "acme/see"
            plain = await e.load_model("plain", ModelSource("acme/chat"))
            tuned = await e.load_model("tuned", ModelSource("acme/chat", adapter_path="acme/chat-lora"))
            assert plain.kind == tuned.kind == "text" and tuned.source == "acme/chat + adapter acme/chat-lora"
            assert await greedy(e, "plain") != await greedy(e, "tuned")
            local = await e.load_model("local", ModelSource(str(tiny_model_dir), adapter_path=str(tmp_path / "adapter")))
            assert local.kind == "text" and await greedy(e, "local") == await greedy(e, "tuned")
        finally:
            await e.shutdown(drain_timeout_s=1)

    asyncio.run(go())


def test_a_model_missing_from_the_offline_cache_fails_its_load_by_name(hub: Path) -> None:
    async def go() -> None:
        e = Engine(EngineConfig(warmup=False))
        try:
            with pytest.raises(ModelLoadError) as err:
                await e.load_model("gone", ModelSource("acme/not-here", "v3"))
            assert "acme/not-here@v3" in err.value.message and "gone" in err.value.message
        finally:
            await e.shutdown(drain_timeout_s=1)

    asyncio.run(go())


def test_revision_is_refused_where_there_is_no_hub() -> None:
    from pydantic import ValidationError

    from deployments.config import ModelDeploymentConfig

    with pytest.raises(ValidationError, match="revision applies to a hub id"):
        ModelDeploymentConfig.model_validate({"name": "m", "source": "demo:tiny", "revision": "v1"})
    cfg: Any = ModelDeploymentConfig.model_validate({"name": "m", "source": "acme/chat", "revision": "v1",
                                                     "adapter_path": "/adapters/chat"})
    assert cfg.model_source() == ModelSource("acme/chat", "v1", "/adapters/chat")


def test_plan_measures_a_hub_model_at_its_revision_from_the_cache(hub: Path, tiny_model_dir: Path,
                                                                   vision_model_dir: Path) -> None:
    """Safetensors headers of the cached snapshot (no weights read); offline and uncached, the plan
    asks for footprint_gb."""
    from cluster.placement import FootprintError, model_weight_bytes

    publish(hub, "acme/chat", tiny_model_dir, MAIN)
    publish(hub, "acme/chat", vision_model_dir, V1, refs=("v1",))
    assert model_weight_bytes("acme/chat") == model_weight_bytes(tiny_model_dir)
    assert model_weight_bytes("acme/chat", "v1") == model_weight_bytes(vision_model_dir)
    assert model_weight_bytes(tiny_model_dir) != model_weight_bytes(vision_model_dir)
    with pytest.raises(FootprintError, match="footprint_gb"):
        model_weight_bytes("acme/chat", "v2")
    with pytest.raises(FootprintError, match="HF_HUB_OFFLINE"):
        model_weight_bytes("acme/elsewhere")
