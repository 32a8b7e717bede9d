"""Vision-language models: mlx-vlm behind the same batch surface as ``TextBatch`` (pinned mlx-vlm 0.7.10).

Where the work happens:

* caller's thread, ``prepare_vision_inputs``: the chat rendered with the model's template (one
  placeholder per image); image bytes read and headers opened (``engine.images``: per-image and
  per-request pixel limits); the prompt's tokens, image tokens included, estimated from the header
  sizes and checked against the context; only then pixels decoded, and the model's processor
  tokenizes and preprocesses (resize, normalize, patchify; image placeholders expanded to the real
  number of image tokens). The processor builds MLX arrays, so that runs under this thread's CPU
  stream and is evaluated before returning: nothing lazy crosses threads (an unevaluated array built
  on one thread fails on another: "There is no Stream(cpu, 0) in current thread").
* GPU thread, ``VisionBatch.insert``: the vision tower (``get_input_embeddings``) for that one
  request, evaluated at once, then the request joins mlx-vlm's ``BatchGenerator``.
* GPU thread, ``VisionBatch.step``: one decode step for every running sequence, text-only and image
  requests alike, plus a prefill chunk for newly admitted ones (several prompts prefilled together).

mlx-vlm's ``BatchGenerator`` has one sampler for the whole batch. Each request samples for itself in
its last logits processor (its own sampler, own seed) and hands the batch's argmax a row in which only
the chosen token is finite; the same processor keeps the row's real log-probabilities (after the
request's other processors: penalties, logit bias, grammar) for ``StepResult.logprobs``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .batch import StepResult
from .errors import InvalidRequestError, ModelLoadError
from .images import ImagePolicy, decode_opened_image, open_request_images
from .request import ChatMessage, ImagePart, TextPart
from .sampling import LogitsProcessor, Sampler

if TYPE_CHECKING:  # engine.models may import this module: keep the import one-way at runtime
    from .models import LoadedModel

_NOT_MODEL_KWARGS = ("input_ids", "pixel_values", "attention_mask")


@dataclass(eq=False)
class VisionInputs:
    """One request's multimodal prompt, prepared off the GPU thread.

    ``input_ids`` are the prompt tokens the model will see, image placeholders already expanded (so
    ``len(input_ids)`` is the prompt's token count, image tokens included). ``model_inputs`` are the
    processor's outputs (evaluated MLX arrays: ``input_ids``, ``pixel_values``, ``image_grid_thw`` ...);
    ``VisionBatch.insert`` consumes them and drops them, with the images, once the embeddings exist.
    """

    prompt: str
    images: list[Any]  # PIL.Image.Image, RGB, decoded within the ImagePolicy
    num_images: int
    input_ids: list[int] = field(default_factory=list)
    model_inputs: dict[str, Any] | None = None

    @property
    def prepared(self) -> bool:
        return self.model_inputs is not None

    def preprocess(self, processor: Any, model_config: Any) -> None:
        """Tokenize and preprocess (the model's processor). Safe on any thread: runs on this
        thread's CPU stream and leaves only evaluated arrays."""
        if self.model_inputs is not None:
            return
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        try:
            with mx.stream(mx.cpu):
                inputs = prepare_inputs(
                    processor,
                    images=list(self.images) or None,
                    prompts=self.prompt,
                    image_token_index=getattr(model_config, "image_token_index", None),
                    add_special_tokens=should_add_special_tokens(model_config.model_type, processor),
                )
                mx.eval([v for v in inputs.values() if isinstance(v, mx.array)])
        except Exception as e:  # noqa: BLE001 - the processor rejects what it cannot handle
            raise InvalidRequestError(f"the model's processor rejected the request: {e}", param="messages",
                                      code="invalid_image" if self.images else None) from e
        ids = inputs.get("input_ids")
        if ids is None or ids.ndim != 2 or ids.shape[0] != 1:
            raise InvalidRequestError("the model's processor produced no prompt tokens", param="messages")
        self.input_ids = ids[0].tolist()
        self.model_inputs = dict(inputs)


def _template_messages(messages: list[ChatMessage], policy: ImagePolicy) -> tuple[list[dict], list[str]]:
    """Messages as the chat template wants them (an ``{"type": "image"}`` part per image, never the
    URL) and the image URLs in the order their placeholders appear."""
    out: list[dict] = []
    urls: list[str] = []
    for i, msg in enumerate(messages):
        d = msg.model_dump(exclude_none=True)
        parts = msg.content if isinstance(msg.content, list) else []
        if any(isinstance(p, ImagePart) for p in parts):
            if msg.role != "user":
                raise InvalidRequestError(
                    f"messages[{i}]: images are accepted in user messages only, not in {msg.role!r} messages",
                    param="messages", code="invalid_image")
            d["content"] = []
            for p in parts:
                if isinstance(p, ImagePart):
                    urls.append(p.image_url.url)
                    d["content"].append({"type": "image"})
                elif isinstance(p, TextPart):
                    d["content"].append({"type": "text", "text": p.text})
        else:
            d["content"] = msg.text()
        out.append(d)
    if len(urls) > policy.max_images:
        raise InvalidRequestError(
            f"the request has {len(urls)} images; this server accepts at most {policy.max_images} per request",
            param="messages", code="too_many_images")
    return out, urls


def render_vision_prompt(processor: Any, model_config: Any, messages: list[ChatMessage], policy: ImagePolicy,
                         add_generation_prompt: bool = True) -> tuple[str, list[str]]:
    """The chat rendered with the model's template (image placeholders included) and the image URLs."""
    from mlx_vlm.prompt_utils import apply_chat_template

    dicts, urls = _template_messages(messages, policy)
    try:
        prompt = apply_chat_template(processor, model_config, dicts, add_generation_prompt=add_generation_prompt,
                                     num_images=len(urls))
    except Exception as e:  # noqa: BLE001 - jinja templates raise for roles or orders they do not support
        raise InvalidRequestError(f"the model's chat template rejected the messages: {e}", param="messages") from e
    if not isinstance(prompt, str):  # a few families return message lists; none we serve
        raise InvalidRequestError("the model's chat template did not produce a text prompt", param="messages")
    return prompt, urls


def prepare_vision_inputs(processor: Any, model_config: Any, messages: list[ChatMessage], policy: ImagePolicy,
                          *, add_generation_prompt: bool = True, preprocess: bool = True,
                          context_length: int | None = None, max_tokens: int = 0) -> VisionInputs:
    """Validate, decode and render one chat request for a vision model (caller's thread).

    In this order, so that nothing is decoded for a request that cannot run: render the chat; read
    every image's bytes and header (per-image and per-request pixel limits); with ``context_length``,
    estimate the prompt's tokens from the header sizes and refuse, ``context_length_exceeded``, a
    prompt that with ``max_tokens`` would not fit; decode the pixels; run the processor.

    Raises ``InvalidRequestError`` (param ``messages``) for any image the policy refuses or that does
    not decode, and for messages the template or processor rejects. With ``preprocess`` (the default)
    ``input_ids`` is exact when this returns; otherwise ``VisionBatch.insert`` preprocesses on the GPU
    thread.
    """
    prompt, urls = render_vision_prompt(processor, model_config, messages, policy, add_generation_prompt)
    opened = open_request_images(urls, policy)
    if context_length is not None and opened:
        # Header sizes, before EXIF rotation: smart_resize is symmetric in height and width, so a
        # rotation that swaps them does not change the count.
        check_vision_context(processor, model_config, prompt, [im.size for im in opened], context_length,
                             max_tokens)
    images = [decode_opened_image(im, policy) for im in opened]
    vi = VisionInputs(prompt=prompt, images=images, num_images=len(images))
    if preprocess:
        vi.preprocess(processor, model_config)
    return vi


# -- image tokens from header sizes ----------------------------------------------------------------
# Families whose processor resizes each image with Qwen2-VL's ``smart_resize`` (multiples of
# patch_size * merge_size, area within [min_pixels, max_pixels]) and emits one token per merged patch.
# Other families (fixed-resolution LLaVA, Phi-3-Vision's crops ...) are not estimated: they get the
# pixel budget only, and the exact count after preprocessing (``Engine.prepare``).
_SMART_RESIZE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize target (port of transformers' ``qwen2_vl`` ``smart_resize``; mlx-vlm 0.7.10
    uses the same): both sides multiples of ``factor``, area within ``[min_pixels, max_pixels]``,
    aspect ratio kept as well as that allows. Raises ``ValueError`` past an aspect ratio of 200."""
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio:.1f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _smart_resize_tokens(image_processor: Any, width: int, height: int) -> int | None:
    """Image tokens by our ``smart_resize`` port, from the processor's preprocessor config (None when
    it lacks a setting). The ``size`` dict wins over ``min_pixels``/``max_pixels``, as in transformers."""
    size = getattr(image_processor, "size", None)
    size = size if isinstance(size, dict) else {}
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    lo = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    hi = size.get("longest_edge") or getattr(image_processor, "max_pixels", None)
    if not all(isinstance(v, int) and v > 0 for v in (patch, merge, lo, hi)):
        return None
    h, w = smart_resize(height, width, patch * merge, lo, hi)
    return (h // (patch * merge)) * (w // (patch * merge))


def estimate_image_tokens(processor: Any, model_config: Any, width: int, height: int) -> int | None:
    """Tokens one ``width`` x ``height`` image becomes in the prompt, from its size alone; None for a
    family we do not estimate. The processor's own counter (mlx-vlm's ``num_image_tokens``, which
    shares its sizing code with preprocessing) when it has one, else our ``smart_resize`` port."""
    if getattr(model_config, "model_type", None) not in _SMART_RESIZE_FAMILIES:
        return None
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    counter = getattr(image_processor, "num_image_tokens", None)
    try:
        if callable(counter):
            return int(counter(height, width))
        return _smart_resize_tokens(image_processor, width, height)
    except ValueError as e:  # the aspect-ratio limit: the processor would refuse it after decoding
        raise InvalidRequestError(f"an image of {width}x{height} cannot be processed by this model: {e}",
                                  param="messages", code="invalid_image") from None


def estimate_prompt_tokens(processor: Any, model_config: Any, prompt: str,
                           sizes: Sequence[tuple[int, int]]) -> int | None:
    """Tokens the processor will make of ``prompt`` with images of ``sizes`` (width, height), without
    decoding them. None when the family is not estimated."""
    split = _estimate_split(processor, model_config, prompt, sizes)
    return None if split is None else sum(split)


def _estimate_split(processor: Any, model_config: Any, prompt: str,
                    sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """(text tokens, image tokens): the rendered prompt tokenized as the processor will, each image
    placeholder (one token, which the processor expands) replaced by that image's estimate."""
    from mlx_vlm.utils import should_add_special_tokens

    per_image = [estimate_image_tokens(processor, model_config, w, h) for w, h in sizes]
    if any(n is None for n in per_image):
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = getattr(processor, "image_token_id", None)
    ids = tokenizer.encode(prompt, add_special_tokens=should_add_special_tokens(model_config.model_type, processor))
    found = ids.count(placeholder) if placeholder is not None else len(sizes)
    if found != len(sizes):  # the processor would pair placeholders with images wrongly and fail
        raise InvalidRequestError(
            f"the rendered prompt holds {found} image placeholders for {len(sizes)} images (is the model's "
            "image token in the text?)", param="messages", code="invalid_image")
    return len(ids) - found, sum(n for n in per_image if n is not None)


