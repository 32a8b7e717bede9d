"""Hardening, in-process: poison requests are refused before the GPU thread, a failure while handling
one sequence ends that sequence alone, preparation runs on a bounded pool off the event loop, the GPU
thread's death is heard at once, and prefix-cache entries stay within their tenant.

Every test that fails a sequence runs bystanders beside it and checks they finish with exactly the
tokens they produce alone. Faults no request can cause any more (the poisons are fixed) are injected
by patching the one function that fails: those are the "bugs we do not know yet".
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from engine import engine as engine_module
from engine import scheduler as scheduler_module
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineFailureError, InvalidRequestError, OverCapacityError
from engine.request import MAX_JSON_DEPTH, MAX_STOP, MAX_STOP_CHARS, GenerationChunk

BYSTANDERS = ["The lighthouse keeper counted the ships", "What is the capital of France?", "0 1 2 3 4 5"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def req(prompt: str, max_tokens: int = 24, model: str = "tiny", **sampling: Any) -> dict[str, Any]:
    sampling.setdefault("temperature", 0.0)
    return {"model": model, "prompt": prompt, "sampling": {"max_tokens": max_tokens, **sampling}}


def no_eos(e: Engine, model: str = "tiny") -> dict[int, float]:
    return {i: -100.0 for i in e._model(model).eos_ids}


@pytest.fixture(scope="module")
def padded_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo as real checkpoints ship: the embedding and head padded past the tokenizer (1024 -> 1088)."""
    out = tmp_path_factory.mktemp("padded") / "tiny-padded"
    shutil.copytree(tiny_model_dir, out)
    weights = mx.load(str(out / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        weights[name] = mx.concatenate([w, mx.zeros((64, w.shape[1]), dtype=w.dtype)])
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = 1088
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, padded_model_dir: Path) -> Engine:
    e = Engine(EngineConfig(max_batch_size=16, warmup=False))
    run(e.load_model("tiny", str(tiny_model_dir)))
    run(e.load_model("padded", str(padded_model_dir)))
    yield e
    run(e.shutdown(drain_timeout_s=1))


@pytest.fixture(scope="module")
def solo(engine: Engine) -> dict[str, list[int]]:
    """Each bystander's greedy tokens when it runs alone."""
    return {p: run(engine.complete(req(p, 16, logit_bias=no_eos(engine)))).token_ids for p in BYSTANDERS}


def expect_refused(e: Engine, body: dict[str, Any], code: str, param: str | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        run(e.complete(body))
    assert info.value.code == code, info.value.message
    if param is not None:
        assert info.value.param == param
    assert info.value.kind == "invalid"
    return info.value


# -- poison requests ---------------------------------------------------------------------------------
def test_padded_vocabulary_token_ids_are_checked_against_the_tokenizer(engine: Engine) -> None:
    m = engine._model("padded")
    assert (m.vocab_size, len(m.tokenizer), m.token_limit) == (1088, 1024, 1024)
    inside_padding = 1050  # a row of the embedding, but no token of the tokenizer
    expect_refused(engine, req("hi", model="padded", logit_bias={inside_padding: 5.0}), "token_id_out_of_range", "logit_bias")
    expect_refused(engine, {"model": "padded", "prompt_token_ids": [5, inside_padding]}, "token_id_out_of_range", "prompt")
    with pytest.raises(InvalidRequestError) as info:
        engine.detokenize("padded", [1, inside_padding])
    assert info.value.code == "token_id_out_of_range" and info.value.param == "tokens"
    with pytest.raises(InvalidRequestError):
        engine.detokenize("padded", [-1])
    out = run(engine.complete(req("hi", 8, model="padded", logit_bias={1023: 1.0})))  # the last real token is fine
    assert out.usage.completion_tokens >= 1


@pytest.mark.parametrize("sampling, code", [
    ({"logit_bias": {5: float("nan")}}, "invalid_request"),
    ({"logit_bias": {5: float("inf")}}, "invalid_request"),
    ({"logit_bias": {-1: 1.0}}, "invalid_request"),
    ({"logit_bias": {10**30: 1.0}}, "token_id_out_of_range"),
    ({"stop": ["x"] * (MAX_STOP + 1)}, "invalid_request"),
    ({"stop": ["y" * (MAX_STOP_CHARS + 1)]}, "invalid_request"),
    ({"max_tokens": 10**9}, "invalid_request"),
    ({"seed": 2**64}, "invalid_request"),
])
def test_poison_sampling_fields_are_refused(engine: Engine, sampling: dict[str, Any], code: str) -> None:
    body = req("hello", **sampling)
    body["sampling"].update(sampling)
    expect_refused(engine, body, code)


def test_prompt_token_ids_out_of_range_and_too_many(engine: Engine) -> None:
    expect_refused(engine, {"model": "tiny", "prompt_token_ids": [-3, 4]}, "invalid_request")
    expect_refused(engine, {"model": "tiny", "prompt_token_ids": [4, 1024]}, "token_id_out_of_range", "prompt")
    expect_refused(engine, {"model": "tiny", "prompt_token_ids": [4] * 2_000_000}, "invalid_request")


def test_top_k_of_any_size_is_clamped_to_the_vocabulary(engine: Engine, solo: dict[str, list[int]]) -> None:
    async def go() -> tuple[list[GenerationChunk], list[GenerationChunk]]:
        bias = no_eos(engine)
        huge = [engine.complete(req("Once upon a time", 12, temperature=0.8, seed=11, top_k=k, logit_bias=bias))
                for k in (10**30, 10**6, 1024, 0)]
        bystanders = [engine.complete(req(p, 16, logit_bias=bias)) for p in BYSTANDERS]
        return await asyncio.gather(*huge), await asyncio.gather(*bystanders)

    huge, bystanders = run(go())
    assert len({tuple(h.token_ids) for h in huge}) == 1  # top_k >= vocabulary keeps every token, like 0
    assert [b.token_ids for b in bystanders] == [solo[p] for p in BYSTANDERS]


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deeply_nested_json_is_refused_anywhere(engine: Engine) -> None:
    deep = _nested(MAX_JSON_DEPTH + 5)
    expect_refused(engine, {**req("x"), "response_format": {"type": "json_schema", "json_schema": {"schema": deep}}},
                   "invalid_request")
    expect_refused(engine, {"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": deep}]},
                   "invalid_request")


