"""Structured output for the batch: llguidance matchers applied as per-sequence logits processors.

One ``GrammarCompiler`` per loaded model holds the llguidance tokenizer (built once: it walks the whole
vocabulary) and a cache of compiled grammars. ``compile`` runs where the request is accepted and
raises ``InvalidRequestError`` there; ``CompiledGrammar.make_processor`` gives each sequence its own
matcher (a shared one corrupts the other rows), and the GPU thread only advances matchers and masks.

Masks are applied with plain numpy/MLX ops: the packaged MLX kernels are Metal-only.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from .grammar import StructuredSpec, check_grammar, spec_from_response_format, to_grammar, validate_spec

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarProcessor",
    "StructuredSpec",
    "compiler_for",
    "spec_from_response_format",
    "to_grammar",
    "token_bytes",
    "validate_spec",
]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes, reversed (byte-level BPE vocabularies are written in them)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def _decoder_types(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_decoder_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_decoder_types(v) for v in node))
    return set()


def _decoder_kind(hf_tokenizer: Any) -> str:
    """``byte_level`` for GPT-2 style vocabularies, ``sentencepiece`` otherwise (``▁`` for spaces and
    ``<0xNN>`` byte fallback); read from the fast tokenizer's decoder, or guessed from the vocabulary."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is not None:
        types = _decoder_types(json.loads(decoder.__getstate__()))
        if "ByteLevel" in types:
            return "byte_level"
        if types & {"Metaspace", "ByteFallback", "Replace"}:
            return "sentencepiece"
    vocab = hf_tokenizer.get_vocab()
    return "byte_level" if "Ġ" in vocab or "Ċ" in vocab else "sentencepiece"


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer inside mlx-lm's ``TokenizerWrapper`` (or the argument itself)."""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if hasattr(inner, "convert_ids_to_tokens") else tokenizer


def token_bytes(tokenizer: Any) -> tuple[list[bytes], list[int]]:
    """The raw bytes of every token id and the ids of special tokens.

    Keyed by bytes rather than decoded text so a token holding part of a UTF-8 character is exactly
    that part (decoding it alone would give U+FFFD and let invalid UTF-8 through the grammar). Added
    tokens are literal text; special ones are reported so llguidance never emits them as text.
    """
    hf = _hf_tokenizer(tokenizer)
    n = len(hf)
    pieces = hf.convert_ids_to_tokens(list(range(n)))
    added = dict(getattr(hf, "added_tokens_decoder", {}) or {})
    special = set(getattr(hf, "all_special_ids", []) or [])
    special.update(i for i, t in added.items() if getattr(t, "special", False))
    kind = _decoder_kind(hf)
    byte_decoder = _gpt2_byte_decoder()
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].content.encode("utf-8"))
        elif piece is None:
            out.append(b"")  # a hole in the id space: never allowed
        elif isinstance(piece, bytes):  # tiktoken-style vocabularies are bytes already
            out.append(piece)
        elif kind == "byte_level":
            try:
                out.append(bytes(byte_decoder[c] for c in piece))
            except KeyError:
                out.append(piece.encode("utf-8"))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out, sorted(special)


class _VocabForLLG:
    """The duck type ``LLTokenizer`` accepts (``llguidance.TokenizerWrapper``) over our byte vocabulary."""

    is_tokenizer_wrapper = True

    def __init__(self, tokens: list[bytes], eos_token_id: int, bos_token_id: int | None,
                 special_token_ids: list[int], hf_tokenizer: Any) -> None:
        self.tokens = tokens
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.special_token_ids = special_token_ids
        self._hf = hf_tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        # llguidance tokenizes the valid UTF-8 prefix with us and falls back to greedy for the rest.
        s = text.decode("utf-8", errors="ignore") if isinstance(text, bytes) else text
        return list(self._hf.encode(s, add_special_tokens=False))


