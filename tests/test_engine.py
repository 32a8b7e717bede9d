"""The in-process engine on the tiny demo model: batching, sampling, stops, cancellation, failures."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import (
    DeadlineExceededError, EngineFailureError, InvalidRequestError, ModelNotFoundError, OverCapacityError,
)
from engine.request import ChatMessage, GenerationChunk

PROMPTS = [
    "The lighthouse keeper counted the ships",
    "What is the capital of France?",
    "x",
    "Continuous batching lets new requests join the running batch between decode steps, and lets finished requests leave",
    "def add(a, b): return a + b",
    "Weather report for the week. Monday will be sunny",
    "0 1 2 3 4 5",
    "A short story.",
]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def req(model: str, prompt: str, max_tokens: int = 24, **sampling: Any) -> dict[str, Any]:
    sampling.setdefault("temperature", 0.0)
    return {"model": model, "prompt": prompt, "sampling": {"max_tokens": max_tokens, **sampling}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    e = Engine(EngineConfig(max_batch_size=32))
    run(e.load_model("tiny", str(tiny_model_dir)))
    yield e
    run(e.shutdown(drain_timeout_s=1))


def eos_id(engine: Engine) -> int:
    return next(iter(engine._model("tiny").eos_ids))


def test_engine_package_never_imports_ray() -> None:
    code = "import engine, engine.engine, engine.demo, sys; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_output_is_identical_alone_and_in_a_batch(engine: Engine, batch: int) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(batch)]
    lengths = [8 + 5 * (i % 4) for i in range(batch)]

    async def go() -> tuple[list[GenerationChunk], list[GenerationChunk]]:
        alone = [await engine.complete(req("tiny", p, n)) for p, n in zip(prompts, lengths)]
        together = await asyncio.gather(*[engine.complete(req("tiny", p, n)) for p, n in zip(prompts, lengths)])
        return alone, together

    alone, together = run(go())
    for a, t, n in zip(alone, together, lengths):
        assert a.token_ids == t.token_ids
        assert a.text == t.text
        assert len(a.token_ids) <= n
    if batch > 1:
        assert len({tuple(a.token_ids) for a in alone}) > 1, "different prompts should give different outputs"


def test_same_seed_same_output_whatever_shares_the_batch(engine: Engine) -> None:
    sampled = dict(temperature=1.0, top_p=0.95, seed=1234)

    async def go() -> tuple[GenerationChunk, list[GenerationChunk], GenerationChunk]:
        alone = await engine.complete(req("tiny", PROMPTS[0], 32, **sampled))
        crowd = [req("tiny", p, 32, temperature=1.0) for p in PROMPTS]
        crowd.insert(3, req("tiny", PROMPTS[0], 32, **sampled))
        together = await asyncio.gather(*[engine.complete(r) for r in crowd])
        other_seed = await engine.complete(req("tiny", PROMPTS[0], 32, temperature=1.0, top_p=0.95, seed=99))
        return alone, together, other_seed

    alone, together, other = run(go())
    assert together[3].token_ids == alone.token_ids
    assert other.token_ids != alone.token_ids
    greedy = run(engine.complete(req("tiny", PROMPTS[0], 32)))
    assert greedy.token_ids != alone.token_ids, "sampling at temperature 1 should differ from greedy"


def test_stop_string_split_across_tokens_is_cut_and_never_emitted(engine: Engine) -> None:
    tok = engine._model("tiny").tokenizer
    no_eos = {eos_id(engine): -100.0}
    full = run(engine.complete(req("tiny", PROMPTS[1], 40, logit_bias=no_eos)))
    pieces = [tok.decode([t]) for t in full.token_ids]
    k = next(i for i in range(5, len(pieces) - 1)
             if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2 and pieces[i].isprintable() and pieces[i + 1].isprintable())
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = full.text[: full.text.find(stop)]

    async def stream() -> list[GenerationChunk]:
        return [c async for c in engine.generate(req("tiny", PROMPTS[1], 40, logit_bias=no_eos, stop=["zzzz-never", stop]))]

    chunks = run(stream())
    text = "".join(c.text for c in chunks)
    assert text == expected
    assert stop not in text and not any(stop in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"


def test_max_tokens_gives_finish_reason_length(engine: Engine) -> None:
    out = run(engine.complete(req("tiny", PROMPTS[2], 17, logit_bias={eos_id(engine): -100.0})))
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == 17 == len(out.token_ids)


def test_streamed_text_equals_decoding_all_tokens(engine: Engine) -> None:
    async def go() -> list[GenerationChunk]:
        return [c async for c in engine.generate(req("tiny", PROMPTS[5], 60, temperature=1.0, seed=5))]

    chunks = run(go())
    ids = [t for c in chunks for t in c.token_ids]
    eos = engine._model("tiny").eos_ids
    expected = engine.detokenize("tiny", [t for t in ids if t not in eos])
    assert "".join(c.text for c in chunks).strip() == expected.strip()
    for c in chunks:
        c.text.encode("utf-8")  # no lone surrogates


def test_logprobs_and_top_logprobs(engine: Engine) -> None:
    out = run(engine.complete(req("tiny", PROMPTS[0], 6, logprobs=True, top_logprobs=3)))
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tid and lp.logprob <= 0.0
        assert len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token_id == tid  # greedy picks the most likely token
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob


def test_64_concurrent_requests_complete_with_correct_usage(engine: Engine) -> None:
    prompts = [f"{PROMPTS[i % 8]} {i}" for i in range(64)]

    async def go() -> list[GenerationChunk]:
        return await asyncio.gather(*[engine.complete(req("tiny", p, 10 + i % 7, temperature=0.7)) for i, p in enumerate(prompts)])

    outs = run(go())
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert out.usage.prompt_tokens == len(engine.tokenize("tiny", p))
        assert out.usage.completion_tokens == len(out.token_ids) <= 10 + i % 7
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        assert out.finish_reason in ("stop", "length")
    assert engine.health().active == 0 and engine.open_streams == 0


@pytest.mark.parametrize("bad, code", [
    ({"sampling": {"temperature": -1}}, "invalid_request"),
    ({"sampling": {"max_tokens": -1}}, "invalid_request"),  # 0 means: score the prompt, generate nothing
    ({"sampling": {"top_p": 0}}, "invalid_request"),
    ({"sampling": {"logit_bias": {5000: 1.0}}}, "token_id_out_of_range"),
    ({"sampling": {"max_tokens": 100000}}, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "invalid_request"),  # prompt and messages both
    ({"prompt_token_ids": None, "prompt": ""}, "invalid_request"),
    ({"sampling": {"stop": [""]}}, "invalid_request"),
    ({"sampling": {"no_such_knob": 1}}, "invalid_request"),
])
def test_invalid_parameters_are_rejected_with_a_code(engine: Engine, bad: dict, code: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": "hello", **bad}
    if "sampling" in bad:
        body["sampling"] = bad["sampling"]

    async def go() -> None:
        async for _ in engine.generate(body):
            pass

    with pytest.raises(InvalidRequestError) as info:
        run(go())
    assert info.value.code == code
    assert engine.health().active == 0


def test_unknown_model_is_model_not_found(engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        run(engine.complete(req("nope", "hi")))
    assert info.value.code == "model_not_found" and info.value.kind == "not_found"


def test_deadline_exceeded(engine: Engine) -> None:
    body = req("tiny", PROMPTS[0], 3000, logit_bias={eos_id(engine): -100.0})
    body["timeout_s"] = 0.05
    with pytest.raises(DeadlineExceededError):
        run(engine.complete(body))
    assert engine.health().active == 0


def test_slow_consumer_is_coalesced_not_buffered_without_bound(engine: Engine) -> None:
    async def go() -> tuple[int, str, str]:
        body = req("tiny", PROMPTS[3], 200, logit_bias={eos_id(engine): -100.0})
        gen = engine.generate(body)
        first = await gen.__anext__()
        stream = engine._registry.get(body["request_id"]) if "request_id" in body else None
        await asyncio.sleep(1.0)  # the engine keeps generating while we do not read
        backlog = max((s.backlog() for s in engine._registry.snapshot()), default=0)
        rest = [c async for c in gen]
        text = first.text + "".join(c.text for c in rest)
        alone = await engine.complete(body)
        return backlog, text, alone.text

    backlog, text, alone = run(go())
    assert backlog <= engine.config.stream_buffer_items
    assert text == alone


def test_a_lagging_consumers_tokens_are_appended_never_copied_on_the_gpu_thread() -> None:
    """Past the buffer's entries, each token joins a run (the very chunk objects, no text copied);
    the reader gets everything in order as one chunk, logprobs and the final usage included."""
    from engine.request import GenerationChunk, TokenLogprob, Usage
    from engine.streams import RequestStream, _Run

    async def go() -> tuple[RequestStream, list[GenerationChunk], GenerationChunk]:
        stream = RequestStream("r", asyncio.get_running_loop(), max_items=2)
        pushed = [GenerationChunk(request_id="r", text=f"t{i} ", token_ids=[i],
                                  logprobs=[TokenLogprob(token_id=i, token=f"t{i}", logprob=-0.5)])
                  for i in range(1000)]
        pushed.append(GenerationChunk(request_id="r", finish_reason="length", usage=Usage(completion_tokens=1000)))
        for c in pushed:
            stream.push(c)
        return stream, pushed, await stream.next()

    stream, pushed, got = run(go())
    assert stream.backlog() == 0
    assert got.text == "".join(f"t{i} " for i in range(1000)) and got.token_ids == list(range(1000))
    assert [lp.token_id for lp in got.logprobs or []] == list(range(1000))
    assert got.finish_reason == "length" and got.usage is not None and got.usage.completion_tokens == 1000

    async def lagging() -> list[object]:
        stream = RequestStream("r", asyncio.get_running_loop(), max_items=2)
        for c in pushed[:500]:
            stream.push(c)
        return list(stream._items)

    items = run(lagging())
    assert len(items) == 2 and items[0] is pushed[0]
    assert isinstance(items[1], _Run) and all(a is b for a, b in zip(items[1], pushed[1:500], strict=True))


def test_plain_tokens_are_queued_bare_and_read_as_one_chunk_of_their_choice() -> None:
    """The GPU thread queues a plain token as (text, id); a read joins them, with the chunks around
    them, into one chunk carrying the request's id and the choice's index."""
    from engine.request import GenerationChunk, Usage
    from engine.streams import RequestStream

    async def go() -> tuple[GenerationChunk, list[object]]:
        stream = RequestStream("r/1", asyncio.get_running_loop(), max_items=2, chunk_id="r", index=1)
        stream.push(GenerationChunk(request_id="r", text="a", token_ids=[1], index=1, prompt_text="p"))
        for i in range(2, 40):
            stream.push_token(f"t{i}", i)
        items = list(stream._items)
        stream.push(GenerationChunk(request_id="r", text="z", token_ids=[40], index=1, finish_reason="stop",
                                    usage=Usage(completion_tokens=40)))
        return await stream.next(), items

    got, items = run(go())
    assert len(items) == 2 and items[0].prompt_text == "p" and items[1][0] == ("t2", 2)  # type: ignore[attr-defined]
    assert got.request_id == "r" and got.index == 1 and got.prompt_text == "p"
    assert got.text == "a" + "".join(f"t{i}" for i in range(2, 40)) + "z"
    assert got.token_ids == list(range(1, 41)) and got.finish_reason == "stop" and got.usage.completion_tokens == 40


def test_a_pause_ends_when_the_last_chunk_comes() -> None:
    """A consumer letting tokens gather (stream_interval_ms) is woken by the final chunk, not by its timer."""
    from engine.request import GenerationChunk
    from engine.streams import RequestStream

    async def go() -> GenerationChunk:
        stream = RequestStream("r", asyncio.get_running_loop(), max_items=8)
        stream.push(GenerationChunk(request_id="r", text="a", token_ids=[1]))
        await stream.next()
        pausing = asyncio.ensure_future(stream.pause(3600))
        await asyncio.sleep(0)
        threading.Thread(target=lambda: (stream.push_token("b", 2), stream.push(
            GenerationChunk(request_id="r", text="c", token_ids=[3], finish_reason="length")))).start()
        await asyncio.wait_for(pausing, 30)  # an hour's timer: only the last chunk can end it
        return await stream.next()

    got = run(go())
    assert got.text == "bc" and got.token_ids == [2, 3] and got.finish_reason == "length"


def test_a_stream_interval_sends_fewer_chunks_with_the_same_output(tiny_model_dir: Path) -> None:
    paced = Engine(EngineConfig(warmup=False, prompt_cache_gb=0, stream_interval_ms=200))
    plain = Engine(EngineConfig(warmup=False, prompt_cache_gb=0))

    async def chunks(e: Engine) -> tuple[list[GenerationChunk], float]:
        await e.load_model("tiny", str(tiny_model_dir))
        t0 = time.monotonic()
        out = [c async for c in e.generate(req("tiny", PROMPTS[2], 64, logit_bias={eos_id(e): -100.0}))]
        return out, time.monotonic() - t0

    try:
        (got, took), (want, _) = run(chunks(paced)), run(chunks(plain))
    finally:
        run(paced.shutdown(1))
        run(plain.shutdown(1))
    assert "".join(c.text for c in got) == "".join(c.text for c in want)
    assert [t for c in got for t in c.token_ids] == [t for c in want for t in c.token_ids]
    assert len(got[0].token_ids) == 1  # the first token never waits
    assert got[-1].usage.completion_tokens == 64
    assert len(got) <= 2 + took / 0.2  # the first read, one per 200 ms, and the final chunk


def test_cancelling_a_consumer_frees_its_slot(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(max_batch_size=2, warmup=False))

    async def go() -> None:
        await e.load_model("tiny", str(tiny_model_dir))
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        long = [e.generate(req("tiny", PROMPTS[i], 3000, logit_bias=no_eos)) for i in range(2)]
        for g in long:
            await g.__anext__()
        third = asyncio.ensure_future(e.complete(req("tiny", PROMPTS[2], 5, logit_bias=no_eos)))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if e.health().waiting == 1:
                break
        h = e.health()
        assert (h.active, h.waiting) == (2, 1)
        await long[0].aclose()
        out = await asyncio.wait_for(third, 30)
        assert out.usage.completion_tokens == 5
        assert e.health().active == 1
        await long[1].aclose()
        for _ in range(100):
            if e.health().active == 0:
                break
            await asyncio.sleep(0.02)
        assert e.health().active == 0

    run(go())
    run(e.shutdown(1))


def test_admission_window_holds_a_lone_prompt_but_admits_a_full_prefill_group(tiny_model_dir: Path) -> None:
    """While others decode, a prefill group of prompts joins at once, and so does a lone interactive
    prompt beside batch work; a lone prompt otherwise waits for company."""
    e = Engine(EngineConfig(prefill_batch_size=4, admission_window_ms=10_000, warmup=False, prompt_cache_gb=0))

    async def go() -> None:
        await e.load_model("tiny", str(tiny_model_dir))
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        done: list[str] = []

        async def run_one(tag: str, max_tokens: int, priority: str = "batch") -> None:
            body = req("tiny", f"request {tag}", max_tokens=max_tokens, logit_bias=no_eos)
            body["priority"] = priority
            await e.complete(body)
            done.append(tag)

        long = asyncio.create_task(run_one("long", 400))
        while e.health().active == 0:
            await asyncio.sleep(0.001)
        await asyncio.gather(*(run_one(f"group{i}", 2) for i in range(4)))
        assert sorted(done) == [f"group{i}" for i in range(4)]
        assert e.health().active == 1  # the long request still decodes: the group did not wait for it
        await run_one("interactive", 2, "interactive")
        assert e.health().active == 1  # an interactive prompt is never held for a group
        await asyncio.gather(long, run_one("lone", 2))
        assert done[-2:] == ["long", "lone"]  # held (window 10 s) until the batch emptied
        # With only interactive work (every request's default) there is no one to overtake: held too.
        chat = asyncio.create_task(run_one("chat-long", 200, "interactive"))
        while e.health().active == 0:
            await asyncio.sleep(0.001)
        await asyncio.gather(chat, run_one("chat-lone", 2, "interactive"))
        assert done[-2:] == ["chat-long", "chat-lone"]

    try:
        run(go())
    finally:
        run(e.shutdown(drain_timeout_s=1))




def test_interactive_prompts_are_prefilled_before_queued_batch_prompts(tiny_model_dir: Path) -> None:
    """In the batch's prefill queue an interactive prompt goes ahead of batch ones (behind earlier
    interactive ones), so it never waits for a row of batch prompts' prefill chunks."""
    from mlx_lm.utils import load

    from engine.batch import TextBatch

    model, _ = load(str(tiny_model_dir))
    batch = TextBatch(model, [0], max_batch_size=8, prefill_batch_size=1, prefill_step_size=64)
    try:
        a, b = (batch.insert([5, 6, 7], 2, None, []) for _ in range(2))
        i1 = batch.insert([5, 6, 8], 2, None, [], first=True)
        c = batch.insert([5, 6, 9], 2, None, [])
        i2 = batch.insert([5, 6, 10], 2, None, [], first=True)
        assert [q[0] for q in batch._gen._unprocessed_sequences] == [i1, i2, a, b, c]
        batch.step()  # one prompt at a time (prefill_batch_size 1): the first interactive one
        assert batch._gen._prompt_batch.uids == [i1] or i1 in batch._gen._generation_batch.uids
    finally:
        batch.close()