def check_vision_context(processor: Any, model_config: Any, prompt: str, sizes: Sequence[tuple[int, int]],
                         context_length: int, max_tokens: int) -> int | None:
    """Refuse (``context_length_exceeded``) a prompt whose estimated tokens plus ``max_tokens`` exceed
    the context, before any pixel is decoded. Returns the estimate (None: family not estimated)."""
    split = _estimate_split(processor, model_config, prompt, sizes)
    if split is None:
        return None
    text, images = split
    if text + images + max_tokens > context_length:
        raise InvalidRequestError(
            f"the prompt would be {text + images} tokens ({images} of them for {len(sizes)} image(s)); with "
            f"max_tokens ({max_tokens}) that exceeds the model's context of {context_length} tokens",
            param="messages", code="context_length_exceeded")
    return text + images


# -- the batch (GPU thread) ----------------------------------------------------------------------
class _RowSampler:
    """The last logits processor of one request: sample with the request's own sampler (argmax when
    it has none), keep the log-probabilities, leave only the chosen token finite for the batch's argmax."""

    def __init__(self, sampler: Sampler | None, logprobs: deque, keep: bool) -> None:
        self._sampler = sampler
        self._logprobs = logprobs
        self._keep = keep

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._sampler is None and not self._keep:
            choice, logprobs = mx.argmax(logits, axis=-1), None
        else:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            choice = mx.argmax(logprobs, axis=-1) if self._sampler is None else self._sampler(logprobs)
        # The k-th call makes the k-th token the batch reports for this row (decode runs one step ahead).
        self._logprobs.append(logprobs if self._keep else None)
        hit = mx.arange(logits.shape[-1])[None] == choice.reshape(-1, 1)
        return mx.where(hit, mx.array(0.0, logits.dtype), mx.array(-mx.inf, logits.dtype))


