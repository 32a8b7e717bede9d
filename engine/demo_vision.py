"""Offline demo vision model: a real mlx-vlm ``qwen2_vl`` with random weights.

The vision sibling of :mod:`engine.demo`. Tests and new users need an image-capable model that
builds without a model hub, loads through the ordinary ``mlx_vlm.load(path)`` path (processor
included) and runs in milliseconds on a CPU. Qwen2-VL is the family mlx-vlm batches best, and its
processor is a numpy port that needs nothing beyond the files written here.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from engine.demo import EOS_TOKEN, SPECIAL_TOKENS, _staging_dir, _train_tokenizer

# Qwen2-VL's added tokens. The first three keep the ids they have in the text demo (0, 1, 2);
# every id the model config names is looked up in the trained tokenizer, never assumed.
VISION_SPECIAL_TOKENS = SPECIAL_TOKENS + [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's template without its default system prompt (prompts stay short and predictable).
# Image parts in any of the shapes mlx-vlm and OpenAI clients send become one
# <|vision_start|><|image_pad|><|vision_end|>; the processor then repeats <|image_pad|> once per
# merged patch.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'input_image') or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] in ('video', 'input_video') or 'video' in part %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DemoVisionPreset(BaseModel):
    """Shape of the demo Qwen2-VL. ``vocab_size`` is exact (the tokenizer is padded to it)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    mrope_section: list[int] = [2, 3, 3]  # sums to head_dim / 2 (16 / 2)
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_num_heads: int = 2
    vision_mlp_ratio: int = 2  # an int: transformers validates the config strictly
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    # Images are resized to multiples of patch_size * merge_size (28) with an area in this range:
    # 64x64 becomes 56x56, i.e. 4 image tokens; the cap keeps any image at 64 tokens or fewer.
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    # With this seed greedy output varies with the prompt and the image (checked over 4 images x 2
    # prompts: 8 distinct continuations); some seeds fall into one repeated token.
    seed: int = 1


def _model_config(p: DemoVisionPreset, ids: dict[str, int]) -> dict:
    """Text settings sit at the root: mlx-vlm's ``ModelConfig.from_dict`` rebuilds
    ``text_config`` from them (a nested ``text_config`` would be ignored)."""
    head_dim = p.hidden_size // p.num_attention_heads
    if 2 * sum(p.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {p.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_hidden_layers,
        "intermediate_size": p.intermediate_size,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "vocab_size": p.vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": p.mrope_section},
        "max_position_embeddings": 4096,
        "max_window_layers": p.num_hidden_layers,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": p.vision_depth,
            "embed_dim": p.vision_embed_dim,
            # The merger projects into the language model, so this is the text hidden size.
            "hidden_size": p.hidden_size,
            "hidden_act": "quick_gelu",
            "num_heads": p.vision_num_heads,
            "mlp_ratio": p.vision_mlp_ratio,
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": p.patch_size,
            "spatial_patch_size": p.patch_size,
            "spatial_merge_size": p.merge_size,
            "temporal_patch_size": p.temporal_patch_size,
        },
    }


def _preprocessor_config(p: DemoVisionPreset) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": p.min_pixels,
        "max_pixels": p.max_pixels,
        "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
        "patch_size": p.patch_size,
        "temporal_patch_size": p.temporal_patch_size,
        "merge_size": p.merge_size,
    }


def _write_weights(config: dict, seed: int, path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl

    mx.random.seed(seed)
    cfg = qwen2_vl.ModelConfig.from_dict(dict(config))
    cfg.vision_config = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    cfg.text_config = qwen2_vl.TextConfig.from_dict(cfg.text_config)
    model = qwen2_vl.Model(cfg)
    lm = model.language_model
    # Wider logits than the default init so greedy choices are decisive rather than near-ties, and
    # larger token embeddings so the continuation follows the context instead of settling on one
    # token that the random residual stream favours.
    lm.lm_head.weight = lm.lm_head.weight * 8.0
    lm.model.embed_tokens.weight = lm.model.embed_tokens.weight * 2.0
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def make_demo_vision_model(
    out_dir: str | Path, force: bool = False, preset: DemoVisionPreset | None = None
) -> Path:
    """Write a demo Qwen2-VL to ``out_dir`` (deterministic for a preset) and return the directory.

    Load it with ``mlx_vlm.load(str(path))`` under ``HF_HUB_OFFLINE=1``: the processor loader
    otherwise asks the hub for optional files it does not find.
    """
    p = preset or DemoVisionPreset()
    out = Path(out_dir).expanduser().resolve()
    tmp = _staging_dir(out, force)
    if tmp is None:
        return out

    tok = _train_tokenizer(p.vocab_size, VISION_SPECIAL_TOKENS)
    tok.save(str(tmp / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in VISION_SPECIAL_TOKENS}
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": VISION_CHAT_TEMPLATE,
    }, indent=2))
    (tmp / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": EOS_TOKEN, "pad_token": "<|endoftext|>",
        "additional_special_tokens": VISION_SPECIAL_TOKENS[3:],
    }, indent=2))
    # The processor reads its template from here first; keep the two copies identical.
    (tmp / "chat_template.json").write_text(json.dumps({"chat_template": VISION_CHAT_TEMPLATE}, indent=2))
    (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(p), indent=2))
    config = _model_config(p, ids)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }))
    _write_weights(config, p.seed, tmp / "model.safetensors")
    (tmp / "README.md").write_text(
        "# mlx-serving demo vision model (qwen2_vl)\n\nA Qwen2-VL with random weights and a "
        "byte-level BPE tokenizer trained on a small shipped corpus. It generates gibberish, but "
        "its output depends on the image: it exists to exercise the serving system's vision path "
        "offline. Built by `engine.demo_vision.make_demo_vision_model`.\n"
    )
    tmp.rename(out)
    return out