def test_grammar_size_and_choice_bounds(engine: Engine) -> None:
    huge_enum = {"type": "string", "enum": [f"value-{i:05d}-" + "x" * 60 for i in range(20_000)]}
    t0 = time.monotonic()
    err = expect_refused(engine, {**req("x"), "response_format": {"type": "json_schema", "json_schema": {"schema": huge_enum}}},
                         "grammar_too_complex", "response_format")
    assert "limit" in err.message and time.monotonic() - t0 < 30  # refused by size, before any compile ran
    expect_refused(engine, {**req("x"), "response_format": {"type": "choice", "choices": ["a"] * 300}}, "invalid_request")
    expect_refused(engine, {**req("x"), "response_format": {"type": "choice", "choices": ["a" * 2000]}}, "invalid_request")


# -- one sequence fails alone ---------------------------------------------------------------------------
POISON = "poison request"


def _boom_after(n: int):
    calls = {"n": 0}

    def maybe_fail() -> None:
        calls["n"] += 1
        if calls["n"] > n:
            raise RuntimeError("a bug in this request's path")

    return maybe_fail


def _inject(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    """Make the handling of the POISON request fail at ``stage`` (a bug we have not met yet)."""
    is_poison = lambda params: params.presence_penalty == 1.5  # noqa: E731 - the poison's marker
    if stage == "processor":
        real = engine_module.make_processors

        def processors(params):  # noqa: ANN001
            out = real(params)
            if is_poison(params):
                fail = _boom_after(3)
                out.append(lambda tokens, logits: (fail(), logits)[1])
            return out

        monkeypatch.setattr(engine_module, "make_processors", processors)
    elif stage == "sampler":
        real_sampler = engine_module.make_sampler

        def sampler(params):  # noqa: ANN001
            inner = real_sampler(params)
            if not is_poison(params):
                return inner
            fail = _boom_after(3)
            return lambda logprobs: (fail(), mx.argmax(logprobs, axis=-1))[1]

        monkeypatch.setattr(engine_module, "make_sampler", sampler)
    elif stage == "deliver":
        real_output = scheduler_module.SequenceOutput

        class Output(real_output):  # type: ignore[misc, valid-type]
            def __init__(self, tokenizer: Any, params: Any, eos: Any, *rest: Any) -> None:
                super().__init__(tokenizer, params, eos, *rest)
                self._fail = _boom_after(3) if is_poison(params) else (lambda: None)

            def add(self, token: int, logprobs: Any) -> Any:
                self._fail()
                return super().add(token, logprobs)

        monkeypatch.setattr(scheduler_module, "SequenceOutput", Output)
    elif stage == "admit":
        real_start = scheduler_module.GpuScheduler._start

        def start(self, m, seq, speculative):  # noqa: ANN001
            if is_poison(seq.request.sampling):
                raise RuntimeError("a bug while admitting")
            return real_start(self, m, seq, speculative)

        monkeypatch.setattr(scheduler_module.GpuScheduler, "_start", start)
    elif stage == "expire":
        real_stalled = scheduler_module.RequestStream.stalled

        def stalled(self, timeout_s, now):  # noqa: ANN001
            if self.request_id == "poison":
                raise RuntimeError("a bug while expiring")
            return real_stalled(self, timeout_s, now)

        monkeypatch.setattr(scheduler_module.RequestStream, "stalled", stalled)


@pytest.mark.parametrize("stage", ["processor", "sampler", "deliver", "admit", "expire"])
def test_an_error_handling_one_sequence_ends_it_alone(tiny_model_dir: Path, solo: dict[str, list[int]],
                                                      monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    _inject(monkeypatch, stage)
    e = Engine(EngineConfig(max_batch_size=8, warmup=False, admission_window_ms=0))

    async def go() -> tuple[BaseException | GenerationChunk, list[GenerationChunk]]:
        await e.load_model("tiny", str(tiny_model_dir))
        bias = no_eos(e)
        bystanders = [asyncio.ensure_future(e.complete(req(p, 16, logit_bias=bias))) for p in BYSTANDERS]
        poison = {**req(POISON, 40, presence_penalty=1.5, temperature=0.7, logit_bias=bias), "request_id": "poison"}
        failed = await asyncio.gather(e.complete(poison), return_exceptions=True)
        return failed[0], await asyncio.gather(*bystanders)

    failed, bystanders = run(go())
    assert isinstance(failed, EngineFailureError) and failed.code == "sequence_failed", failed
    assert "poison" in failed.message and "bug" not in failed.message  # the id to quote, not the internals
    assert [b.token_ids for b in bystanders] == [solo[p] for p in BYSTANDERS]
    h = e.health()
    assert h.healthy and h.active == 0 and e.open_streams == 0
    again = run(e.complete(req(BYSTANDERS[0], 16, logit_bias=no_eos(e))))
    assert again.token_ids == solo[BYSTANDERS[0]]
    run(e.shutdown(1))


def test_a_prompt_cache_that_cannot_store_costs_only_the_cache(tiny_model_dir: Path, solo: dict[str, list[int]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.prompt_cache import PromptCache

    attempts = []

    def broken(self, tokens, cache, scope=""):  # noqa: ANN001
        attempts.append(len(tokens))
        raise MemoryError("cannot keep this cache")

    monkeypatch.setattr(PromptCache, "store", broken)
    e = Engine(EngineConfig(warmup=False, prompt_cache_gb=0.1))
    run(e.load_model("tiny", str(tiny_model_dir)))
    async def go() -> list[GenerationChunk]:
        return await asyncio.gather(*[e.complete(req(p, 16, logit_bias=no_eos(e), stop=["zzzq"])) for p in BYSTANDERS])

    outs = run(go())
    assert [o.token_ids for o in outs] == [solo[p] for p in BYSTANDERS]
    assert len(attempts) == len(BYSTANDERS)  # every finished sequence tried to keep its cache
    assert e.health().healthy
    run(e.shutdown(1))


# -- the GPU thread's death ------------------------------------------------------------------------------
def test_gpu_thread_death_is_heard_at_once_and_unstarted_requests_can_be_retried(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(max_batch_size=1, warmup=False, admission_window_ms=0))
    heard: list[tuple[BaseException, float]] = []
    e.on_death(lambda exc: heard.append((exc, time.monotonic())))

    async def go() -> tuple[list[Any], float]:
        await e.load_model("tiny", str(tiny_model_dir))
        bias = no_eos(e)
        running = e.generate(req("running", 500, logit_bias=bias))
        await running.__anext__()  # it has produced tokens
        waiting = asyncio.ensure_future(e.complete(req("waiting", 8)))  # never started: the batch is full
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        e.crash_gpu_thread()

        async def drain() -> None:
            async for _ in running:
                pass

        return await asyncio.gather(drain(), waiting, return_exceptions=True), t0

    (mid_stream, unstarted), crashed_at = run(go())
    deadline = time.monotonic() + 5  # the listeners run on the dying thread, after every waiter is told
    while not heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(heard) == 1 and heard[0][1] - crashed_at < 2.0
    assert isinstance(mid_stream, EngineFailureError) and mid_stream.code == "engine_dead"
    assert isinstance(unstarted, EngineFailureError) and unstarted.code == "engine_dead"  # the ingress retries these
    assert not e.health().alive
    late: list[BaseException] = []
    e.on_death(lambda exc: late.append(exc))  # a listener added after the death hears it too
    assert len(late) == 1


def test_loading_after_the_gpu_thread_died_fails_instead_of_deadlocking(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))
    e.crash_gpu_thread()
    deadline = time.monotonic() + 10
    while e.health().alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not e.health().alive
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            e.load_model_blocking("tiny", str(tiny_model_dir))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "load_model deadlocked on a dead engine"
    assert isinstance(outcome[0], EngineFailureError) and outcome[0].code == "engine_dead"


# -- preparation pool ----------------------------------------------------------------------------------
def test_preparation_runs_off_the_event_loop_and_a_full_pool_answers_429(tiny_model_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    e = Engine(EngineConfig(warmup=False, prepare_workers=1, prepare_queue=0))
    run(e.load_model("tiny", str(tiny_model_dir)))
    gate = threading.Event()
    threads: list[int] = []
    real_prepare = e.prepare

    def slow_prepare(request, loop):  # noqa: ANN001 - a costly template or image decode, held open
        threads.append(threading.get_ident())
        gate.wait(10)
        return real_prepare(request, loop)

    monkeypatch.setattr(e, "prepare", slow_prepare)

    async def go() -> tuple[Any, BaseException | None, int, GenerationChunk]:
        loop_thread = threading.get_ident()
        first = asyncio.ensure_future(e.complete(req("first", 4)))
        await asyncio.sleep(0.1)
        refused = None
        try:
            await e.complete(req("second", 4))
        except OverCapacityError as exc:
            refused = exc
        ticks = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:  # the loop keeps turning while a worker is busy
            await asyncio.sleep(0.01)
            ticks += 1
        gate.set()
        return loop_thread, refused, ticks, await first

    loop_thread, refused, ticks, first = run(go())
    assert refused is not None and refused.kind == "capacity" and refused.retry_after
    assert ticks >= 10
    assert threads and loop_thread not in threads
    assert first.usage.completion_tokens >= 1
    run(e.shutdown(1))


def test_a_caller_leaving_during_preparation_leaves_nothing_behind(tiny_model_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    e = Engine(EngineConfig(warmup=False))
    run(e.load_model("tiny", str(tiny_model_dir)))
    gate = threading.Event()
    real_prepare = e.prepare
    monkeypatch.setattr(e, "prepare", lambda request, loop: (gate.wait(10), real_prepare(request, loop))[1])

    async def go() -> None:
        task = asyncio.ensure_future(e.complete(req("leaving", 200)))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.set()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if e.open_streams == 0 and e.health().active == 0 and e.health().waiting == 0:
                return

    run(go())
    assert e.open_streams == 0 and e.health().active == 0
    run(e.shutdown(1))


# -- tenants -------------------------------------------------------------------------------------------
def test_prefix_cache_entries_are_found_only_from_their_own_scope(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False, prompt_cache_gb=0.1))
    run(e.load_model("tiny", str(tiny_model_dir)))
    prompt = " ".join(BYSTANDERS) * 8

    def ask(scope: str) -> GenerationChunk:
        return run(e.complete({**req(prompt, 4), "cache_scope": scope}))

    assert ask("tenant-a").usage.cached_tokens == 0
    assert ask("tenant-a").usage.cached_tokens > 100  # the same tenant finds its own prompt
    assert ask("tenant-b").usage.cached_tokens == 0  # another tenant learns nothing from it
    assert ask("tenant-a:salted").usage.cached_tokens == 0
    run(e.shutdown(1))


def test_a_first_token_after_a_long_wait_is_not_a_stalled_consumer() -> None:
    """A sequence that waited minutes for its prefill (a busy replica) is not cut off as
    ``consumer_stalled`` the moment its first token arrives: only items left unread that long are."""
    from engine.streams import RequestStream

    loop = asyncio.new_event_loop()
    try:
        stream = RequestStream("r1", loop, max_items=8)
        stream.last_read -= 1000  # created long ago, nothing to read since
        assert not stream.stalled(120, time.monotonic())
        stream.push(GenerationChunk(request_id="r1", text="a", token_ids=[1]))
        assert not stream.stalled(120, time.monotonic())  # just arrived
        assert stream.stalled(120, time.monotonic() + 121)  # unread for longer than the limit
    finally:
        loop.close()
