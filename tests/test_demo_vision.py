"""The offline demo vision model builds, loads through mlx-vlm and really looks at its images.

These tests also pin the mlx-vlm 0.7.10 calls the engine's vision path relies on: prompt building
with image parts, per-request input preparation, and ``BatchGenerator`` continuous batching with
per-request ``max_tokens`` and logits processors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

# Before mlx_vlm (and huggingface_hub under it) reads it: no test machine reaches a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx_vlm  # noqa: E402
from mlx_vlm.generate import BatchGenerator, stream_generate  # noqa: E402
from mlx_vlm.prompt_utils import apply_chat_template  # noqa: E402
from mlx_vlm.utils import estimate_num_image_tokens, prepare_inputs  # noqa: E402

from engine.demo_vision import VISION_SPECIAL_TOKENS, DemoVisionPreset, make_demo_vision_model  # noqa: E402


@pytest.fixture(scope="session")
def vision_dir(vision_model_dir: Path) -> Path:
    return vision_model_dir


@pytest.fixture(scope="session")
def vlm(vision_dir: Path) -> tuple[Any, Any]:
    return mlx_vlm.load(str(vision_dir))


def _png(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A noise image of ``size`` (width, height) written as a real PNG file."""
    w, h = size
    pixels = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("images")
    return {
        "a64": str(_png(d / "a64.png", (64, 64), 1)),
        "b64": str(_png(d / "b64.png", (64, 64), 2)),
        "wide": str(_png(d / "wide.png", (96, 64), 3)),
    }


def _messages(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _prepare(model: Any, processor: Any, text: str, image: str | None) -> tuple[list[int], dict, dict]:
    """What the engine does per request: template, tokenize + preprocess, run the vision tower.

    Returns the prompt ids, the kwargs ``BatchGenerator.insert`` needs (``inputs_embeds`` with the
    image features merged in, M-RoPE ``position_ids`` and ``rope_deltas``) and the raw inputs.
    """
    prompt = apply_chat_template(processor, model.config, _messages(text, 1 if image else 0))
    inputs = prepare_inputs(processor, images=[image] if image else None, prompts=[prompt])
    data = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    emb = model.get_input_embeddings(
        inputs["input_ids"], inputs.get("pixel_values"), mask=inputs.get("attention_mask"), **data
    )
    kwargs = {**data, **{k: v for k, v in emb.to_dict().items() if v is not None}}
    return inputs["input_ids"][0].tolist(), kwargs, inputs


def _single(model: Any, processor: Any, text: str, image: str | None, max_tokens: int) -> list[int]:
    """Greedy tokens through mlx-vlm's one-request path (the final result carries them all)."""
    prompt = apply_chat_template(processor, model.config, _messages(text, 1 if image else 0))
    processor.tokenizer.stopping_criteria.reset(model.config.eos_token_id)
    last = None
    for last in stream_generate(
        model, processor, prompt, image=[image] if image else None, max_tokens=max_tokens, temperature=0.0
    ):
        pass
    return list(last.token_ids)


def _run_batch(gen: BatchGenerator, uids: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {u: [] for u in uids}
    while gen.has_work:
        for r in gen.next()[1]:
            out.setdefault(r.uid, []).append(r.token)
    return out


def test_build_is_deterministic_and_small(vision_dir: Path, tmp_path: Path) -> None:
    again = make_demo_vision_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (vision_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert (vision_dir / "model.safetensors").stat().st_size < 5_000_000
    # An existing build is reused, not rebuilt.
    assert make_demo_vision_model(vision_dir) == vision_dir


def test_config_and_tokenizer_agree(vlm: tuple[Any, Any]) -> None:
    model, processor = vlm
    tok, cfg = processor.tokenizer, model.config
    assert cfg.model_type == "qwen2_vl"
    assert len(tok) == cfg.text_config.vocab_size == DemoVisionPreset().vocab_size
    assert model.language_model.lm_head.weight.shape[0] == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.eos_token_id in ([tok.convert_tokens_to_ids("<|im_end|>")], tok.convert_tokens_to_ids("<|im_end|>"))
    for t in VISION_SPECIAL_TOKENS:  # each is one token, never split by BPE
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t


def test_prompt_expands_image_to_pad_tokens(vlm: tuple[Any, Any], images: dict[str, str]) -> None:
    model, processor = vlm
    prompt = apply_chat_template(processor, model.config, _messages("Describe this.", 1))
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert prompt.endswith("<|im_start|>assistant\n")
    # OpenAI-style parts and mlx-vlm's own ``num_images`` both render the same block.
    openai = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}},
    ]}]
    assert apply_chat_template(processor, model.config, openai).count("<|image_pad|>") == 1
    assert apply_chat_template(processor, model.config, "Describe this.", num_images=1).count("<|image_pad|>") == 1

    ids, kwargs, inputs = _prepare(model, processor, "Describe this.", images["a64"])
    grid = inputs["image_grid_thw"].tolist()
    assert grid == [[1, 4, 4]]  # 64x64 -> 56x56 -> 4x4 patches of 14
    merge = processor.image_processor.merge_size
    n_pad = ids.count(model.config.image_token_id)
    assert n_pad == 4 == int(np.prod(grid[0])) // merge**2
    assert estimate_num_image_tokens(processor, 64, 64) == n_pad
    assert kwargs["inputs_embeds"].shape == (1, len(ids), model.config.text_config.hidden_size)

    wide_ids, _, wide_inputs = _prepare(model, processor, "Describe this.", images["wide"])
    assert wide_inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert wide_ids.count(model.config.image_token_id) == 6