class GrammarCompiler:
    """Per-model structured-output state: the llguidance tokenizer and compiled grammars.

    ``vocab_size`` is the model's logits width (``config.json`` ``vocab_size``), which real checkpoints
    pad beyond the tokenizer; masks are sized by it. Building takes 1-2 s for a 150k vocabulary (CPU):
    do it when the model loads, not on the first constrained request.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, *, cache_size: int = 256) -> None:
        hf = _hf_tokenizer(tokenizer)
        tokens, special = token_bytes(tokenizer)
        self.vocab_size = int(vocab_size) if vocab_size is not None else len(tokens)
        eos_ids = _eos_ids(tokenizer)
        if not eos_ids:
            raise ValueError("the tokenizer has no EOS token: a constrained sequence could never end")
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos_ids))
        primary = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id: int = primary if primary in eos_ids else self.eos_token_ids[0]
        if max(self.eos_token_ids) >= self.vocab_size:
            raise ValueError(f"EOS id {max(self.eos_token_ids)} is outside the logits width {self.vocab_size}")
        # Ids the model can emit but the tokenizer lacks are empty tokens, which llguidance never allows.
        # A leading 0xFF marks a special token in llguidance; as text it can only start invalid UTF-8.
        tokens = [b"" if t[:1] == b"\xff" else t for t in tokens] + [b""] * (self.vocab_size - len(tokens))
        special_ids = sorted(set(special) | set(self.eos_token_ids))
        self.llg_tokenizer = LLTokenizer(_VocabForLLG(tokens, self.eos_token_id, getattr(hf, "bos_token_id", None),
                                                      special_ids, hf))
        self.n_tokens = len(tokens)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec | Mapping[str, Any]) -> CompiledGrammar:
        """Validate and compile ``spec`` (or an OpenAI ``response_format``) for this model; raises
        ``InvalidRequestError`` with the reason. Milliseconds, cached by grammar: call it where the request
        is accepted (any thread), never on the GPU thread."""
        parsed = spec_from_response_format(spec)
        if parsed is None:
            raise ValueError("response_format does not constrain the output; build no processor")
        grammar = to_grammar(parsed)
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        compiled = CompiledGrammar(self, parsed, grammar, check_grammar(grammar, self.llg_tokenizer))
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def _eos_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm: a set; some transformers tokenizers: an int
    if isinstance(ids, int):
        return {ids}
    if ids:
        return {int(i) for i in ids}
    single = getattr(tokenizer, "eos_token_id", None)
    return {int(single)} if single is not None else set()


class CompiledGrammar:
    """A validated grammar for one model; cheap to turn into per-sequence processors."""

    def __init__(self, compiler: GrammarCompiler, spec: StructuredSpec, grammar: str, template: LLMatcher) -> None:
        self.compiler = compiler
        self.spec = spec
        self.grammar = grammar
        self._template = template
        self._lock = threading.Lock()

    def make_processor(self) -> GrammarProcessor:
        """A fresh processor with its own matcher (a copy of the compiled one: microseconds). Give one to
        exactly one sequence; it touches no MLX state until it is called, so build it anywhere."""
        with self._lock:  # deep_copy reads the template; keep concurrent admissions apart
            matcher = self._template.deep_copy()
        return GrammarProcessor(matcher, self.compiler.n_tokens, self.compiler.eos_token_id,
                                self.compiler.eos_token_ids)


class GrammarProcessor:
    """An mlx-lm logits processor, ``(tokens, logits) -> logits``, for one sequence.

    mlx-lm passes the whole context (prompt, then generated tokens) and calls before each sampled
    token: the first call sees only the prompt, every later call has the previously sampled token
    last. That token is fed to the matcher, then every token the grammar forbids is set to -inf. When
    the grammar is complete (or the matcher failed) only EOS remains; after EOS (mlx-lm calls once
    more) the matcher is left alone and EOS stays the only choice.
    """

    def __init__(self, matcher: LLMatcher, n_tokens: int, eos_token_id: int, eos_token_ids: Iterable[int]) -> None:
        self._matcher = matcher
        self._eos = eos_token_id
        self._eos_ids = frozenset(eos_token_ids)
        self._other_eos = np.array(sorted(self._eos_ids - {eos_token_id}), dtype=np.int64)
        self._bitmask = np.zeros(((n_tokens + 31) // 32,), dtype=np.int32)
        self._n_bits = self._bitmask.size * 32
        self._seen = -1
        self._eos_only: mx.array | None = None
        self.finished = False  # EOS was sampled
        self.completed = False  # the grammar accepted the output (EOS was allowed when it came)
        self.error: str | None = None
        self.generated: list[int] = []

    @property
    def done(self) -> bool:
        """No token but EOS may follow."""
        return self.finished or self.error is not None or self._matcher.is_stopped()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.shape[-1]
        if self._seen < 0:
            self._seen = n  # first call: the context is the prompt
        elif n > self._seen:
            new = tokens.reshape(-1)[self._seen:].tolist()  # the one sync: the sampled token
            self._seen = n
            if not self.finished:
                self._advance(new)
        width = logits.shape[-1]
        if not self.done:
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if self._matcher.is_error():
                self._fail()
        if self.done:
            return logits + self._eos_bias(width, logits.dtype)
        if self._other_eos.size and (self._bitmask[self._eos >> 5] >> (self._eos & 31)) & 1:
            np.bitwise_or.at(self._bitmask.view(np.uint32), self._other_eos >> 5,
                             np.left_shift(np.uint32(1), (self._other_eos & 31).astype(np.uint32)))
        if mx.default_device().type == mx.DeviceType.gpu:
            return _masked_on_device(logits, self._bitmask, width)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), count=min(width, self._n_bits), bitorder="little")
        return logits + _bias(allowed, width, logits.dtype)

    def _eos_bias(self, width: int, dtype: mx.Dtype) -> mx.array:
        # Built on first use, on the thread that runs the batch (never where the processor was made).
        if self._eos_only is None or self._eos_only.shape[-1] != width or self._eos_only.dtype != dtype:
            allowed = np.zeros((width,), dtype=np.uint8)
            allowed[[i for i in self._eos_ids if i < width]] = 1
            self._eos_only = _bias(allowed, width, dtype)
        return self._eos_only

    def _advance(self, new: Sequence[int]) -> None:
        for token in new:
            self.generated.append(token)
            if token in self._eos_ids:
                self.completed = self.error is None and (self._matcher.is_accepting() or self._matcher.is_stopped())
                self.finished = True
                return
            if self.error is not None:
                continue
            if not self._matcher.consume_token(token):
                self._fail()

    def _fail(self) -> None:
        # Only reachable if a sampler ignored the mask or a parser limit was hit: end the sequence.
        self.error = self._matcher.get_error().strip().split("\n", 1)[0] or "grammar matcher failed"
        log.warning("structured output stopped: %s", self.error)


def _bias(allowed: np.ndarray, width: int, dtype: mx.Dtype) -> mx.array:
    """0 where ``allowed`` (0/1 bytes) is set, -inf elsewhere and past its end, as a row to add to logits.

    log(1) = 0 and log(0) = -inf exactly; on the CPU backend this plus an add is about 4x faster than
    ``mx.where`` or numpy boolean indexing over a 150k vocabulary, and adding keeps the logits' dtype.
    """
    with np.errstate(divide="ignore"):
        bias = np.log(allowed.astype(np.float32))
    if bias.size < width:  # logits wider than the vocabulary llguidance knows: never allowed
        bias = np.concatenate([bias, np.full((width - bias.size,), -np.inf, dtype=np.float32)])
    out = mx.array(bias)
    return out if dtype == mx.float32 else out.astype(dtype)


@lru_cache(maxsize=1)
def _bit_shifts() -> mx.array:
    return mx.arange(32, dtype=mx.uint32)


def _masked_on_device(logits: mx.array, bitmask: np.ndarray, width: int) -> mx.array:
    """``logits`` with -inf wherever the packed ``bitmask`` has a 0 bit (and past its end).

    On a GPU this uploads the packed mask (4 KB for a 128k vocabulary, not 512 KB of floats) and
    unpacks it there; the CPU's numpy work per sequence and step was what made constrained decoding
    slow on CUDA. On the CPU backend ``_bias`` is faster.
    """
    words = mx.array(bitmask.view(np.uint32))
    bits = (mx.right_shift(words[:, None], _bit_shifts()) & 1).reshape(-1)
    if bits.size < width:
        bits = mx.concatenate([bits, mx.zeros((width - bits.size,), dtype=bits.dtype)])
    return mx.where(bits[:width].astype(mx.bool_), logits, mx.array(-mx.inf, dtype=logits.dtype))


_compilers: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any, vocab_size: int | None = None) -> GrammarCompiler:
    """The ``GrammarCompiler`` of a loaded tokenizer, built on first use and kept as long as the
    tokenizer lives (one per model, whoever asks)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None or (vocab_size is not None and compiler.vocab_size != vocab_size):
            compiler = GrammarCompiler(tokenizer, vocab_size)
            _compilers[tokenizer] = compiler
        return compiler
