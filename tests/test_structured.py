"""Structured output through llguidance, driven by mlx-lm's BatchGenerator on the tiny demo model.

The demo model has random weights, so every valid byte here comes from the grammar. A random model also
has no reason to close a free-form string or stop adding digits; rows with such unbounded parts get a
bias toward closing punctuation (as a trained model's habits would), applied *before* the mask so it
cannot let an invalid token through.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator

from engine.errors import InvalidRequestError
from engine.grammar import (StructuredSpec, check_grammar, close_objects, spec_from_response_format, to_grammar,
                            validate_spec)
from engine.batch import TextBatch
from engine.structured import GrammarCompiler, GrammarProcessor, MaskPass, compiler_for, token_bytes

MAX_TOKENS = 300

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 6},
                "langs": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
            },
            "required": ["name", "langs"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["user", "active"],
}
REFS = {
    "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                     "required": ["x", "y"]}},
    "type": "object",
    "properties": {"a": {"$ref": "#/$defs/pt"},
                   "b": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 2, "maxItems": 2}},
    "required": ["a", "b"],
}
OPTIONAL = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                   "note": {"type": "string", "maxLength": 5},
                   "color": {"enum": ["red", "green", "blue"]}},
    "required": ["id"],
}
NUMBERS = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": -5, "maximum": 5}, "text": {"type": "string"}},
    "required": ["score", "text"],
}
REGEX = r"\d{3}-[a-z]{1,6}"
CHOICES = ["yes", "no", "café", 'say "hi"']


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    import mlx_lm

    return mlx_lm.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def compiler(tiny: tuple[Any, Any]) -> GrammarCompiler:
    model, tokenizer = tiny
    return compiler_for(tokenizer, model.args.vocab_size)


def seeded_sampler(seed: int, temp: float = 1.0) -> Callable[[mx.array], mx.array]:
    """Temperature sampling from a per-row key, so a row's tokens do not depend on its batch mates."""
    step = 0

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal step
        key = mx.random.key(seed * 100_003 + step)
        step += 1
        return mx.random.categorical(logprobs * (1.0 / temp), key=key)

    return sample


def closer_bias(tokenizer: Any, width: int, value: float = 8.0) -> Callable[[mx.array, mx.array], mx.array]:
    vocab, _ = token_bytes(tokenizer)
    ids = [i for i, b in enumerate(vocab) if b and set(b) <= set(b'"]}')]
    bias = np.zeros((1, width), dtype=np.float32)
    bias[0, ids] = value
    b = mx.array(bias)
    return lambda tokens, logits: logits + b


Row = tuple[list[int], Any, list[Any], int]


def run_batch(model: Any, tokenizer: Any, rows: list[Row]) -> list[tuple[list[int], str]]:
    """Generate every row in one BatchGenerator; return (tokens, finish_reason) per row."""
    gen = BatchGenerator(model, stop_tokens=[[e] for e in tokenizer.eos_token_ids])
    try:
        uids = gen.insert([r[0] for r in rows], max_tokens=[r[3] for r in rows],
                          samplers=[r[1] for r in rows], logits_processors=[r[2] for r in rows])
        return drain(uids, gen.next_generated)
    finally:
        gen.close()


def drain(uids: list[int], step: Callable[[], Any]) -> list[tuple[list[int], str]]:
    """Step until every sequence finished; (tokens, finish_reason) per uid, in order."""
    out: dict[int, list[int]] = {u: [] for u in uids}
    finished: dict[int, str] = {}
    while len(finished) < len(uids):
        for r in step():
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                finished[r.uid] = r.finish_reason
    return [(out[u], finished[u]) for u in uids]


def text_of(tokenizer: Any, tokens: list[int]) -> str:
    """Decode from raw token bytes, strictly: invalid UTF-8 fails the test instead of becoming U+FFFD."""
    vocab, _ = token_bytes(tokenizer)
    return b"".join(vocab[t] for t in tokens if t not in tokenizer.eos_token_ids).decode("utf-8")