def test_generate_with_and_without_image(vlm: tuple[Any, Any], images: dict[str, str]) -> None:
    model, processor = vlm
    with_image = apply_chat_template(processor, model.config, "Describe this.", num_images=1)
    text_only = apply_chat_template(processor, model.config, "Hello there, how are you?")
    assert "<|image_pad|>" not in text_only
    mlx_vlm.generate(model, processor, with_image, image=[images["a64"]], max_tokens=2)  # warm-up

    t0 = time.perf_counter()
    r = mlx_vlm.generate(model, processor, with_image, image=[images["a64"]], max_tokens=20, temperature=0.0)
    elapsed = time.perf_counter() - t0
    assert r.generation_tokens == len(r.token_ids) > 0
    assert r.prompt_tokens == len(processor.tokenizer.encode(with_image)) + 3  # one pad becomes 4
    assert r.finish_reason in ("stop", "length")
    assert isinstance(r.text, str)
    assert elapsed < 2.0, f"20 tokens with an image took {elapsed:.2f}s"

    r2 = mlx_vlm.generate(model, processor, text_only, max_tokens=20, temperature=0.0)
    assert r2.generation_tokens > 0 and isinstance(r2.text, str)


def test_image_reaches_the_language_model(vlm: tuple[Any, Any], images: dict[str, str]) -> None:
    model, processor = vlm
    logits = []
    for key in ("a64", "b64"):
        ids, kwargs, inputs = _prepare(model, processor, "Describe this.", images[key])
        pads = mx.array([i for i, t in enumerate(ids) if t == model.config.image_token_id])
        # The vision tower's features replaced the <|image_pad|> embeddings...
        plain = model.language_model.model.embed_tokens.weight[model.config.image_token_id]
        at_pads = kwargs["inputs_embeds"][0][pads]
        assert float(mx.abs(at_pads - plain).max()) > 1e-3
        # ...and change what the language model predicts.
        data = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        out = model(inputs["input_ids"], inputs["pixel_values"], mask=inputs["attention_mask"], **data)
        logits.append(out.logits[0, -1])
    assert logits[0].shape == (len(processor.tokenizer),)
    assert float(mx.abs(logits[0] - logits[1]).max()) > 1e-2


def test_batch_matches_single_requests(vlm: tuple[Any, Any], images: dict[str, str]) -> None:
    """Different image sizes and a text-only request decode together, continuously admitted,
    with exactly the greedy tokens each gets alone."""
    model, processor = vlm
    reqs = [("Describe this.", images["a64"]), ("What is in the picture?", images["wide"]),
            ("Hello there!", None)]
    n = 12
    alone = [_single(model, processor, text, img, n) for text, img in reqs]
    assert len({tuple(a) for a in alone}) == 3  # the comparison below is not vacuous

    processor.tokenizer.stopping_criteria.reset(model.config.eos_token_id)
    gen = BatchGenerator(model.language_model, processor, max_tokens=n)
    try:
        uids: list[int] = []
        out: dict[int, list[int]] = {}
        for i, (text, img) in enumerate(reqs):
            ids, kwargs, _ = _prepare(model, processor, text, img)
            uids += gen.insert([ids], max_tokens=[n], prompt_kwargs=[kwargs])
            if i == 0:  # the others join while the first is already decoding
                for _ in range(4):
                    for r in gen.next()[1]:
                        out.setdefault(r.uid, []).append(r.token)
        for uid, toks in _run_batch(gen, uids).items():
            out.setdefault(uid, []).extend(toks)
    finally:
        gen.close()
    for uid, expected in zip(uids, alone):
        got = out[uid]
        # The batch reports the EOS token it stopped on; the single path leaves it out.
        if got and got[-1] == model.config.eos_token_id and len(got) == len(expected) + 1:
            got = got[:-1]
        assert got == expected


