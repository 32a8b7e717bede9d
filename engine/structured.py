"""Structured output for the batch: llguidance matchers applied as per-sequence logits processors.

One ``GrammarCompiler`` per loaded model holds the llguidance tokenizer (built once: it walks the whole
vocabulary) and a cache of compiled grammars. ``compile`` runs where the request is accepted and
raises ``InvalidRequestError`` there; ``CompiledGrammar.make_processor`` gives each sequence its own
matcher (a shared one corrupts the other rows), and the GPU thread only advances matchers and masks.

Masks are applied with plain numpy/MLX ops: the packaged MLX kernels are Metal-only. In a ``TextBatch``
a ``MaskPass`` does one decode step's grammar work for all constrained rows at once.
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
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from .chat import chat_format
from .grammar import StructuredSpec, check_grammar, spec_from_response_format, to_grammar, validate_spec

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarProcessor",
    "MaskPass",
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
        # Tool-call and thinking markers are special to every grammar: free text can never produce one,
        # so a grammar names them by id (``<[id]>``) exactly where they belong (``engine.tools``).
        markers = chat_format(tokenizer).markers()
        special_ids = sorted(set(special) | set(self.eos_token_ids) | set(markers))
        self.llg_tokenizer = LLTokenizer(_VocabForLLG(tokens, self.eos_token_id, getattr(hf, "bos_token_id", None),
                                                      special_ids, hf))
        self.n_tokens = len(tokens)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec | Mapping[str, Any], after_thought: int | None = None) -> CompiledGrammar:
        """Validate and compile ``spec`` (or an OpenAI ``response_format``) for this model; raises
        ``InvalidRequestError`` with the reason. Milliseconds, cached by grammar: call it where the request
        is accepted (any thread), never on the GPU thread. ``after_thought``: see ``grammar.to_grammar``."""
        parsed = spec_from_response_format(spec)
        if parsed is None:
            raise ValueError("response_format does not constrain the output; build no processor")
        return self.compile_grammar(to_grammar(parsed, after_thought))

    def compile_grammar(self, grammar: str) -> CompiledGrammar:
        """``compile`` for a grammar already written (tool calls)."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        compiled = CompiledGrammar(self, grammar, check_grammar(grammar, self.llg_tokenizer))
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

    def __init__(self, compiler: GrammarCompiler, grammar: str, template: LLMatcher) -> None:
        self.compiler = compiler
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
        self._seen = -1  # context length the matcher has consumed
        self._ready_at = -1  # context length a ``MaskPass`` already advanced and masked for
        self._pass: MaskPass | None = None  # set while a pass is armed for this sequence's batch step
        self._pass_bias: mx.array | None = None  # this row of the pass's masks, as a bias row
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
        if self._pass is not None:
            self._pass.run(logits)
        if n == self._ready_at and not self.done:
            return logits + self._pass_bias  # a ``MaskPass`` advanced and masked this row with the batch
        if n != self._ready_at:  # alone: advance and mask this row only
            if self._seen < 0:
                self._seen = n  # first call: the context is the prompt
            elif n > self._seen:
                new = tokens.reshape(-1)[self._seen:].tolist()  # the one sync: the sampled token
                self._seen = n
                if not self.finished:
                    self._advance(new)
            if not self.done:
                self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
                self._check()
        if self.done:
            return logits + self._eos_bias(logits.shape[-1], logits.dtype)
        self._allow_every_eos(self._bitmask)
        return logits + _mask_bias(self._bitmask[None], logits.shape[-1], logits.dtype)

    def _allow_every_eos(self, bitmask: np.ndarray) -> None:
        """llguidance knows one EOS id; where it allows that one, allow the model's other EOS ids too."""
        if self._other_eos.size and (bitmask[self._eos >> 5] >> (self._eos & 31)) & 1:
            np.bitwise_or.at(bitmask.view(np.uint32), self._other_eos >> 5,
                             np.left_shift(np.uint32(1), (self._other_eos & 31).astype(np.uint32)))

    def _eos_bias(self, width: int, dtype: mx.Dtype) -> mx.array:
        # Built on first use, on the thread that runs the batch (never where the processor was made).
        if self._eos_only is None or self._eos_only.shape[-1] != width or self._eos_only.dtype != dtype:
            bias = np.full((1, width), -np.inf, dtype=np.float32)
            bias[0, [i for i in self._eos_ids if i < width]] = 0.0
            self._eos_only = mx.array(bias).astype(dtype)
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

    def _take(self, token: int) -> bool:
        """A ``MaskPass`` hands over the token sampled last step; True if a mask is still needed."""
        if self._seen < 0:
            return False  # never called yet: its first call reads the prompt itself
        self._seen += 1
        if not self.finished:
            self._advance([token])
        self._ready_at = self._seen
        return not self.done

    def _check(self) -> None:
        if self._matcher.is_error():
            self._fail()

    def _fail(self) -> None:
        # Only reachable if a sampler ignored the mask or a parser limit was hit: end the sequence.
        self.error = self._matcher.get_error().strip().split("\n", 1)[0] or "grammar matcher failed"
        log.warning("structured output stopped: %s", self.error)


