"""The ranks of tests/test_shard_engine.py, each run as its own process (MLX keeps the first
distributed group a process joins, so every group needs fresh processes):

    python -m tests.shard_ranks follower SOURCE SPEC_JSON
    python -m tests.shard_ranks batch SOURCE SPEC_JSON       # rank 0: a bare ShardedBatch, prints JSON
    python -m tests.shard_ranks engine SOURCE SPEC_JSON      # rank 0: the whole engine, prints JSON
    python -m tests.shard_ranks lost SOURCE SPEC_JSON PIDFILE  # rank 0: kills a follower mid-stream
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

KW = {"max_batch_size": 8, "prefill_batch_size": 4, "prefill_step_size": 64}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [100, 200, 300, 400, 500, 600, 7], [42], [3, 1, 4, 1, 5, 9, 2, 6]]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"],
          "additionalProperties": False}
REQUESTS: list[dict[str, Any]] = [
    *({"prompt": f"Request {i}: tell me about the ring.", "sampling": {"max_tokens": 24, "temperature": 0}}
      for i in range(4)),
    {"prompt": "Give me JSON:", "sampling": {"max_tokens": 40, "temperature": 0},
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
    {"prompt": "Three choices", "n": 3, "sampling": {"max_tokens": 12, "temperature": 0.9, "seed": 5}},
]


def run_batch(batch: Any) -> tuple[list[list[int]], list[list[float]]]:
    """Two prompts, two more joining after 3 steps, one removed after 6 (continuous batching): every
    sequence's tokens, and its first step's logprobs."""
    outs: dict[int, list[int]] = {}
    first: dict[int, list[float]] = {}
    uids = [batch.insert(p, 20, None, []) for p in PROMPTS[:2]]
    steps = 0
    while len(batch):
        for r in batch.step():
            outs.setdefault(r.uid, []).append(r.token)
            if r.uid not in first:
                first[r.uid] = r.logprobs.tolist()
        steps += 1
        if steps == 3:
            uids += [batch.insert(p, 20, None, []) for p in PROMPTS[2:]]
        if steps == 6:
            batch.remove([uids[1]])
    return [outs.get(u, []) for u in uids], [first.get(u, []) for u in uids]


async def serve(engine: Any) -> dict[str, Any]:
    """Concurrent greedy requests, structured output, n seeded choices, a stop string, a cancelled
    stream, and a request after it."""
    outs = await asyncio.gather(*[engine.complete_all({"model": "m", **r}) for r in REQUESTS])
    stopper = outs[0][0].text[4:8]
    stopped = await engine.complete({"model": "m", "prompt": REQUESTS[0]["prompt"],
                                     "sampling": {**REQUESTS[0]["sampling"], "stop": [stopper]}})
    gen = engine.generate({"model": "m", "prompt": "cancel me", "sampling": {"max_tokens": 400, "temperature": 0}})
    async for _ in gen:
        break
    await gen.aclose()
    after = await engine.complete({"model": "m", **REQUESTS[1]})
    return {"tokens": [[c.token_ids for c in o] for o in outs], "texts": [[c.text for c in o] for o in outs],
            "stopper": stopper, "stopped": stopped.text, "after": after.token_ids}


async def engine_rank0(source: str, spec: Any) -> dict[str, Any]:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.errors import InvalidRequestError

    engine = Engine(EngineConfig(shard=spec, **KW))
    info = await engine.load_model("m", source)
    refused = None
    try:
        await engine.complete({"model": "m", "prompt": "x", "prompt_logprobs": 1, "sampling": {"max_tokens": 1}})
    except InvalidRequestError as e:
        refused = e.code
    out = await serve(engine)
    await engine.unload_model("m")
    await engine.shutdown(5)
    return {**out, "shard": info.shard, "prompt_logprobs": refused}


async def lost_rank0(source: str, spec: Any, pidfile: str) -> dict[str, Any]:
    from engine.config import EngineConfig
    from engine.engine import Engine

    engine = Engine(EngineConfig(shard=spec, **KW))
    await engine.load_model("m", source)
    died: list[str] = []
    engine.on_death(lambda e: died.append(type(e).__name__))
    events: list[str] = []
    try:
        async for _ in engine.generate({"model": "m", "prompt": "long", "sampling": {"max_tokens": 4000, "temperature": 0}}):
            events.append("token")
            if len(events) == 3:
                os.kill(int(open(pidfile).read()), signal.SIGKILL)
    except Exception as e:  # noqa: BLE001 - how the stream ends is the result
        events.append(getattr(e, "code", type(e).__name__))
    for _ in range(300):
        if died:
            break
        await asyncio.sleep(0.1)
    return {"events": events, "died": died, "alive": engine.health().alive}


def main() -> None:
    from engine.distributed import ShardSpec, Watchdog

    role, source, raw = sys.argv[1:4]
    spec = ShardSpec.model_validate_json(raw)
    if role == "follower":
        from engine.shard import follow

        follow(source, spec, Watchdog(spec.step_timeout_s, lambda what: os._exit(7)))
        print("follower stopped", flush=True)
        return
    if role == "batch":
        from engine.shard import ShardedBatch, load_sharded

        watchdog = Watchdog(spec.step_timeout_s, lambda what: os._exit(7))
        model, tok, _, group, _ = load_sharded(source, spec, watchdog)
        batch = ShardedBatch(model, sorted(tok.eos_token_ids), group=group, spec=spec, watchdog=watchdog, **KW)
        tokens, first = run_batch(batch)
        batch.close()
        result: dict[str, Any] = {"tokens": tokens, "first": first}
    elif role == "engine":
        result = asyncio.run(engine_rank0(source, spec))
    else:
        result = asyncio.run(lost_rank0(source, spec, sys.argv[4]))
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # a lost group may leave MLX's threads blocked; the result is out


if __name__ == "__main__":
    main()