def test_batch_per_request_max_tokens_and_processors(vlm: tuple[Any, Any], images: dict[str, str]) -> None:
    model, processor = vlm
    forced = processor.tokenizer.convert_tokens_to_ids("<|box_start|>")

    def force(tokens: mx.array, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == forced, 1e4, logits)

    alone = _single(model, processor, "What is in the picture?", images["wide"], 8)
    processor.tokenizer.stopping_criteria.reset(model.config.eos_token_id)
    gen = BatchGenerator(model.language_model, processor)
    try:
        a_ids, a_kw, _ = _prepare(model, processor, "Describe this.", images["a64"])
        b_ids, b_kw, _ = _prepare(model, processor, "What is in the picture?", images["wide"])
        uids = gen.insert([a_ids, b_ids], max_tokens=[5, 8], prompt_kwargs=[a_kw, b_kw],
                          logits_processors=[[force], []])
        out = _run_batch(gen, uids)
    finally:
        gen.close()
    assert out[uids[0]] == [forced] * 5
    assert out[uids[1]][: len(alone)] == alone and len(out[uids[1]]) <= 8


def _sampling_processor(temperature: float, seed: int):
    """Per-request sampling as the last logits processor: ``BatchGenerator`` has one sampler for
    the whole batch, so each request draws its own token (own temperature, own PRNG key) and hands
    the batch's argmax sampler a row where only that token is finite."""
    key = [mx.random.key(seed)]

    def sample(tokens: mx.array, logits: mx.array) -> mx.array:
        if temperature == 0:
            choice = mx.argmax(logits, axis=-1)
        else:
            key[0], sub = mx.random.split(key[0])
            choice = mx.random.categorical(logits / temperature, key=sub)
        return mx.where(mx.arange(logits.shape[-1])[None] == choice[:, None], 0.0, -mx.inf)

    return sample


def test_batch_per_request_sampling_and_cancel(vlm: tuple[Any, Any], images: dict[str, str]) -> None:
    model, processor = vlm
    reqs = {"seeded": ("Describe this.", images["a64"], 1.0, 7),
            "greedy": ("What is in the picture?", images["wide"], 0.0, 0),
            "other": ("Hello there!", None, 1.0, 9)}

    def run(names: list[str], cancel: str | None = None) -> dict[str, list[int]]:
        processor.tokenizer.stopping_criteria.reset(model.config.eos_token_id)
        gen = BatchGenerator(model.language_model, processor)  # no sampler: argmax
        try:
            by_uid: dict[int, str] = {}
            for name in names:
                text, img, temp, seed = reqs[name]
                ids, kw, _ = _prepare(model, processor, text, img)
                (uid,) = gen.insert([ids], max_tokens=[10], prompt_kwargs=[kw],
                                    logits_processors=[[_sampling_processor(temp, seed)]])
                by_uid[uid] = name
            out: dict[str, list[int]] = {name: [] for name in names}
            while gen.has_work:
                for r in gen.next()[1]:
                    out[by_uid[r.uid]].append(r.token)
                if cancel and len(out[cancel]) == 3:
                    assert gen.remove(next(u for u, n in by_uid.items() if n == cancel))
                    cancel = None
            return out
        finally:
            gen.close()

    first = run(["seeded", "greedy"])
    second = run(["greedy", "other", "seeded"], cancel="other")
    assert first["seeded"] == second["seeded"]  # a seed gives the same tokens whatever the batch
    assert first["greedy"] == second["greedy"] == _single(model, processor, *reqs["greedy"][:2], 10)
    assert first["seeded"] != first["greedy"]
    assert len(second["other"]) == 3  # removed mid-decode; the others were not disturbed