@lru_cache(maxsize=1)
def _executor() -> LLExecutor:
    return LLExecutor()  # llguidance's thread pool: 80% of the CPUs, up to 32


class MaskPass:
    """One decode step's grammar work for every constrained row of a batch, done at once.

    mlx-lm calls logits processors row by row, and alone each row syncs on its sampled token, advances
    its matcher and computes its mask in turn, before the step's forward pass is even dispatched: on a
    GPU, 16 constrained rows left it idle for most of each step. Armed with the batch's in-flight tokens
    just before a step, the first constrained row's call dispatches the forward pass, reads every sampled
    token with one sync and computes all masks in parallel on llguidance's threads (GIL released) while
    the GPU runs; the other rows find their masks ready. Rows it was not armed with work alone.
    """

    def __init__(self) -> None:
        self._tokens: mx.array | None = None
        self._rows: list[tuple[int, GrammarProcessor]] = []
        self._masks = np.zeros((0, 0), dtype=np.int32)

    def arm(self, tokens: mx.array | None, processors: Sequence[Sequence[Any]]) -> None:
        """``tokens``: the batch's sampled-but-unread tokens, one per row; ``processors``: each row's."""
        if tokens is None or tokens.size != len(processors):
            return
        grammar = [(i, getattr(p, "inner", p)) for i, row in enumerate(processors) for p in row]  # RowGuard wraps
        self._rows = [(i, p) for i, p in grammar if isinstance(p, GrammarProcessor)]
        if self._rows:
            self._tokens = tokens
            for _, p in self._rows:
                p._pass = self

    def disarm(self) -> None:
        for _, p in self._rows:
            p._pass, p._pass_bias = None, None
        self._rows, self._tokens = [], None

    def run(self, logits: mx.array) -> None:
        """Called by each armed row's processor with its logits; works on the first call only."""
        if self._tokens is None:
            return
        tokens, self._tokens = self._tokens, None
        mx.async_eval(logits)  # the forward pass runs on the GPU while the masks are computed here
        sampled = tokens.reshape(-1).tolist()
        live = [p for i, p in self._rows if p._take(sampled[i])]
        if not live:
            return
        words = live[0]._bitmask.size
        if self._masks.shape[0] < len(live) or self._masks.shape[1] != words:
            self._masks = np.zeros((max(len(live), self._masks.shape[0]), words), dtype=np.int32)
        _executor().unsafe_compute_mask_ptr([(p._matcher, k) for k, p in enumerate(live)],
                                            self._masks.ctypes.data, words * 4, self._masks.shape[0])
        for k, p in enumerate(live):
            p._check()
            p._allow_every_eos(self._masks[k])
        bias = _mask_bias(self._masks[:len(live)], logits.shape[-1], logits.dtype)  # one upload for all rows
        for k, p in enumerate(live):
            p._pass_bias = bias[k:k + 1]


@lru_cache(maxsize=1)
def _bit_shifts() -> mx.array:
    return mx.arange(32, dtype=mx.uint32)


def _mask_bias(masks: np.ndarray, width: int, dtype: mx.Dtype) -> mx.array:
    """Rows to add to logits: 0 where a packed mask row (``int32`` words, bit ``i`` = token ``i``) allows
    a token, -inf elsewhere and past its end (logits wider than the vocabulary llguidance knows)."""
    rows, words = masks.shape
    n = min(width, words * 32)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    bias = (_unpack_on_device if on_gpu else _unpack_with_numpy)(masks, n, dtype)
    if n < width:
        bias = mx.concatenate([bias, mx.full((rows, width - n), -mx.inf, dtype=dtype)], axis=1)
    return bias


def _unpack_on_device(masks: np.ndarray, n: int, dtype: mx.Dtype) -> mx.array:
    """GPUs: the packed masks go up (4 KB a row for a 128k vocabulary, not 512 KB of floats) and are
    unpacked there, in a few ops for all rows."""
    rows, words = masks.shape
    bits = mx.right_shift(mx.array(masks.view(np.uint32))[:, :, None], _bit_shifts()) & 1
    allowed = bits.reshape(rows, words * 32)[:, :n].astype(mx.bool_)
    return mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


def _unpack_with_numpy(masks: np.ndarray, n: int, dtype: mx.Dtype) -> mx.array:
    """The CPU backend: numpy's unpack and log (log(1) = 0, log(0) = -inf) is about 4x faster than
    ``mx.where`` over a 150k vocabulary."""
    with np.errstate(divide="ignore"):
        unpacked = np.unpackbits(masks.view(np.uint8), axis=1, count=n, bitorder="little")
        return mx.array(np.log(unpacked.astype(np.float32))).astype(dtype)


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
