"""Overload: drive a running server at a multiple of its capacity and check it degrades cleanly.

Capacity is measured first, in the same run: closed-loop clients, as many as the model's replicas
take at once (``--concurrency``: ``max_ongoing_requests`` times the replicas, 64 for the demo), for
``--capacity-seconds``; its completed requests per second are the capacity, and the replica's memory
after it (serving as many requests at once as it ever will) is the baseline. Then requests arrive open-loop at ``--factor`` times that rate for ``--seconds``,
fresh prompts each, half streamed. A clean overload means:

- every answer is 200, 429 or 503, and every 429 and 503 carries ``Retry-After``;
- no 500, no other status, no stream that ends in an error event, no request that hangs (each has a
  client deadline, ``--request-timeout``);
- the replica's resident memory stays within 10% of its peak while serving at capacity;
- afterwards, every request of a short sequential check is served (200).

The run is bounded in time and in count (``--max-requests``); traffic goes to the given URL only
(loopback in tests and in our runs). ``--rss`` reads the replicas' RSS through Ray (the cluster
``mlx-serving up`` started here). Writes one JSON document (``--out``).

    python loadtests/overload.py --url http://127.0.0.1:8000 --model demo --seconds 120 --factor 4 \\
        --rss --out docs/bench/overload_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

ALLOWED = {200, 429, 503}


@dataclass
class Tally:
    """What one phase's requests got back."""

    statuses: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)  # error codes of non-200 answers and stream error events
    missing_retry_after: int = 0
    stream_errors: int = 0
    hung: int = 0  # no complete answer within the client deadline
    transport_errors: Counter = field(default_factory=Counter)  # connection refused / reset: the server did not answer
    completed: int = 0  # 200 with a whole answer
    sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        d["codes"] = dict(self.codes)
        d["transport_errors"] = dict(self.transport_errors)
        return d

    @property
    def clean(self) -> bool:
        return (set(self.statuses) <= ALLOWED and not self.missing_retry_after and not self.stream_errors
                and not self.hung and not self.transport_errors)


def _prompt(rng: random.Random) -> str:
    words = ["harbour", "lantern", "granite", "meadow", "copper", "violet", "engine", "river", "signal", "ember"]
    return f"{rng.randrange(10**9)} " + " ".join(rng.choice(words) for _ in range(12))


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, stream: bool,
                      rng: random.Random, tally: Tally, timeout: float, headers: dict[str, str]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": max_tokens,
            "stream": stream}
    tally.sent += 1
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
                tally.statuses[r.status_code] += 1
                if r.status_code != 200:
                    raw = await r.aread()
                    if r.status_code in (429, 503) and "retry-after" not in r.headers:
                        tally.missing_retry_after += 1
                    try:
                        tally.codes[json.loads(raw)["error"]["code"]] += 1
                    except (ValueError, KeyError, TypeError):
                        tally.codes["<not an OpenAI error>"] += 1
                    return
                if not stream:
                    json.loads(await r.aread())["choices"][0]
                    tally.completed += 1
                    return
                async for line in r.aiter_lines():
                    if line.startswith('data: {"error"'):
                        tally.stream_errors += 1
                        tally.codes[json.loads(line[6:])["error"]["code"]] += 1
                    if line == "data: [DONE]":
                        tally.completed += 1
    except TimeoutError:
        tally.hung += 1
    except httpx.TransportError as e:
        tally.transport_errors[type(e).__name__] += 1


async def closed_loop(url: str, model: str, clients: int, seconds: float, max_tokens: int, timeout: float,
                      headers: dict[str, str], seed: int = 0) -> tuple[Tally, float]:
    """``clients`` loops, each sending its next request when the last ends: (tally, completed per second)."""
    tally = Tally()
    end = time.monotonic() + seconds
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def loop(i: int) -> None:
            await asyncio.sleep(i * 0.05)  # staggered connects: no listen backlog turns into a failure
            while time.monotonic() < end:
                await one_request(client, url, model, max_tokens, i % 2 == 0, rng, tally, timeout, headers)

        t0 = time.monotonic()
        await asyncio.gather(*[loop(i) for i in range(clients)])
        elapsed = time.monotonic() - t0
    return tally, tally.completed / elapsed


async def open_loop(url: str, model: str, rate: float, seconds: float, max_tokens: int, timeout: float,
                    headers: dict[str, str], max_requests: int, seed: int = 1) -> Tally:
    """Requests arriving at ``rate`` per second whatever the server does, for ``seconds``."""
    tally = Tally()
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = []
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < seconds and n < max_requests:
            tasks.append(asyncio.ensure_future(
                one_request(client, url, model, max_tokens, n % 2 == 0, rng, tally, timeout, headers)))
            n += 1
            await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return tally


