"""Locust scenarios for mlx-serving (or any OpenAI-compatible server).

Pick scenarios by user class or by tag (see loadtests/README.md)::

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --csv bench-out/chat StreamingChatUser
    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host ... --tags stream structured

    class                 tag          what it does
    StreamingChatUser     stream       streamed chat; TTFT, TPOT and tokens/s as their own rows
    ConversationUser      conversation multi-turn chats: each turn resends the growing history (the
                                       workload of prefix-aware routing); first and later turns apart
    CompletionUser        completions  non-streamed /v1/completions; tokens/s
    StructuredOutputUser  structured   chat with response_format json_schema; the JSON is checked
    VisionUser            vision       streamed chat with an image; skipped without a vision model
    CanaryUser            canary       requests to a canary route; checks the x-mlx-variant split

Besides Locust's own rows (request type POST), each streamed request fires:

    TTFT  request sent -> first content token, in ms
    TPOT  mean time per output token after the first, in ms
    TPS   completion tokens / whole request time: tokens per second (the "response time" columns of
          these rows hold tokens/s, not ms)
    VARIANT  (canary) one row per variant that answered, with that request's latency

and at the end an aggregate line (generated tokens / duration) is printed and, with ``--csv
PREFIX``, written to ``PREFIX_tokens.csv``; the canary check goes to ``PREFIX_canary.json``.

Settings (environment variables):

    MLX_LOCUST_MODEL          text model (default: the first id of GET /v1/models)
    MLX_LOCUST_MAX_TOKENS     max_tokens per request (default 64)
    MLX_LOCUST_TEMPERATURE    sampling temperature (default 0.7)
    MLX_LOCUST_LOGIT_BIAS     JSON logit_bias for every request, e.g. '{"2": -100}' to suppress EOS
    MLX_LOCUST_API_KEY        bearer key for /v1 (OPENAI_API_KEY also works)
    MLX_LOCUST_WAIT_S         think time between a user's requests (default 0: closed loop)
    MLX_LOCUST_TURNS          turns per conversation before ConversationUser starts a new one (default 6)
    MLX_LOCUST_VISION_MODEL   vision model id (default: a /v1/models id that looks like one)
    MLX_LOCUST_CANARY_ROUTE   route to test (required by CanaryUser)
    MLX_LOCUST_CANARY_WEIGHTS expected split, e.g. "stable=90,canary=10" (default: read from
                              GET /admin/rollouts with MLX_LOCUST_ADMIN_KEY)
    MLX_LOCUST_ADMIN_KEY      admin key for GET /admin/rollouts
    MLX_LOCUST_CANARY_TOLERANCE  allowed absolute share difference beyond sampling noise (default 0.03)
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any

from locust import HttpUser, constant, events, tag, task
from locust.exception import StopUser

log = logging.getLogger("mlx_locust")

MAX_TOKENS = int(os.environ.get("MLX_LOCUST_MAX_TOKENS", "64"))
TEMPERATURE = float(os.environ.get("MLX_LOCUST_TEMPERATURE", "0.7"))
API_KEY = os.environ.get("MLX_LOCUST_API_KEY") or os.environ.get("OPENAI_API_KEY")
WAIT_S = float(os.environ.get("MLX_LOCUST_WAIT_S", "0"))
TURNS = int(os.environ.get("MLX_LOCUST_TURNS", "6"))
LOGIT_BIAS = json.loads(os.environ["MLX_LOCUST_LOGIT_BIAS"]) if os.environ.get("MLX_LOCUST_LOGIT_BIAS") else None
VISION_HINTS = ("vl", "vision", "llava", "pixtral", "qwen2-vl", "phi-3-v", "phi3-v", "idefics", "paligemma")

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a rainbow forms, in three sentences.",
    "List five ideas for a weekend project with a Raspberry Pi.",
    "What are the trade-offs between trains and planes for a 500 km trip?",
    "Summarize the plot of a heist movie you would like to see.",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a quick vegetable soup.",
    "Why do cats purr? Answer briefly.",
]

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

# -- shared state (one Locust process) -------------------------------------------------------------
_lock = threading.Lock()
_models: list[str] | None = None
_warned: set[str] = set()
_tokens = {"generated": 0, "requests": 0}
_started_at: list[float] = []
_variants: Counter[str] = Counter()
_expected: dict[str, float] = {}


def warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
    print(f"[mlx-locust] {message}", flush=True)


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    h = {"x-request-id": f"locust-{uuid.uuid4().hex}"}
    if API_KEY:
        h["Authorization"] = f"Bearer {API_KEY}"
    if extra:
        h.update(extra)
    return h


def _count_tokens(n: int) -> None:
    with _lock:
        _tokens["generated"] += n
        _tokens["requests"] += 1


class OpenAIUser(HttpUser):
    """Shared plumbing: model discovery, streamed-chat measurement, custom events."""

    abstract = True
    wait_time = constant(WAIT_S)
    skipped = False

    def skip(self, key: str, message: str) -> None:
        """Stop this user quietly at its first task (StopUser from on_start logs a traceback)."""
        warn_once(key, message)
        self.skipped = True

    def ensure_running(self) -> None:
        if self.skipped:
            raise StopUser()

    def model_ids(self) -> list[str]:
        global _models
        if _models is None:
            with self.client.get("/v1/models", headers=_headers(), name="/v1/models", catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"GET /v1/models: {r.status_code} {r.text[:200]}")
                    return []
                ids = [m["id"] for m in r.json().get("data", [])]
            with _lock:
                _models = ids
        return list(_models)

    def text_model(self) -> str:
        model = os.environ.get("MLX_LOCUST_MODEL")
        if model:
            return model
        ids = [m for m in self.model_ids() if not any(h in m.lower() for h in VISION_HINTS)] or self.model_ids()
        if not ids:
            self.skip("no-model", "no model: GET /v1/models is empty or failed; set MLX_LOCUST_MODEL")
            return ""
        return ids[0]

    def body(self, model: str, **kw: Any) -> dict[str, Any]:
        b: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE}
        if LOGIT_BIAS:
            b["logit_bias"] = LOGIT_BIAS
        b.update(kw)
        return b

    def fire(self, request_type: str, name: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                             response_length=length, exception=None, context={})

    def stream_chat(self, name: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any] | None:
        """POST a streamed chat; fire TTFT / TPOT / TPS; the POST row gets the whole stream's time."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first: float | None = None
        finish_at: float | None = None
        content_chunks = 0
        usage: dict[str, Any] | None = None
        text: list[str] = []
        with self.client.post("/v1/chat/completions", json=body, headers=_headers(headers), name=name,
                              stream=True, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:300]}")
                return None
            try:
                for raw in r.iter_lines():
                    if not raw or not raw.startswith(b"data: "):
                        continue
                    data = raw[6:]
                    if data == b"[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        r.failure(f"error event: {obj['error'].get('code')}: {obj['error'].get('message')}")
                        return None
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for ch in obj.get("choices") or ():
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            content_chunks += 1
                            text.append(piece)
                            if first is None:
                                first = time.perf_counter()
                        if ch.get("finish_reason") and finish_at is None:
                            finish_at = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - a cut stream is a failed request
                r.failure(f"stream broke: {type(e).__name__}: {e}")
                return None
            end = time.perf_counter()
            r.request_meta["response_time"] = (end - t0) * 1e3  # the whole stream, not just the headers
            first = first or finish_at
            if first is None:
                r.failure("the stream ended without a token or a finish_reason")
                return None
            tokens = int(usage["completion_tokens"]) if usage else content_chunks
            r.request_meta["response_length"] = tokens
        self.fire("TTFT", name, (first - t0) * 1e3)
        if tokens > 1:
            self.fire("TPOT", name, (end - first) * 1e3 / (tokens - 1))
        if end > t0:
            self.fire("TPS", name, tokens / (end - t0), tokens)
        _count_tokens(tokens)
        return {"text": "".join(text), "tokens": tokens, "variant": r.headers.get("x-mlx-variant"),
                "seconds": end - t0}