def test_an_interactive_prompt_under_load_gets_its_first_token_from_a_prefill_of_its_own(tiny_model_dir: Path) -> None:
    """While batch-priority sequences decode, an interactive prompt is prefilled alone and its first
    token sent at once; then it joins the batch. What it says (tokens, logprobs, the finish) is what the
    batch path says for the same request; with nothing decoding, or only interactive work, it takes the
    batch path."""
    e = Engine(EngineConfig(max_batch_size=4, warmup=False))

    async def go() -> list[tuple[Any, ...]]:
        await e.load_model("tiny", str(tiny_model_dir))
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        alone = await e.complete(req("tiny", PROMPTS[2], 12, logprobs=True, top_logprobs=2))
        assert e._scheduler.first_tokens_alone == 0  # nothing else decoding: the solo lane
        peer = asyncio.ensure_future(e.complete(req("tiny", PROMPTS[0], 2000, logit_bias=no_eos)))
        while e.health().active == 0:
            await asyncio.sleep(0.01)
        await e.complete(req("tiny", PROMPTS[2], 3))
        assert e._scheduler.first_tokens_alone == 0  # beside interactive work only: the batch path
        peer.cancel()
        batch_work = req("tiny", PROMPTS[1], 2000, logit_bias=no_eos)
        batch_work["priority"] = "batch"
        blocker = asyncio.ensure_future(e.complete(batch_work))
        while e.health().active < 1 or not any(s.request.priority == "batch" for s in e._model("tiny").active()):
            await asyncio.sleep(0.01)
        out = []
        for priority in ("interactive", "batch"):
            body = req("tiny", PROMPTS[2], 12, logprobs=True, top_logprobs=2)
            body["priority"] = priority
            out.append(await e.complete(body))
        assert e._scheduler.first_tokens_alone == 1  # the interactive one only
        blocker.cancel()
        return [(c.token_ids, c.text, c.finish_reason, [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs or []],
                 c.usage.completion_tokens if c.usage else None) for c in (*out, alone)]

    try:
        interactive, batch, alone = run(go())
    finally:
        run(e.shutdown(1))
    assert interactive == batch == alone and len(interactive[0]) == 12