async def recovered(url: str, model: str, headers: dict[str, str], count: int = 5) -> bool:
    """Every one of ``count`` sequential requests is served once the overload is over."""
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(count):
            r = await client.post(url + "/v1/chat/completions", headers=headers, json={
                "model": model, "messages": [{"role": "user", "content": f"after the storm {i}"}], "max_tokens": 4})
            if r.status_code != 200:
                return False
    return True


async def watched(phase: Any, rss: Callable[[], int] | None, every_s: float = 2.0) -> tuple[Any, list[tuple[float, int]]]:
    """Run ``phase`` (a coroutine) while sampling the replica's RSS: (its result, [(seconds in, bytes)])."""
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        start = time.monotonic()
        while not stop.is_set() and rss is not None:
            samples.append((round(time.monotonic() - start, 1), await asyncio.to_thread(rss)))
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass

    watcher = asyncio.ensure_future(watch())
    try:
        return await phase, samples
    finally:
        stop.set()
        await watcher


def run(url: str, model: str, *, concurrency: int, capacity_seconds: float, seconds: float, factor: float,
        max_tokens: int, request_timeout: float, max_requests: int, headers: dict[str, str] | None = None,
        rss: Callable[[], int] | None = None) -> dict[str, Any]:
    """The whole check; the returned document says ``clean`` and why not.

    Memory is judged on peaks: the replica's RSS moves by tens of MB from one moment to the next
    while it serves (transient batch and allocator memory), so the highest RSS seen under 4x
    overload is compared with the highest seen while serving at capacity, the same number of
    requests at once."""
    headers = headers or {}
    warm, _ = asyncio.run(closed_loop(url, model, 2, 3.0, max_tokens, request_timeout, headers, seed=7))
    (cap_tally, capacity), cap_rss = asyncio.run(watched(
        closed_loop(url, model, concurrency, capacity_seconds, max_tokens, request_timeout, headers), rss))
    t0 = time.monotonic()
    over, over_rss = asyncio.run(watched(open_loop(
        url, model, factor * max(capacity, 0.1), seconds, max_tokens, request_timeout, headers, max_requests), rss))
    overload_s = time.monotonic() - t0
    rss_after = rss() if rss else None
    back = asyncio.run(recovered(url, model, headers))
    baseline = max((b for _, b in cap_rss), default=None)
    peak = max([rss_after or 0, *(b for _, b in over_rss)]) if rss else None
    growth = (peak / baseline - 1.0) if baseline and peak else None
    doc = {
        "url": url, "model": model, "factor": factor, "max_tokens": max_tokens,
        "capacity": {"concurrency": concurrency, "seconds": capacity_seconds, "requests_per_s": capacity,
                     "tally": cap_tally.as_dict()},
        "overload": {"rate_per_s": factor * capacity, "seconds": overload_s, "tally": over.as_dict()},
        "rss_bytes": {"peak_at_capacity": baseline, "peak_overload_and_after": peak, "growth": growth,
                      "after_overload": rss_after, "samples_capacity": cap_rss, "samples_overload": over_rss},
        "recovered": back,
        "warmup_clean": warm.clean,
    }
    problems = []
    if not cap_tally.clean:
        problems.append("capacity phase not clean")
    if not over.clean:
        problems.append("overload phase not clean")
    if growth is not None and growth > 0.10:
        problems.append(f"replica peak RSS grew {growth:.1%}")
    if not back:
        problems.append("not every request was served after the overload")
    doc["clean"] = not problems
    doc["problems"] = problems
    return doc


def ray_rss(app: str, deployment: str) -> Callable[[], int]:
    """The largest RSS among ``deployment``'s replicas, read through the running Ray cluster."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)

    def read() -> int:
        return max(handle.info.remote().result(timeout_s=30).rss_bytes for _ in range(3))

    return read


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="demo")
    p.add_argument("--concurrency", type=int, default=64,
                   help="closed-loop clients of the capacity phase: max_ongoing_requests x replicas")
    p.add_argument("--capacity-seconds", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=120.0, help="length of the overload phase")
    p.add_argument("--factor", type=float, default=4.0, help="arrival rate as a multiple of the capacity")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--api-key", help="bearer key, when the server requires one")
    p.add_argument("--rss", action="store_true", help="watch the replicas' RSS through Ray")
    p.add_argument("--app", default="mlx-serving", help="Serve application (for --rss)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rss = None
    if args.rss:
        from cluster import fleet_cli, nodes

        state = fleet_cli.live_state()
        nodes.apply_client_env(state)  # before Ray is imported: it reads some of these settings once

        import ray

        ray.init(address=state.address if state else "auto", logging_level="ERROR")
        rss = ray_rss(args.app, "model-" + args.model)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    doc = run(args.url, args.model, concurrency=args.concurrency, capacity_seconds=args.capacity_seconds,
              seconds=args.seconds, factor=args.factor, max_tokens=args.max_tokens,
              request_timeout=args.request_timeout, max_requests=args.max_requests, headers=headers, rss=rss)
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0 if doc["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