def test_vocabulary_bytes_match_llguidance_reading_of_tokenizer_json(tiny: tuple[Any, Any]) -> None:
    import llguidance.hf

    _, tokenizer = tiny
    ours, special = token_bytes(tokenizer)
    reference = llguidance.hf.from_tokenizer(tokenizer._tokenizer)
    mine = GrammarCompiler(tokenizer).llg_tokenizer
    assert len(ours) == len(tokenizer) == mine.vocab_size
    # A leading 0xFF is llguidance's special-token marker: both readings keep such tokens out of grammars.
    text_ids = [i for i in range(len(ours)) if ours[i][:1] != b"\xff"]
    assert all(ours[i] == mine.decode_bytes([i]) == reference.decode_bytes([i]) for i in text_ids)
    assert set(tokenizer.eos_token_ids) <= set(special)
    assert any(b.decode("utf-8", errors="replace") != b.decode("utf-8", errors="ignore") for b in ours), \
        "the demo vocabulary should hold partial UTF-8 tokens (that is what byte keys are for)"


def test_sentencepiece_vocabulary_bytes() -> None:
    """``▁`` is a space and ``<0xNN>`` is one raw byte (Llama/Mistral-style byte fallback)."""
    import llguidance.hf
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "▁the", "▁café", "é", "{", '"', "}", "▁▁"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    ours, special = token_bytes(hf)
    reference = llguidance.hf.from_tokenizer(hf)
    assert special == [0, 1, 2]
    assert ours[vocab["▁café"]] == " café".encode() and ours[vocab["<0xC3>"]] == b"\xc3"
    assert all(ours[i] == reference.decode_bytes([i]) for i in range(len(ours)) if ours[i][:1] != b"\xff")
    assert GrammarCompiler(hf).eos_token_ids == (2,)


def mixed_rows(tokenizer: Any, compiler: GrammarCompiler, width: int
               ) -> tuple[list[Row], dict[int, GrammarProcessor], dict[int, Any], list[int]]:
    """16 rows: 12 constrained (every schema kind, greedy and sampled, some biased) and 4 free. Fresh
    processors and samplers each call, so two runs see the same rows."""
    texts = ["Hello there", "The quick brown fox", "Give me JSON:", "In a hole in the ground"]
    prompts = [tokenizer.encode(t) for t in texts]
    bias = closer_bias(tokenizer, width)
    schema = lambda s: {"kind": "json_schema", "schema": s}  # noqa: E731
    # (prompt, sampler, extra processors before the grammar, spec, check)
    constrained: list[tuple[int, Any, list[Any], dict[str, Any], Any]] = [
        (0, None, [], schema(PERSON), PERSON),
        (1, seeded_sampler(1), [], schema(PERSON), PERSON),
        (2, None, [], schema(NESTED), NESTED),
        (3, seeded_sampler(2), [], schema(NESTED), NESTED),
        (0, seeded_sampler(3), [], schema(REFS), REFS),
        (1, None, [], schema(OPTIONAL), OPTIONAL),
        (2, seeded_sampler(4), [], schema(OPTIONAL), OPTIONAL),
        (3, seeded_sampler(5), [bias], schema(NUMBERS), NUMBERS),
        (0, seeded_sampler(6), [bias], {"kind": "json_object"}, {"type": "object"}),
        (1, None, [bias], {"type": "json_object"}, {"type": "object"}),  # OpenAI's response_format shape
        (2, None, [], {"kind": "regex", "pattern": REGEX}, REGEX),
        (3, seeded_sampler(7), [], {"kind": "choice", "choices": CHOICES}, CHOICES),
    ]
    free_idx = [0, 5, 10, 15]
    rows: list[Row] = []
    processors: dict[int, GrammarProcessor] = {}
    checks: dict[int, Any] = {}
    it = iter(constrained)
    for i in range(16):
        if i in free_idx:
            rows.append((prompts[free_idx.index(i)] + [7 + free_idx.index(i)], None, [], 24))
            continue
        p, sampler, extra, spec, check = next(it)
        processors[i] = compiler.compile(spec).make_processor()
        checks[i] = check
        rows.append((prompts[p], sampler, [*extra, processors[i]], MAX_TOKENS))
    return rows, processors, checks, free_idx


def run_text_batch(model: Any, tokenizer: Any, rows: list[Row]) -> list[tuple[list[int], str]]:
    """The same rows through the engine's ``TextBatch``, whose ``MaskPass`` masks all constrained rows at once."""
    batch = TextBatch(model, sorted(tokenizer.eos_token_ids), max_batch_size=len(rows),
                      prefill_batch_size=len(rows), prefill_step_size=512)
    try:
        return drain([batch.insert(r[0], r[3], r[1], r[2]) for r in rows], batch.step)
    finally:
        batch.close()