def test_interactive_requests_are_admitted_before_batch_ones(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(max_batch_size=1, warmup=False))
    order: list[str] = []

    async def one(name: str, priority: str) -> None:
        body = req("tiny", PROMPTS[0], 4)
        body["priority"] = priority
        await e.complete(body)
        order.append(name)

    async def go() -> None:
        await e.load_model("tiny", str(tiny_model_dir))
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        blocker = asyncio.ensure_future(e.complete(req("tiny", PROMPTS[1], 300, logit_bias=no_eos)))
        while e.health().active == 0:
            await asyncio.sleep(0.01)
        tasks = [asyncio.ensure_future(one("batch-1", "batch")), asyncio.ensure_future(one("batch-2", "batch"))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(one("interactive", "interactive")))
        await asyncio.gather(blocker, *tasks)

    run(go())
    run(e.shutdown(1))
    assert order[0] == "interactive"


def test_gpu_thread_death_reaches_every_waiter(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(max_batch_size=2, warmup=False))

    class Fatal(BaseException):
        pass

    async def go() -> list[BaseException | GenerationChunk]:
        await e.load_model("tiny", str(tiny_model_dir))
        batch = e._model("tiny").batch
        real_step = batch.step
        calls = {"n": 0}

        def dying_step():  # a fault we cannot cause for real: the thread itself blowing up
            calls["n"] += 1
            if calls["n"] > 3:
                raise Fatal("boom")
            return real_step()

        batch.step = dying_step
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        results = await asyncio.wait_for(asyncio.gather(
            *[e.complete(req("tiny", p, 500, logit_bias=no_eos)) for p in PROMPTS[:5]], return_exceptions=True), 30)
        return results

    results = run(go())
    assert all(isinstance(r, EngineFailureError) for r in results), results
    h = e.health()
    assert not h.alive and not h.healthy
    with pytest.raises(EngineFailureError):
        run(e.complete(req("tiny", "again")))