class StreamingChatUser(OpenAIUser):
    weight = 4

    def on_start(self) -> None:
        self.model = self.text_model()

    @tag("stream", "chat")
    @task
    def streaming_chat(self) -> None:
        self.ensure_running()
        prompt = random.choice(PROMPTS)
        self.stream_chat("chat [stream]", self.body(self.model, messages=[{"role": "user", "content": prompt}]))


class ConversationUser(OpenAIUser):
    """A user in a growing conversation with a system prompt of its own, as in a chat app: each turn
    sends the whole history, so the replica that served the previous turn holds all but the new
    message in its prompt cache. TTFT rows name first and later turns apart, since only later turns
    can find their prefix cached."""

    weight = 2

    def on_start(self) -> None:
        self.model = self.text_model()
        self.history: list[dict[str, str]] = []

    def new_conversation(self) -> None:
        persona = " ".join(random.sample(PROMPTS, 4))
        self.history = [{"role": "system", "content": f"Conversation {uuid.uuid4().hex[:8]}. Stay on topic: {persona}"}]

    @tag("conversation", "chat")
    @task
    def next_turn(self) -> None:
        self.ensure_running()
        if len(self.history) < 2 or len(self.history) >= 1 + 2 * TURNS:
            self.new_conversation()
        name = "conversation [first turn]" if len(self.history) == 1 else "conversation [later turn]"
        self.history.append({"role": "user", "content": random.choice(PROMPTS)})
        out = self.stream_chat(name, self.body(self.model, messages=self.history))
        if out is None:  # a failed turn ends the conversation: the next task starts a new one
            self.history = []
            return
        self.history.append({"role": "assistant", "content": out["text"]})