def test_mixed_batch_constrained_rows_validate_and_free_rows_are_untouched(
        tiny: tuple[Any, Any], compiler: GrammarCompiler, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny
    width = model.args.vocab_size
    passes: list[int] = []
    run = MaskPass.run

    def counted(self: MaskPass, logits: mx.array) -> None:
        passes.append(len(self._rows) if self._tokens is not None else 0)
        run(self, logits)

    monkeypatch.setattr(MaskPass, "run", counted)
    rows, processors, checks, free_idx = mixed_rows(tokenizer, compiler, width)
    results = run_text_batch(model, tokenizer, rows)
    # Most decode steps did all constrained rows' work in one pass, the rest of their calls found it done.
    assert max(passes) == len(processors) and sum(1 for n in passes if n) > 20

    for i, (tokens, reason) in enumerate(results):
        if i in free_idx:
            continue
        out = text_of(tokenizer, tokens)
        assert reason == "stop" and tokens[-1] in tokenizer.eos_token_ids, (i, reason, out)
        assert processors[i].completed and processors[i].error is None, (i, out)
        check = checks[i]
        if check is REGEX:
            assert re.fullmatch(REGEX, out, flags=re.ASCII), out
        elif check is CHOICES:
            assert out in CHOICES
        else:
            jsonschema.validate(json.loads(out), check)
            jsonschema.validate(json.loads(out), close_objects(check))  # and no invented keys, at any depth

    # Row by row (mlx-lm alone, each processor on its own) gives the same tokens, sampled rows included.
    alone_rows, _, _, _ = mixed_rows(tokenizer, compiler, width)
    assert run_batch(model, tokenizer, alone_rows) == results
    for i in free_idx:
        assert results[i] == run_batch(model, tokenizer, [rows[i]])[0], f"free row {i} changed by its neighbours"
        assert results[i][1] == "length"


def test_greedy_is_deterministic_and_processor_state_is_per_sequence(
        tiny: tuple[Any, Any], compiler: GrammarCompiler) -> None:
    model, tokenizer = tiny
    compiled = compiler.compile({"kind": "json_schema", "schema": PERSON})
    assert compiler.compile({"kind": "json_schema", "schema": PERSON}) is compiled  # cached by grammar
    prompt = tokenizer.encode("Hello there")
    rows: list[Row] = [(prompt, None, [compiled.make_processor()], MAX_TOKENS) for _ in range(3)]
    a, b, c = run_batch(model, tokenizer, rows)
    assert a == b == c and a[1] == "stop"
    jsonschema.validate(json.loads(text_of(tokenizer, a[0])), PERSON)


def test_after_completion_only_eos_and_no_advance(tiny: tuple[Any, Any], compiler: GrammarCompiler) -> None:
    model, tokenizer = tiny
    width = model.args.vocab_size
    eos = compiler.eos_token_id
    proc = compiler.compile({"kind": "choice", "choices": ["yes", "no"]}).make_processor()
    logits = mx.zeros((1, width))
    prompt = tokenizer.encode("Answer:")
    first = proc(mx.array(prompt), logits)  # first call: nothing consumed yet
    assert not mx.isinf(first[0, tokenizer.encode("yes")[0]]).item()
    assert mx.isinf(first[0, eos]).item()  # nothing generated yet: EOS not allowed
    context = prompt + tokenizer.encode("yes")
    after = proc(mx.array(context), logits)
    finite = np.nonzero(np.isfinite(np.array(after[0])))[0].tolist()
    assert finite == [eos] and proc.done and not proc.finished
    proc(mx.array(context + [eos]), logits)
    assert proc.finished and proc.completed
    again = proc(mx.array(context + [eos, 5]), logits)  # mlx-lm's extra call after EOS
    assert np.nonzero(np.isfinite(np.array(again[0])))[0].tolist() == [eos]
    assert proc.generated == tokenizer.encode("yes") + [eos]


def test_padded_logits_and_several_eos_ids(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    class TwoEos:
        """The tokenizer with a second EOS id, as Llama-3-style checkpoints have."""

        def __init__(self, inner: Any) -> None:
            self._tokenizer = inner._tokenizer
            self.eos_token_id = inner.eos_token_id
            self.eos_token_ids = {inner.eos_token_id, 1}

    width = model.args.vocab_size + 64  # a checkpoint whose embedding is padded past the tokenizer
    comp = GrammarCompiler(TwoEos(tokenizer), width)
    proc = comp.compile({"kind": "regex", "pattern": "ok"}).make_processor()
    logits = mx.zeros((1, width))
    out = proc(mx.array([5]), logits)
    assert out.shape == (1, width)
    assert proc(mx.array([5]), logits.astype(mx.bfloat16)).dtype == mx.bfloat16  # no promotion of the batch
    assert mx.isinf(out[0, model.args.vocab_size:]).all().item()
    done = proc(mx.array([5] + tokenizer.encode("ok")), logits)
    assert np.nonzero(np.isfinite(np.array(done[0])))[0].tolist() == sorted({tokenizer.eos_token_id, 1})
    proc(mx.array([5] + tokenizer.encode("ok") + [1]), logits)
    assert proc.finished and proc.completed


@pytest.mark.parametrize("spec, reason", [
    ({"kind": "json_schema", "schema": {"type": "nosuchtype"}}, "nosuchtype"),
    ({"kind": "json_schema", "schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"kind": "json_schema", "schema": {"type": "integer", "minimum": 5, "maximum": 2}}, "minimum"),
    ({"kind": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "missing"),
    ({"kind": "json_schema", "schema": {"type": "string", "format": "no-such-format"}}, "format"),
    ({"kind": "regex", "pattern": "a(b"}, "regex"),
    ({"kind": "choice", "choices": []}, "choices"),
    ({"kind": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}}, "nosuchtype"),
    ({"type": "yaml"}, "yaml"),
    ({"json_schema": {"schema": {}}}, "None"),
])
def test_bad_specs_are_refused_before_generation(compiler: GrammarCompiler, spec: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_spec(spec)
    assert info.value.param == "response_format" and reason in info.value.message
    assert info.value.kind == "invalid"
    with pytest.raises(InvalidRequestError):
        compiler.compile(spec)


def test_objects_with_properties_are_closed(tiny: tuple[Any, Any], compiler: GrammarCompiler) -> None:
    _, tokenizer = tiny

    def accepts(schema: dict[str, Any], text: str) -> bool:
        m = check_grammar(to_grammar(StructuredSpec(kind="json_schema", schema=schema)), compiler.llg_tokenizer)
        return m.consume_tokens(tokenizer.encode(text)) and m.is_accepting()

    props = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert accepts(props, '{"a": 1}')
    assert not accepts(props, '{"a": 1, "b": 2}')
    assert accepts({**props, "additionalProperties": True}, '{"a": 1, "b": 2}')
    assert accepts({"type": "object"}, '{"b": [1, {"c": null}]}')  # bare object: any object
    assert not accepts(props, '{ "a": 1}')  # no free whitespace
    nested = close_objects({"properties": {"properties": {"type": "object", "properties": {"x": {}}}}})
    assert nested["additionalProperties"] is False
    assert nested["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in nested["properties"]  # a property named "properties" is not a keyword


def test_response_format_shapes() -> None:
    assert spec_from_response_format(None) is None
    assert spec_from_response_format({"type": "text"}) is None and validate_spec({"type": "text"}) is None
    assert spec_from_response_format({"type": "json_object"}) == StructuredSpec(kind="json_object")
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    spec = spec_from_response_format(rf)
    assert spec is not None and spec.kind == "json_schema" and spec.json_schema == PERSON and spec.strict
    choice = validate_spec({"kind": "choice", "choices": ["café", 'a"b']})
    assert choice is not None and choice.choices == ["café", 'a"b']


def test_gpu_mask_path_matches_the_cpu_one() -> None:
    """The packed masks unpacked by MLX (used on GPUs) ban exactly what the numpy path bans, row by row,
    past the masks' end included."""
    from engine.structured import _mask_bias, _unpack_on_device, _unpack_with_numpy

    rng = np.random.default_rng(0)
    n_tokens, width = 1000, 1040  # logits wider than the vocabulary: the rest is never allowed
    masks = rng.integers(-2**31, 2**31 - 1, size=(3, (n_tokens + 31) // 32), dtype=np.int64).astype(np.int32)
    n = masks.shape[1] * 32
    for dtype in (mx.float32, mx.bfloat16):
        on_device, with_numpy = _unpack_on_device(masks, n, dtype), _unpack_with_numpy(masks, n, dtype)
        assert on_device.dtype == with_numpy.dtype == dtype and on_device.shape == with_numpy.shape == (3, n)
        assert mx.array_equal(on_device, with_numpy).item()
    bias = np.array(_mask_bias(masks, width, mx.float32))
    expected = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little").astype(bool)
    assert bias.shape == (3, width) and np.isinf(bias[:, n:]).all()
    assert np.array_equal(bias[:, :n] == 0, expected) and np.isinf(bias[:, :n][~expected]).all()
    assert 0 < expected.sum() < expected.size