def test_a_failing_step_fails_its_batch_but_the_engine_keeps_serving(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))

    async def go() -> tuple[list, GenerationChunk]:
        await e.load_model("tiny", str(tiny_model_dir))
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        gens = [e.generate(req("tiny", p, 500, logit_bias=no_eos)) for p in PROMPTS[:3]]
        for g in gens:  # all three are running in one batch before the fault
            await g.__anext__()

        def oom():
            raise RuntimeError("[metal::malloc] Attempting to allocate more than the maximum")

        e._model("tiny").batch.step = oom

        async def drain(g) -> None:
            async for _ in g:
                pass

        failed = await asyncio.gather(*[drain(g) for g in gens], return_exceptions=True)
        after = await e.complete(req("tiny", PROMPTS[0]))
        return failed, after

    failed, after = run(go())
    assert all(isinstance(f, EngineFailureError) for f in failed)
    assert after.finish_reason in ("stop", "length") and after.token_ids
    assert e.health().healthy
    run(e.shutdown(1))


def test_two_models_serve_concurrently(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))

    async def go() -> None:
        await asyncio.gather(e.load_model("a", str(tiny_model_dir)), e.load_model("b", str(tiny_model_dir)))
        assert sorted(m.name for m in e.list_models()) == ["a", "b"]
        solo = [await e.complete(req(m, PROMPTS[i], 12)) for i, m in enumerate("ab")]
        both = await asyncio.gather(*[e.complete(req(m, PROMPTS[i], 12)) for i, m in enumerate("ab") for _ in range(4)])
        assert [c.token_ids for c in both] == [solo[0].token_ids] * 4 + [solo[1].token_ids] * 4

    run(go())
    run(e.shutdown(1))


