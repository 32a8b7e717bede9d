"""Offline demo models: real mlx-lm architectures, random weights, a tokenizer trained locally.

No machine we test on can reach a model hub, and a new user should see the whole system work before
pulling gigabytes. The directory written here is the ordinary Hugging Face / mlx-lm layout, so it
loads unchanged through ``mlx_lm.load(path)`` and through the engine's normal load path.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", EOS_TOKEN]
# Markers of tool calls and thinking, as Qwen writes them: added tokens (one id each) that are not
# special, so they decode as text and a grammar can name them literally. mlx-lm recognises both:
# `<tool_call>` with `tool_call.name` in the template selects its `json_tools` parser, and
# `<think>`/`</think>` in the vocabulary turn on its thinking support.
MARKER_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
# ChatML with tools (Qwen 2.5 / Qwen 3 style), the template most mlx-community chat models use.
# `enable_thinking: false` closes an empty thought in the prompt, as Qwen 3 does; with thinking on
# the model may open `<think>` itself. A `reasoning_effort` (OpenAI's field, which gpt-oss templates
# read) opens the thought in the prompt, as DeepSeek-R1's template always does: the random demo model
# then thinks until it writes `</think>`. Content may be a string or a list of parts.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ text(messages[0]['content']) + '\n\n' }}{%- endif -%}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\n' }}{{ tool | tojson }}{%- endfor -%}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first and tools -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' + text(message['content']) }}"
    "{%- for tool_call in message['tool_calls'] or [] -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    "{{ '\n<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{ tool_call.arguments | tojson }}{{ '}\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>\n' + text(message['content']) + '\n</tool_response><|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text(message['content']) + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}"
    "{%- elif reasoning_effort is defined and reasoning_effort -%}{{ '<think>\n' }}{%- endif -%}"
    "{%- endif -%}"
)

PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- endif -%}{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


class DemoPreset(BaseModel):
    """Shape of a demo model; ``vocab_size`` is exact (the tokenizer is padded to it). mlx-lm's llama
    can be sharded in tensor mode only; its qwen2 in pipeline and tensor mode (``sharded_load``)."""

    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


PRESETS: dict[str, DemoPreset] = {
    # A few MB: loads and generates in milliseconds, for tests.
    "tiny": DemoPreset(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
    ),
    # About 110M parameters (fp32, 440 MB): big enough that batching matters on a CPU.
    "bench": DemoPreset(
        hidden_size=768, num_hidden_layers=14, intermediate_size=2048,
        num_attention_heads=12, num_key_value_heads=4, vocab_size=8192,
    ),
    # Llama-3.2-1B's shape (1.24B parameters, bf16, 2.47 GB): the GPU benchmarks' model.
    "llama-1b": DemoPreset(
        hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, dtype="bfloat16",
    ),
    # The bench shape as a qwen2, which mlx-lm shards in pipeline mode too (loadtests/bench_sharded.py).
    "bench-qwen2": DemoPreset(
        arch="qwen2", hidden_size=768, num_hidden_layers=14, intermediate_size=2048,
        num_attention_heads=12, num_key_value_heads=4, vocab_size=8192,
    ),
    # A few MB, a qwen2: heads, layers and widths divide by 2 and 3, so it shards in both modes
    # across 2 or 3 ranks (the sharded-replica tests and config/sharded.yaml).
    "tiny-qwen2": DemoPreset(
        arch="qwen2", hidden_size=96, num_hidden_layers=6, intermediate_size=192,
        num_attention_heads=6, num_key_value_heads=6, vocab_size=1024,
    ),
}

PresetName = Literal["tiny", "bench", "llama-1b", "tiny-qwen2", "bench-qwen2"]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def corpus_text() -> str:
    return resources.files("engine").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def _train_tokenizer(vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS, markers: bool = True):
    """Byte-level BPE trained on the shipped corpus, plus the marker tokens, padded with reserved
    tokens to ``vocab_size``.

    ``special_tokens`` take ids ``0..n-1`` in order, so a model config can name them by id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tokenizers import AddedToken

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (len(MARKER_TOKENS) if markers else 0),
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_text().splitlines()
    tok.train_from_iterator(lines * 2, trainer=trainer)
    if markers:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    missing = vocab_size - tok.get_vocab_size()
    if missing < 0:
        raise ValueError(f"tokenizer grew past vocab_size {vocab_size}")
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size
    return tok


def _model_config(p: DemoPreset) -> dict:
    return {
        "model_type": p.arch,
        "architectures": [ARCHITECTURES[p.arch]],
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_hidden_layers,
        "intermediate_size": p.intermediate_size,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "vocab_size": p.vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": p.dtype,
    }


def _write_weights(config: dict, seed: int, path: Path, dtype: str = "float32") -> None:
    """One safetensors file and its index (mlx-lm's pipeline loading reads which layers a file holds)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    # Wider logits than the default init so greedy choices are decisive rather than near-ties.
    model.lm_head.weight = model.lm_head.weight * 8.0
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {k: path.name for k in sorted(weights)}}
    path.with_name("model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _staging_dir(out: Path, force: bool) -> Path | None:
    """Empty ``<out>.partial`` to build in (renamed onto ``out`` at the end, so a crash never
    leaves a half-written model where a loader would find it), or None when ``out`` already holds
    a built model and ``force`` is off."""
    if out.exists() and any(out.iterdir()):
        if not force:
            if (out / "config.json").exists() and (out / "model.safetensors").exists():
                return None
            raise FileExistsError(f"{out} exists and is not empty (use --force to overwrite)")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def make_demo_model(out_dir: str | Path, preset: PresetName = "tiny", force: bool = False,
                    seed: int | None = None, markers: bool = True) -> Path:
    """Write a demo llama to ``out_dir`` (deterministic for a preset and seed) and return the directory.

    Another ``seed`` gives other weights with the same tokenizer: a canary variant, or a draft model.
    ``markers=False``: no tool-call or thinking markers and a plain ChatML template, as many models have.
    """
    p = PRESETS[preset]
    out = Path(out_dir).expanduser().resolve()
    tmp = _staging_dir(out, force)
    if tmp is None:
        return out

    tok = _train_tokenizer(p.vocab_size, markers=markers)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE if markers else PLAIN_CHAT_TEMPLATE,
    }, indent=2))
    (tmp / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": EOS_TOKEN, "pad_token": "<|endoftext|>",
    }, indent=2))
    config = _model_config(p)
    config["eos_token_id"] = tok.token_to_id(EOS_TOKEN)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
    _write_weights(config, p.seed if seed is None else seed, tmp / "model.safetensors", p.dtype)
    (tmp / "README.md").write_text(
        f"# mlx-serving demo model ({preset})\n\nA {p.arch} with random weights and a byte-level BPE "
        "tokenizer trained on a small shipped corpus. It generates gibberish: it exists to exercise "
        "the serving system offline. Built by `mlx-serving models make-demo`.\n"
    )
    tmp.rename(out)
    return out
