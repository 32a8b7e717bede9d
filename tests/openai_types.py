"""Every answer of ``/v1/chat/completions`` and ``/v1/completions`` that a test reads, whole or streamed, is
checked against the ``openai`` package's own types; a violation fails the test that saw it.

How: ``send`` of ``httpx.Client`` / ``httpx.AsyncClient`` is wrapped, and so is that of ``httpx2`` (the
transport of the official client since openai 3.x), so test code, ``httpx.post``/``httpx.stream`` and
the ``openai`` client are all seen. A body already read by ``send`` is checked at once; a streamed
one is teed through its ``iter_bytes``/``aiter_bytes`` (what ``read``, ``iter_lines`` and the openai
client's SSE decoder all read from), and each complete SSE event is checked as it arrives. A
violation is recorded, never raised inside the code under test (the openai client would turn it into
an ``APIConnectionError``, a test's ``except`` could swallow it); the pytest hooks below fail the
setup, call or teardown phase that recorded it.

What "validates" means (openai's models are lenient: ``construct`` takes anything, and plain
``model_validate`` coerces ``"0"`` to ``0``):
- ``Model.model_validate(obj, strict=True)`` with ``ChatCompletion``, ``ChatCompletionChunk``,
  ``Completion``: required fields present, ``object`` literals, ints that are ints, ``finish_reason``
  and ``role`` within their literals, ``usage`` as ``CompletionUsage``;
- JSON must be standard (no ``NaN``/``Infinity``); no field outside the types except the extensions in
  ``EXTENSIONS``;
- two relaxations where the types are narrower than OpenAI's own wire format: a streamed
  ``Completion`` choice may have ``finish_reason: null`` (OpenAI streams it so, with the same type),
  and ``logprobs.token_logprobs[0]`` / ``top_logprobs[0]`` may be null (an echoed prompt's first
  token, as OpenAI's legacy completions and vLLM answer); null anywhere else is a violation;
- beyond types: whole answers have choices indexed 0..k-1 (k = ``n`` x prompts when the request says),
  ``usage`` with total = prompt + completion; the logprobs lists of a choice have one length; a
  stream is ``text/event-stream``, keeps one ``id``/``created``/``model``, gives each choice its
  role first and one ``finish_reason`` last, carries ``usage`` only in a chunk with no choices, and
  ends with ``data: [DONE]`` and nothing after it;
- errors (status >= 400, and ``{"error": ...}`` events inside a stream) are exactly
  ``{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Literal, Optional

import pydantic
import pytest
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_choice import Logprobs

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Fields our server may send beyond the openai types (dotted paths, ``[]`` for list items).
EXTENSIONS = {
    "usage.draft_tokens", "usage.accepted_draft_tokens",  # speculative decoding counters
    "choices[].message.reasoning_content", "choices[].delta.reasoning_content",  # DeepSeek/vLLM convention
}


class _PromptLogprobs(Logprobs):
    token_logprobs: Optional[List[Optional[float]]] = None
    top_logprobs: Optional[List[Optional[Dict[str, float]]]] = None


class _CompletionChoice(CompletionChoice):
    logprobs: Optional[_PromptLogprobs] = None


class _CompletionChunkChoice(_CompletionChoice):
    finish_reason: Optional[Literal["stop", "length", "content_filter"]] = None


class _Completion(Completion):
    choices: List[_CompletionChoice]


class _CompletionChunk(Completion):
    choices: List[_CompletionChunkChoice]


WHOLE = {CHAT: ChatCompletion, COMPLETIONS: _Completion}
CHUNK = {CHAT: ChatCompletionChunk, COMPLETIONS: _CompletionChunk}
ERROR_KEYS = {"message", "type", "param", "code"}


# -- recording ------------------------------------------------------------------------------------
@dataclass
class Record:
    violations: list[str] = field(default_factory=list)
    responses: int = 0
    bodies: int = 0  # whole JSON bodies and SSE events checked
    seconds: float = 0.0


_lock = threading.Lock()
_session = Record()  # everything, for the summary
_pending: list[str] = []  # violations not yet charged to a test phase
_captures: list[Record] = []


def _record(message: str) -> None:
    with _lock:
        if _captures:
            _captures[-1].violations.append(message)
        else:
            _pending.append(message)
            _session.violations.append(message)


def _count(bodies: int = 0, responses: int = 0, seconds: float = 0.0) -> None:
    with _lock:
        for r in [_session, *_captures[-1:]]:
            r.bodies += bodies
            r.responses += responses
            r.seconds += seconds


@contextlib.contextmanager
def capture() -> Iterator[Record]:
    """Route what the checker finds into a fresh ``Record`` (for testing the checker itself)."""
    rec = Record()
    with _lock:
        _captures.append(rec)
    try:
        yield rec
    finally:
        with _lock:
            _captures.remove(rec)


def take_pending() -> list[str]:
    with _lock:
        out = list(_pending)
        _pending.clear()
    return out


# -- checking one body ----------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _short(obj: Any, limit: int = 400) -> str:
    s = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


def _pydantic_problems(err: pydantic.ValidationError) -> list[str]:
    return [f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']} "
            f"(got {_short(json.dumps(e.get('input'), default=str), 80)})" for e in err.errors()]


def _extras(model: Any, path: str = "") -> list[str]:
    """Fields present in the body that the openai types do not declare (minus ``EXTENSIONS``)."""
    out = []
    if isinstance(model, pydantic.BaseModel):
        for name in (model.model_extra or {}):
            p = f"{path}.{name}" if path else name
            if p not in EXTENSIONS:
                out.append(f"{p}: field not in the openai type")
        for name in type(model).model_fields:
            out += _extras(getattr(model, name), f"{path}.{name}" if path else name)
    elif isinstance(model, list):
        for item in model:
            out += _extras(item, f"{path}[]")
    return sorted(set(out))


def check_error(obj: Any) -> list[str]:
    """Problems with an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``."""
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(obj["error"], dict):
        return [f"error body is not {{'error': {{...}}}}: {_short(obj)}"]
    err = obj["error"]
    problems = []
    if set(err) != ERROR_KEYS:
        problems.append(f"error keys {sorted(err)} != {sorted(ERROR_KEYS)}")
    for k in ("message", "type"):
        if not isinstance(err.get(k), str) or not err.get(k):
            problems.append(f"error.{k} must be a non-empty string, got {err.get(k)!r}")
    for k in ("param", "code"):
        if err.get(k) is not None and not isinstance(err.get(k), str):
            problems.append(f"error.{k} must be a string or null, got {err.get(k)!r}")
    return problems


def _logprob_problems(choice: dict, where: str) -> list[str]:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    problems = []
    lists = {k: lp[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
             if isinstance(lp.get(k), list)}
    if len({len(v) for v in lists.values()}) > 1:
        problems.append(f"{where}.logprobs lists differ in length: {({k: len(v) for k, v in lists.items()})}")
    for k in ("token_logprobs", "top_logprobs"):
        nulls = [i for i, x in enumerate(lists.get(k, [])) if x is None]
        if any(i != 0 for i in nulls):
            problems.append(f"{where}.logprobs.{k}: null at {nulls} (only the first prompt token may be null)")
    return problems


def check_body(path: str, obj: Any, *, chunk: bool, expected_choices: int | None = None) -> list[str]:
    """Problems with one whole answer (``chunk=False``) or one streamed chunk of endpoint ``path``."""
    model_type = (CHUNK if chunk else WHOLE)[path]
    try:
        model = model_type.model_validate(obj, strict=True)
    except pydantic.ValidationError as e:
        return [f"not a valid {model_type.__name__.lstrip('_')}: {p}" for p in _pydantic_problems(e)]
    problems = _extras(model)
    choices = obj["choices"]
    indices = [c["index"] for c in choices]
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        problems.append(f"choice indices {indices} must be distinct and >= 0")
    if not chunk:
        if indices != list(range(len(indices))) or not indices:
            problems.append(f"choice indices {indices} must be 0..k-1 in order, k >= 1")
        if expected_choices is not None and len(indices) != expected_choices:
            problems.append(f"{len(indices)} choices, the request asks for {expected_choices}")
        if obj.get("usage") is None:
            problems.append("usage missing from a whole answer")
    elif expected_choices is not None and any(i >= expected_choices for i in indices):
        problems.append(f"choice index in {indices} >= {expected_choices} choices asked for")
    usage = obj.get("usage")
    if usage is not None:
        if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
            problems.append(f"usage.total_tokens != prompt_tokens + completion_tokens: {usage}")
        if min(usage["prompt_tokens"], usage["completion_tokens"]) < 0:
            problems.append(f"negative usage: {usage}")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None and not 0 <= cached <= usage["prompt_tokens"]:
            problems.append(f"usage.prompt_tokens_details.cached_tokens {cached} not in [0, prompt_tokens]")
        if chunk and choices:
            problems.append("a streamed chunk with usage must have no choices")
    for c in choices:
        problems += _logprob_problems(c, f"choices[{c['index']}]")
    return problems


# -- request facts --------------------------------------------------------------------------------
def _request_body(request: Any) -> dict | None:
    try:
        body = json.loads(request.content)
    except Exception:  # a streamed request body, not JSON, ...
        return None
    return body if isinstance(body, dict) else None


def _expected_choices(path: str, body: dict | None) -> int | None:
    if body is None:
        return None
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    if path == CHAT:
        return n
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
        return n
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        return n * len(p)
    return None


def _endpoint(request: Any) -> str | None:
    if request.method != "POST":
        return None
    p = request.url.path.rstrip("/")
    for ep in (CHAT, COMPLETIONS):
        if p.endswith(ep):
            return ep
    return None


# -- one response ---------------------------------------------------------------------------------
class _Tee:
    """Fed the decoded bytes of one response; checks each whole body or SSE event as it completes."""

    def __init__(self, path: str, request: Any, response: Any) -> None:
        self.path = path
        self.status = response.status_code
        self.where = f"{request.method} {request.url.path} -> {self.status}"
        ctype = response.headers.get("content-type", "")
        self.sse = ctype.startswith("text/event-stream")
        body = _request_body(request)
        self.expected = _expected_choices(path, body)
        self.finished = False
        self.buf = b""
        self.data: list[str] = []  # data lines of the event being read
        self.done = False
        self.errored = False
        self.events = 0
        self.ident: tuple | None = None
        self.roles: set[int] = set()
        self.finishes: set[int] = set()
        problems = []
        if self.status == 200:
            want_stream = bool(body.get("stream")) if body is not None else None
            if want_stream is True and not self.sse:
                problems.append(f"stream=true answered with content-type {ctype!r}")
            if want_stream is False and not ctype.startswith("application/json"):
                problems.append(f"a whole answer with content-type {ctype!r}")
        self._report(problems, None)

    def _report(self, problems: list[str], obj: Any) -> None:
        for p in problems:
            _record(f"{self.where}: {p}" + (f"\n    body: {_short(obj)}" if obj is not None else ""))

    def feed(self, chunk: bytes) -> None:
        if self.finished:
            return
        self.buf += chunk
        if not self.sse:
            return
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self._line(line.rstrip(b"\r").decode("utf-8", "replace"))

    def finish(self, exhausted: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if not exhausted:
            return  # the reader stopped early: the complete events were checked, nothing more to say
        if not self.sse:
            self._whole(self.buf.decode("utf-8", "replace"))
            return
        if self.buf:
            self._line(self.buf.rstrip(b"\r").decode("utf-8", "replace"))
        problems = []
        if self.data:
            problems.append("the last SSE event is not ended by a blank line")
            self._event("\n".join(self.data))
        if self.status == 200:
            if not self.done:
                problems.append("the stream ended without data: [DONE]")
            elif not self.errored and self.expected is not None:
                missing = sorted(set(range(self.expected)) - self.finishes)
                if missing:
                    problems.append(f"no finish_reason for choice(s) {missing}")
        self._report(problems, None)

    def _line(self, line: str) -> None:
        if line == "":
            if self.data:
                self._event("\n".join(self.data))
                self.data = []
        elif line.startswith(":"):
            pass  # a comment (keep-alive)
        elif line.startswith("data:"):
            self.data.append(line[5:][1:] if line[5:6] == " " else line[5:])
        else:
            self._report([f"unexpected SSE line {line[:80]!r}"], None)

    def _event(self, text: str) -> None:
        t0 = time.perf_counter()
        try:
            self._check_event(text)
        finally:
            _count(bodies=1, seconds=time.perf_counter() - t0)

    def _check_event(self, text: str) -> None:
        self.events += 1
        if self.done:
            self._report(["an event after data: [DONE]"], text)
            return
        if text == "[DONE]":
            self.done = True
            return
        try:
            obj = _loads(text)
        except ValueError as e:
            self._report([f"SSE event is not JSON ({e})"], text)
            return
        if self.status >= 400 or (isinstance(obj, dict) and "error" in obj):
            self.errored = True
            self._report(check_error(obj), obj)
            return
        problems = check_body(self.path, obj, chunk=True, expected_choices=self.expected)
        if not problems:
            ident = (obj["id"], obj["created"], obj["model"])
            if self.ident is None:
                self.ident = ident
            elif ident != self.ident:
                problems.append(f"(id, created, model) {ident} differs from the stream's first {self.ident}")
            for c in obj["choices"]:
                i = c["index"]
                if i in self.finishes:
                    problems.append(f"choice {i}: a chunk after its finish_reason")
                if self.path == CHAT and i not in self.roles:
                    self.roles.add(i)
                    if (c.get("delta") or {}).get("role") != "assistant":
                        problems.append(f"choice {i}: first chunk has no delta.role 'assistant'")
                if c.get("finish_reason") is not None:
                    self.finishes.add(i)
        self._report(problems, obj)

    def _whole(self, text: str) -> None:
        t0 = time.perf_counter()
        try:
            try:
                obj = _loads(text)
            except ValueError as e:
                self._report([f"body is not JSON ({e})"], text)
                return
            if self.status >= 400:
                self._report(check_error(obj), obj)
            elif self.status == 200:
                self._report(check_body(self.path, obj, chunk=False, expected_choices=self.expected), obj)
        finally:
            _count(bodies=1, seconds=time.perf_counter() - t0)


def _guarded(fn: Any, *args: Any) -> None:
    """Run a checker step; a bug in the checker is reported, never raised into the code under test."""
    try:
        fn(*args)
    except Exception as e:  # pragma: no cover - the checker's own failure
        _record(f"openai_types checker error: {e!r}")


def _observe(request: Any, response: Any) -> None:
    path = _endpoint(request)
    if path is None:
        return
    _count(responses=1)
    tee = _Tee(path, request, response)
    if hasattr(response, "_content"):  # send() already read it (stream=False)
        _guarded(tee.feed, response.content)
        _guarded(tee.finish, True)
        return
    orig_iter, orig_aiter = response.iter_bytes, response.aiter_bytes

    def iter_bytes(chunk_size: int | None = None) -> Iterator[bytes]:
        if tee.finished:
            yield from orig_iter(chunk_size)
            return
        exhausted = False
        try:
            for chunk in orig_iter(chunk_size):
                _guarded(tee.feed, chunk)
                yield chunk
            exhausted = True
        finally:
            _guarded(tee.finish, exhausted)

    async def aiter_bytes(chunk_size: int | None = None) -> Any:
        if tee.finished:
            async for chunk in orig_aiter(chunk_size):
                yield chunk
            return
        exhausted = False
        try:
            async for chunk in orig_aiter(chunk_size):
                _guarded(tee.feed, chunk)
                yield chunk
            exhausted = True
        finally:
            _guarded(tee.finish, exhausted)

    response.iter_bytes = iter_bytes
    response.aiter_bytes = aiter_bytes


# -- installing -----------------------------------------------------------------------------------
_originals: list[tuple[type, Any]] = []


def _wrap_sync(orig: Any) -> Any:
    @functools.wraps(orig)
    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        response = orig(self, request, *args, **kwargs)
        _guarded(_observe, request, response)
        return response

    return send


def _wrap_async(orig: Any) -> Any:
    @functools.wraps(orig)
    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        response = await orig(self, request, *args, **kwargs)
        _guarded(_observe, request, response)
        return response

    return send


def install() -> list[str]:
    """Wrap ``send`` of the sync and async clients of httpx and httpx2 (those installed); idempotent."""
    if _originals:
        return [f"{c.__module__}.{c.__qualname__}" for c, _ in _originals]
    for name in ("httpx", "httpx2"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for cls, wrap in ((mod.Client, _wrap_sync), (mod.AsyncClient, _wrap_async)):
            _originals.append((cls, cls.send))
            cls.send = wrap(cls.send)
    return [f"{c.__module__}.{c.__qualname__}" for c, _ in _originals]


def uninstall() -> None:
    while _originals:
        cls, orig = _originals.pop()
        cls.send = orig


# -- pytest plugin (registered by conftest.py) ----------------------------------------------------
def _fail_if_violations(phase: str) -> None:
    found = take_pending()
    if found:
        pytest.fail(f"{len(found)} response(s) seen during {phase} do not match the openai types "
                    f"(tests/openai_types.py):\n  " + "\n  ".join(found[:20]), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    try:
        return (yield)
    finally:
        _fail_if_violations("setup")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    try:
        return (yield)
    finally:
        _fail_if_violations("the test")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    try:
        return (yield)
    finally:
        _fail_if_violations("teardown")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    s = _session
    if s.responses:
        terminalreporter.write_line(
            f"openai types: {s.responses} responses, {s.bodies} bodies/events checked in {s.seconds * 1000:.0f} ms, "
            f"{len(s.violations)} violation(s)")


def pytest_unconfigure(config: pytest.Config) -> None:
    uninstall()