def test_loading_one_model_twice_at_once_loads_it_once(tiny_model_dir: Path) -> None:
    e = Engine(EngineConfig(warmup=False))
    async def go() -> list:
        return await asyncio.gather(*[e.load_model("m", str(tiny_model_dir)) for _ in range(4)])

    infos = run(go())
    assert len({i.loaded_at for i in infos}) == 1
    assert len(e.list_models()) == 1
    run(e.shutdown(1))


def test_lru_unload_under_a_small_memory_budget(tiny_model_dir: Path) -> None:
    size = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    e = Engine(EngineConfig(memory_budget_gb=2.5 * size / 1e9, warmup=False))

    async def go() -> None:
        await e.load_model("a", str(tiny_model_dir))
        await e.load_model("b", str(tiny_model_dir))
        await e.complete(req("a", "touch a so that b is the least recently used"))
        await e.load_model("c", str(tiny_model_dir))
        assert sorted(m.name for m in e.list_models()) == ["a", "c"]
        with pytest.raises(ModelNotFoundError):
            await e.complete(req("b", "gone"))
        # a model with work in flight is never evicted: with both busy, a new load is refused
        no_eos = {next(iter(e._model("a").eos_ids)): -100.0}
        busy = [e.generate(req(m, "busy", 2000, logit_bias=no_eos)) for m in ("a", "c")]
        for g in busy:
            await g.__anext__()
        with pytest.raises(OverCapacityError):
            await e.load_model("d", str(tiny_model_dir))
        for g in busy:
            await g.aclose()

    run(go())
    run(e.shutdown(1))