class VisionBatch:
    """Continuous batch for one vision-language model (mlx-vlm ``BatchGenerator``), with
    ``TextBatch``'s surface. Must be created and used on the GPU thread."""

    def __init__(self, model: Any, processor: Any, eos_ids: Sequence[int], *, max_batch_size: int,
                 prefill_batch_size: int, prefill_step_size: int) -> None:
        from mlx_vlm.generate import BatchGenerator

        self.model = model
        self.processor = processor
        self.model_config = model.config
        tokenizer = getattr(processor, "tokenizer", processor)
        # mlx-vlm keeps one StoppingCriteria on the tokenizer, shared by every generator built over it,
        # and BatchGenerator(stop_tokens=...) adds to it for good: set it to exactly our EOS ids.
        tokenizer.stopping_criteria.reset(sorted(eos_ids))
        prefill = min(prefill_batch_size, max_batch_size)
        self._stream = mx.new_stream(mx.default_device())
        self._gen = BatchGenerator(
            model.language_model,
            processor,
            # mlx-vlm admits new prompts only while `completion_batch_size - running >= prefill`; the
            # scheduler already caps running sequences at max_batch_size, so leave that headroom.
            completion_batch_size=max_batch_size + prefill,
            prefill_batch_size=prefill,
            prefill_step_size=prefill_step_size,
            stream=self._stream,
        )
        self._live: set[int] = set()
        self._logprobs: dict[int, deque] = {}
        self._prompt_tokens: dict[int, int] = {}

    # -- inputs ---------------------------------------------------------------------------------
    def _embed(self, prompt: VisionInputs | Sequence[int]) -> tuple[list[int], dict[str, Any]]:
        """Prompt ids and the kwargs BatchGenerator needs (``inputs_embeds`` with image features merged
        in, M-RoPE ``position_ids``/``rope_deltas`` where the family uses them), evaluated."""
        if isinstance(prompt, VisionInputs):
            if not prompt.prepared:
                prompt.preprocess(self.processor, self.model_config)
            inputs = prompt.model_inputs
            assert inputs is not None
            ids = list(prompt.input_ids)
            input_ids = inputs["input_ids"]
            pixel_values = inputs.get("pixel_values")
            mask = inputs.get("attention_mask")
            data = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_KWARGS}
        else:
            ids = [int(t) for t in prompt]
            input_ids = mx.array([ids])
            pixel_values, mask, data = None, mx.ones_like(input_ids), {}
        emb = self.model.get_input_embeddings(input_ids, pixel_values, mask=mask, **data)
        kwargs = {**data, **{k: v for k, v in emb.to_dict().items() if v is not None}}
        # Run the vision tower now: its cost and any failure belong to this request, not to a batch step.
        mx.eval([v for v in kwargs.values() if isinstance(v, mx.array)])
        return ids, kwargs

    def insert(self, prompt: VisionInputs | Sequence[int], max_tokens: int, sampler: Sampler | None,
               processors: list[LogitsProcessor], cache: list[Any] | None = None,
               cached_tokens: list[int] | None = None, *, keep_logprobs: bool = True, first: bool = False) -> int:
        """Queue one sequence: ``VisionInputs`` (chat with or without images) or plain token ids.
        (``first`` is accepted for the text batch's interface: vision prompts are prefilled in order.)

        ``StepResult.logprobs`` is the row's log-probability vector (after ``processors``), or None with
        ``keep_logprobs=False`` (saves holding a vocabulary-sized row per sequence). The prefix cache is
        not supported for vision models (``cache`` must be None)."""
        if cache is not None or cached_tokens:
            raise ValueError("VisionBatch does not take prompt caches")
        if not isinstance(prompt, VisionInputs) and not len(prompt):
            raise ValueError("empty prompt")
        with mx.stream(self._stream):
            ids, kwargs = self._embed(prompt)
        logprobs: deque = deque()
        if sampler is None and not processors and not keep_logprobs:
            row: list[Any] = []  # plain greedy: the batch's own argmax, no per-row work at all
        else:
            row = list(processors) + [_RowSampler(sampler, logprobs, keep_logprobs)]
        (uid,) = self._gen.insert([ids], max_tokens=[max_tokens], prompt_kwargs=[kwargs], logits_processors=[row])
        self._live.add(uid)
        self._logprobs[uid] = logprobs
        self._prompt_tokens[uid] = len(ids)
        if isinstance(prompt, VisionInputs):  # the embeddings hold what the model needs now
            prompt.model_inputs = None
            prompt.images = []
        return uid

    def prompt_tokens(self, uid: int) -> int:
        """Prompt tokens of a live sequence, image tokens included (``len(VisionInputs.input_ids)``)."""
        return self._prompt_tokens[uid]

    def _forget(self, uid: int) -> None:
        self._live.discard(uid)
        self._logprobs.pop(uid, None)
        self._prompt_tokens.pop(uid, None)

    def remove(self, uids: Sequence[int], keep_caches: bool = False) -> dict[int, tuple[list[Any], list[int]]]:
        """Drop sequences (queued, prefilling or decoding). No KV caches are handed back."""
        for uid in [u for u in uids if u in self._live]:
            self._gen.remove(uid)
            self._forget(uid)
        return {}

    def step(self) -> list[StepResult]:
        """One scheduling step: a decode step for running sequences and a prefill chunk for new ones."""
        _, responses = self._gen.next()
        out = []
        for r in responses:
            if r.uid not in self._live:
                continue
            pending = self._logprobs.get(r.uid)
            logprobs = pending.popleft() if pending else None
            if r.finish_reason is not None:
                self._forget(r.uid)
            out.append(StepResult(r.uid, r.token, logprobs, r.finish_reason))
        return out

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        self._gen.close()