class CompletionUser(OpenAIUser):
    weight = 2

    def on_start(self) -> None:
        self.model = self.text_model()

    @tag("completions")
    @task
    def completion(self) -> None:
        self.ensure_running()
        name = "completions"
        t0 = time.perf_counter()
        with self.client.post("/v1/completions", json=self.body(self.model, prompt=random.choice(PROMPTS)),
                              headers=_headers(), name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:300]}")
                return
            try:
                tokens = int(r.json()["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError) as e:
                r.failure(f"bad body: {e}")
                return
        elapsed = time.perf_counter() - t0
        self.fire("TPS", name, tokens / elapsed if elapsed > 0 else 0.0, tokens)
        _count_tokens(tokens)


class StructuredOutputUser(OpenAIUser):
    weight = 1

    def on_start(self) -> None:
        self.model = self.text_model()

    @tag("structured")
    @task
    def structured(self) -> None:
        self.ensure_running()
        body = self.body(self.model, max_tokens=max(MAX_TOKENS, 96), messages=[
            {"role": "user", "content": "Invent a person. Answer with JSON: name, age and city."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}})
        with self.client.post("/v1/chat/completions", json=body, headers=_headers(), name="structured [json_schema]",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:300]}")
                return
            choice = r.json()["choices"][0]
            if choice.get("finish_reason") == "length":
                r.failure("JSON cut off by max_tokens (raise MLX_LOCUST_MAX_TOKENS)")
                return
            try:
                obj = json.loads(choice["message"]["content"])
            except ValueError:
                r.failure(f"not JSON: {choice['message']['content'][:200]!r}")
                return
            problems = _check_person(obj)
            if problems:
                r.failure("schema violated: " + "; ".join(problems))
                return
            _count_tokens(int(r.json().get("usage", {}).get("completion_tokens", 0)))


def _check_person(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return ["not an object"]
    out = []
    if set(obj) != set(PERSON_SCHEMA["required"]):
        out.append(f"keys {sorted(obj)}")
    if not isinstance(obj.get("age"), int) or not 0 <= obj["age"] <= 120:
        out.append(f"age {obj.get('age')!r}")
    for k in ("name", "city"):
        if not isinstance(obj.get(k), str) or len(obj[k]) > 24:
            out.append(f"{k} {obj.get(k)!r}")
    return out


def _png_data_url(size: int = 64) -> str:
    """A small test image (a gradient with a square) as a data URL; Pillow if present, else 1x1."""
    try:
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (size, size))
        for x in range(size):
            for y in range(size):
                img.putpixel((x, y), (4 * x % 256, 4 * y % 256, 128))
        ImageDraw.Draw(img).rectangle([size // 4, size // 4, size // 2, size // 2], fill=(250, 30, 30))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
    except ImportError:
        data = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
    return "data:image/png;base64," + base64.b64encode(data).decode()


class VisionUser(OpenAIUser):
    weight = 1

    def on_start(self) -> None:
        ids = self.model_ids()
        wanted = os.environ.get("MLX_LOCUST_VISION_MODEL")
        if wanted and wanted not in ids:
            return self.skip("vision", f"vision scenario skipped: MLX_LOCUST_VISION_MODEL={wanted!r} is not served "
                                       f"(GET /v1/models lists {ids})")
        model = wanted or next((m for m in ids if any(h in m.lower() for h in VISION_HINTS)), None)
        if model is None:
            return self.skip("vision", f"vision scenario skipped: the server has no vision model (GET /v1/models "
                                       f"lists {ids}); serve one and/or set MLX_LOCUST_VISION_MODEL")
        self.model = model
        self.image = _png_data_url()

    @tag("vision")
    @task
    def vision_chat(self) -> None:
        self.ensure_running()
        content = [{"type": "text", "text": "Describe this image in one sentence."},
                   {"type": "image_url", "image_url": {"url": self.image}}]
        self.stream_chat("vision [stream]", self.body(self.model, messages=[{"role": "user", "content": content}]))


def parse_weights(spec: str) -> dict[str, float]:
    """``"stable=90,canary=10"`` -> shares summing to 1."""
    raw = {}
    for part in spec.split(","):
        if part.strip():
            name, _, w = part.partition("=")
            raw[name.strip()] = float(w)
    total = sum(v for v in raw.values() if v > 0)
    if total <= 0:
        raise ValueError(f"no positive weight in {spec!r}")
    return {k: max(v, 0.0) / total for k, v in raw.items()}


class CanaryUser(OpenAIUser):
    weight = 1

    def on_start(self) -> None:
        self.route = os.environ.get("MLX_LOCUST_CANARY_ROUTE")
        if not self.route:
            return self.skip("canary", "canary scenario skipped: set MLX_LOCUST_CANARY_ROUTE to a route name "
                                       "(and MLX_LOCUST_CANARY_WEIGHTS or MLX_LOCUST_ADMIN_KEY)")
        with _lock:
            have = bool(_expected)
        if not have:
            expected = self.expected_weights()
            with _lock:
                if not _expected and expected:
                    _expected.update(expected)

    def expected_weights(self) -> dict[str, float]:
        spec = os.environ.get("MLX_LOCUST_CANARY_WEIGHTS")
        if spec:
            return parse_weights(spec)
        key = os.environ.get("MLX_LOCUST_ADMIN_KEY")
        if not key:
            warn_once("canary-weights", "canary: no MLX_LOCUST_CANARY_WEIGHTS and no MLX_LOCUST_ADMIN_KEY: "
                                        "the split is reported but not checked")
            return {}
        with self.client.get("/admin/rollouts", headers={"Authorization": f"Bearer {key}"}, name="/admin/rollouts",
                             catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return {}
            route = r.json().get("routes", {}).get(self.route)
            if route is None:
                r.failure(f"no route {self.route!r} in /admin/rollouts")
                return {}
            shares = {v["name"]: float(v.get("share_percent", 0.0)) / 100.0 for v in route.get("variants", [])}
        return shares

    @tag("canary")
    @task
    def canary(self) -> None:
        self.ensure_running()
        body = self.body(self.route, max_tokens=min(MAX_TOKENS, 16),
                         messages=[{"role": "user", "content": random.choice(PROMPTS)}])
        t0 = time.perf_counter()
        # a fresh session id per request: sticky routes hash it, so the split is per request
        with self.client.post("/v1/chat/completions", json=body, name=f"canary {self.route}",
                              headers=_headers({"x-session-id": uuid.uuid4().hex}), catch_response=True) as r:
            variant = r.headers.get("x-mlx-variant")
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:300]}")
                return
            if not variant:
                r.failure("no x-mlx-variant header")
                return
        with _lock:
            _variants[variant] += 1
        self.fire("VARIANT", variant, (time.perf_counter() - t0) * 1e3)


def canary_verdict(counts: dict[str, int], expected: dict[str, float], tolerance: float) -> dict[str, Any]:
    """Observed shares against expected ones: each must lie within ``tolerance`` plus four standard
    errors of its expected share (a binomial bound: a correct split fails about 1 run in 15,000)."""
    n = sum(counts.values())
    rows = []
    ok = True
    for v in sorted(set(counts) | set(expected)):
        p = expected.get(v)
        obs = counts.get(v, 0) / n if n else 0.0
        row: dict[str, Any] = {"variant": v, "count": counts.get(v, 0), "observed": round(obs, 4)}
        if p is not None:
            bound = tolerance + 4 * math.sqrt(p * (1 - p) / n) if n else float("inf")
            row.update(expected=round(p, 4), allowed=round(bound, 4), ok=abs(obs - p) <= bound)
            ok &= row["ok"]
        elif expected:  # a variant that should get nothing answered
            row.update(expected=0.0, ok=False)
            ok = False
        rows.append(row)
    return {"requests": n, "checked": bool(expected), "ok": ok if expected and n else None, "variants": rows}


# -- hooks ----------------------------------------------------------------------------------------
@events.init.add_listener
def _select_by_tag(environment: Any, **_: Any) -> None:
    """With ``--tags``, keep only user classes that have a matching task (Locust would otherwise
    start users of the others and fail on their empty task lists)."""
    opts = environment.parsed_options
    tags = set(getattr(opts, "tags", None) or ())
    if not tags or not environment.user_classes:
        return
    keep = [c for c in environment.user_classes
            if any(getattr(t, "locust_tag_set", set()) & tags for t in c.tasks)]
    if keep:
        environment.user_classes[:] = keep


@events.test_start.add_listener
def _on_start(environment: Any, **_: Any) -> None:
    with _lock:
        _started_at[:] = [time.time()]
        _tokens.update(generated=0, requests=0)
        _variants.clear()


@events.test_stop.add_listener
def _on_stop(environment: Any, **_: Any) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None) if environment.parsed_options else None
    with _lock:
        started = _started_at[0] if _started_at else None
        generated, requests = _tokens["generated"], _tokens["requests"]
        counts = dict(_variants)
        expected = dict(_expected)
    if started is not None and requests:
        duration = time.time() - started
        rate = generated / duration if duration > 0 else 0.0
        print(f"[mlx-locust] {requests} requests generated {generated} tokens in {duration:.1f}s: "
              f"{rate:.1f} tokens/s aggregate", flush=True)
        if prefix:
            with open(f"{prefix}_tokens.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["requests", "generated_tokens", "duration_s", "tokens_per_s"])
                w.writerow([requests, generated, round(duration, 3), round(rate, 2)])
    if counts:
        tolerance = float(os.environ.get("MLX_LOCUST_CANARY_TOLERANCE", "0.03"))
        verdict = canary_verdict(counts, expected, tolerance)
        for row in verdict["variants"]:
            print(f"[mlx-locust] canary {row['variant']:>16}: {row['count']:6d} requests, observed "
                  f"{row['observed']:.3f}" + (f", expected {row['expected']:.3f} +/- {row.get('allowed', 0):.3f} "
                                                f"{'ok' if row['ok'] else 'MISMATCH'}" if "expected" in row else ""),
                  flush=True)
        if prefix:
            with open(f"{prefix}_canary.json", "w") as f:
                json.dump(verdict, f, indent=2)
        if verdict["ok"] is False:
            log.error("canary split does not match the configured weights")
            environment.process_exit_code = 1