def test_prefix_cache_reuses_a_shared_system_prompt(tiny_model_dir: Path) -> None:
    system = " ".join(PROMPTS) * 3
    cached = Engine(EngineConfig(warmup=False, prompt_cache_gb=0.1))
    plain = Engine(EngineConfig(warmup=False, prompt_cache_gb=0))

    def chat(user: str) -> dict[str, Any]:
        return {"model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "sampling": {"max_tokens": 12, "temperature": 0.0}}

    async def go() -> None:
        for e in (cached, plain):
            await e.load_model("tiny", str(tiny_model_dir))
        first = await cached.complete(chat("What is the capital of France?"))
        assert first.usage.cached_tokens == 0
        second = await cached.complete(chat("How many days are in a week?"))
        prompt_len = second.usage.prompt_tokens
        a, b = (cached.tokenize("tiny", messages=[ChatMessage.model_validate(m) for m in chat(u)["messages"]])
                for u in ("What is the capital of France?", "How many days are in a week?"))
        shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert shared > 200  # the long system prompt
        assert second.usage.cached_tokens == shared  # everything before the second user message came from the cache
        again = await cached.complete(chat("How many days are in a week?"))
        assert again.usage.cached_tokens == prompt_len - 1  # exact prompt hit: one token left to prefill
        for req_out, user in ((second, "How many days are in a week?"), (first, "What is the capital of France?")):
            reference = await plain.complete(chat(user))
            assert reference.usage.cached_tokens == 0
            assert req_out.token_ids == reference.token_ids
        assert again.token_ids == second.token_ids

    asyncio.run(go())
    for e in (cached, plain):
        asyncio.run(e.shutdown(1))


def test_draft_model_greedy_output_is_identical_and_acceptance_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    from engine.demo import make_demo_model

    other_seed_dir = make_demo_model(tmp_path / "draft", "tiny", seed=7)
    # The draft is the same tiny model: every draft token is accepted, and output must not change.
    spec = Engine(EngineConfig(warmup=False, num_draft_tokens=3, prompt_cache_gb=0))
    plain = Engine(EngineConfig(warmup=False, prompt_cache_gb=0))

    async def go() -> None:
        await spec.load_model("tiny", str(tiny_model_dir), draft_source=str(tiny_model_dir))
        await plain.load_model("tiny", str(tiny_model_dir))
        bias = {next(iter(plain._model("tiny").eos_ids)): -100.0}
        for i, prompt in enumerate(PROMPTS[:4]):
            a = await spec.complete(req("tiny", prompt, 20 + i, logit_bias=bias))
            b = await plain.complete(req("tiny", prompt, 20 + i, logit_bias=bias))
            assert a.token_ids == b.token_ids and a.text == b.text
            assert a.finish_reason == b.finish_reason == "length"
            assert a.usage.completion_tokens == 20 + i
            assert a.usage.draft_tokens and a.usage.accepted_draft_tokens == a.usage.draft_tokens
            assert b.usage.draft_tokens is None
        # speculative and batched requests together: both lanes make progress and stay correct
        off = req("tiny", PROMPTS[5], 16)
        off["num_draft_tokens"] = 0
        mixed = await asyncio.gather(spec.complete(req("tiny", PROMPTS[4], 16)), spec.complete(off))
        solo = [await plain.complete(req("tiny", PROMPTS[4], 16)), await plain.complete(req("tiny", PROMPTS[5], 16))]
        assert [x.token_ids for x in mixed] == [x.token_ids for x in solo]
        assert mixed[0].usage.draft_tokens and mixed[1].usage.draft_tokens is None
        # a draft with other weights: drafts get rejected, and greedy output still must not change
        other = Engine(EngineConfig(warmup=False, num_draft_tokens=4, prompt_cache_gb=0))
        await other.load_model("tiny", str(tiny_model_dir), draft_source=str(other_seed_dir))
        for prompt in PROMPTS[:3]:
            a = await other.complete(req("tiny", prompt, 24, logit_bias=bias))
            b = await plain.complete(req("tiny", prompt, 24, logit_bias=bias))
            assert a.token_ids == b.token_ids
            assert a.usage.accepted_draft_tokens < a.usage.draft_tokens
        await other.shutdown(1)
        with pytest.raises(InvalidRequestError):
            too_many = req("tiny", "x", 4)
            too_many["num_draft_tokens"] = 50
            await spec.complete(too_many)

    asyncio.run(go())
    for e in (spec, plain):
        asyncio.run(e.shutdown(1))


def test_a_lone_request_decodes_alone_and_joins_the_batch_when_another_comes(tiny_model_dir: Path) -> None:
    """The solo lane (engine.solo): a request with nothing beside it decodes on its own; when a second
    one is admitted it moves into the batch mid-answer. Each says exactly what it says alone (greedy,
    and seeded sampling with logit_bias and a repetition penalty): no token lost, doubled or changed.
    A greedy answer is the same with and without logprobs."""
    e = Engine(EngineConfig(max_batch_size=4, warmup=False, prompt_cache_gb=0))

    async def go() -> None:
        await e.load_model("tiny", str(tiny_model_dir))
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        first = req("tiny", PROMPTS[0], 120, logit_bias=no_eos, logprobs=True, repetition_penalty=1.2)
        sampled = req("tiny", PROMPTS[3], 40, temperature=1.0, seed=11, repetition_penalty=1.3, logit_bias=no_eos)
        alone = [await e.complete(first), await e.complete(sampled)]
        assert e._scheduler.solo_started == 2 and e._scheduler.solo_handovers == 0

        long = asyncio.ensure_future(e.complete(first))
        while not e._model("tiny").solo:
            await asyncio.sleep(0.001)
        for _ in range(20):  # let it decode a few tokens alone
            await asyncio.sleep(0.002)
        beside = await e.complete(sampled)
        together = [await long, beside]
        assert e._scheduler.solo_handovers == 1 and e._scheduler.solo_started == 3
        for a, b in zip(alone, together):
            assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert [round(x.logprob, 4) for x in together[0].logprobs] == [round(x.logprob, 4) for x in alone[0].logprobs]
        assert together[0].usage.completion_tokens == 120

        # Greedy without logprobs takes the argmax of the raw logits: the same answer, no logprobs.
        bare = await e.complete(req("tiny", PROMPTS[1], 60, logit_bias=no_eos))
        scored = await e.complete(req("tiny", PROMPTS[1], 60, logit_bias=no_eos, logprobs=True))
        assert e._scheduler.solo_started == 5
        assert bare.token_ids == scored.token_ids and len(bare.token_ids) == 60
        assert bare.logprobs is None and len(scored.logprobs) == 60

        # A solo sequence whose consumer goes away is cancelled once, and its lane is free again.
        before = e._scheduler.cancelled_total
        stream = e.generate(first)
        await stream.__anext__()
        while not e._model("tiny").solo:  # the lane opens just after the first token leaves
            await asyncio.sleep(0.001)
        await stream.aclose()
        for _ in range(200):
            if e.health().active == 0:
                break
            await asyncio.sleep(0.01)
        assert e.health().active == 0 and not e._model("tiny").solo
        assert e._scheduler.cancelled_total == before + 1

    try:
        run(go())
    finally:
        run(e.shutdown(1))


def test_prefill_and_the_solo_lane_hand_mlx_buffers_back_as_mlx_lm_does(tiny_model_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """MLX's buffer cache goes back after each prefill chunk and every 256 tokens of a lone answer, as
    in mlx-lm's generate_step; a server that never clears it keeps every buffer size it ever used."""
    import mlx.core as mx

    from engine.solo import CLEAR_CACHE_EVERY

    e = Engine(EngineConfig(warmup=False, prompt_cache_gb=0))
    calls = 0
    clear = mx.clear_cache

    def counted() -> None:
        nonlocal calls
        calls += 1
        clear()

    async def go() -> None:
        await e.load_model("tiny", str(tiny_model_dir))
        monkeypatch.setattr(mx, "clear_cache", counted)
        no_eos = {next(iter(e._model("tiny").eos_ids)): -100.0}
        out = await e.complete(req("tiny", PROMPTS[0], 2 * CLEAR_CACHE_EVERY + 10, logit_bias=no_eos))
        assert out.usage.completion_tokens == 2 * CLEAR_CACHE_EVERY + 10
        assert e._scheduler.solo_started == 1

    try:
        run(go())
    finally:
        run(e.shutdown(1))
    assert calls == 1 + 2  # the prompt's one prefill chunk, then tokens 256 and 512


def test_switch_interval_is_set_while_the_gpu_thread_runs_and_restored_after(tiny_model_dir: Path) -> None:
    before = sys.getswitchinterval()
    e = Engine(EngineConfig(warmup=False, switch_interval_ms=0.5))
    try:
        run(e.load_model("tiny", str(tiny_model_dir)))  # the GPU thread has started and looped by now
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        out = run(e.complete(req("tiny", PROMPTS[0], 8)))
        assert out.usage.completion_tokens > 0
    finally:
        run(e.shutdown(1))
    e._scheduler._thread.join(5)
    assert sys.getswitchinterval() == pytest.approx(before)