# -- loading (GPU thread) ------------------------------------------------------------------------
def _detokenizer_class(model_path: Path) -> Any:
    """mlx-lm's streaming detokenizer for this tokenizer.json (what ``mlx_lm.load`` would pick)."""
    from mlx_lm import tokenizer_utils as tu

    path = model_path / "tokenizer.json"
    if path.exists():
        try:
            decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder")
        except (OSError, ValueError):
            decoder = None
        if decoder is not None:
            if tu._is_spm_decoder(decoder):
                return tu.SPMStreamingDetokenizer
            if tu._is_spm_decoder_no_space(decoder):
                return partial(tu.SPMStreamingDetokenizer, trim_space=False)
            if tu._is_bpe_decoder(decoder):
                return tu.BPEStreamingDetokenizer
    return tu.NaiveStreamingDetokenizer


def load_vision_model(name: str, source: str, batch_kwargs: dict[str, Any],
                      adapter_path: str | None = None) -> "LoadedModel":
    """``load_text_model`` for mlx-vlm checkpoints: the same ``LoadedModel``, with its processor."""
    import mlx_vlm
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_vlm.utils import get_model_path, load_config

    from .models import LoadedModel

    try:
        model_path = Path(get_model_path(source))
        model, processor = mlx_vlm.load(str(model_path), adapter_path=adapter_path)
        config = load_config(model_path)
    except Exception as e:  # bad path, unknown architecture, hub unreachable, corrupt weights
        raise ModelLoadError(f"could not load vision model {name!r} from {source!r}: {e}") from e
    hf_tokenizer = getattr(processor, "tokenizer", processor)
    criteria = getattr(hf_tokenizer, "stopping_criteria", None)
    if criteria is None:
        raise ModelLoadError(f"vision model {name!r}: mlx-vlm gave its processor no stopping criteria")
    criteria.reset(getattr(model.config, "eos_token_id", None))
    eos_ids = set(criteria.eos_token_ids)
    # A tokenizer like mlx-lm's (fresh streaming detokenizer per sequence, eos_token_ids, encode,
    # decode, apply_chat_template) over the processor's own tokenizer object.
    tokenizer = TokenizerWrapper(hf_tokenizer, _detokenizer_class(model_path), eos_token_ids=eos_ids)
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    text_cfg = getattr(model.config, "text_config", None)
    vocab_size = int(getattr(text_cfg, "vocab_size", 0) or config.get("vocab_size") or len(hf_tokenizer))
    context = int(getattr(text_cfg, "max_position_embeddings", 0) or config.get("max_position_embeddings") or 0)
    context = context or 1 << 20
    try:
        batch = VisionBatch(model, processor, sorted(eos_ids), **batch_kwargs)
    except Exception as e:  # a family mlx-vlm cannot batch (no language_model, no BatchGenerator support)
        raise ModelLoadError(f"vision model {name!r} cannot be served in a batch: {e}") from e
    return LoadedModel(
        name=name, source=source, model=model, tokenizer=tokenizer, config=config, nbytes=nbytes,
        vocab_size=vocab_size, context_length=context, eos_ids=eos_ids, batch=batch, kind="vision",
        processor=processor,
    )


def warmup_vision(m: "LoadedModel", policy: ImagePolicy | None = None) -> None:
    """One short generation with a small generated image, so the first client does not pay for the
    vision tower's first run (``engine.models.warmup`` covers the text path)."""
    import base64
    import io

    from PIL import Image

    batch: VisionBatch = m.batch  # type: ignore[assignment]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (127, 90, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msg = ChatMessage(role="user", content=[ImagePart(image_url={"url": url}), TextPart(text="Hi")])
    vi = prepare_vision_inputs(batch.processor, batch.model_config, [msg], policy or ImagePolicy())
    uid = batch.insert(vi, 2, None, [])
    for _ in range(8):
        if any(r.finish_reason for r in batch.step() if r.uid == uid):
            break
    batch.remove([uid])


__all__ = [
    "VisionInputs", "VisionBatch", "prepare_vision_inputs", "render_vision_prompt", "load_vision_model",
    "warmup_vision", "estimate_image_tokens", "estimate_prompt_tokens", "check_vision_context", "smart_resize",
]
