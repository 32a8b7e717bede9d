"""Stream registry: request id -> bounded buffer from the GPU thread to the caller's event loop.

The GPU thread never blocks on a consumer (that would stall the whole batch). When a consumer lags,
new tokens join the run of chunks still waiting for it (an append: the GPU thread never copies text),
so the buffer holds at most ``max_items`` entries and one request's buffered text is bounded by its
own ``max_tokens``; the consumer joins a run in one pass when it reads. A consumer
that reads nothing for ``stall_timeout_s`` while output waits is cut off and its slot freed. The
consumer always receives everything available in one item, which is also how tokens get coalesced
across Ray hops without delaying the first one; a consumer that ``pause``s between reads lets them
gather on purpose (``stream_interval_ms``), and the last item ends its pause.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable

from .errors import EngineError
from .request import GenerationChunk


class Waker:
    """Wakes each consumer event loop once per scheduler turn, not once per stream and token.

    A wake-up is a write to the loop's self-pipe plus a turn of that loop; with dozens of streams
    those cost more GIL time than the tokens themselves, time the GPU thread then waits for.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[asyncio.AbstractEventLoop, list[RequestStream]] = {}

    def defer(self, stream: RequestStream) -> None:
        with self._lock:
            self._due.setdefault(stream._loop, []).append(stream)

    def flush(self) -> None:
        with self._lock:
            due, self._due = self._due, {}
        for loop, streams in due.items():
            try:
                loop.call_soon_threadsafe(_wake, streams)
            except RuntimeError:  # that loop is gone: nobody is listening any more
                for stream in streams:
                    stream.closed = True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream._ready.set()


Token = tuple[str, int]  # a plain token as the GPU thread queues it: (its answer text, its id)


class _Run(list):
    """Chunks and tokens coalesced for a lagging consumer, in order; the consumer joins them once."""


class RequestStream:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, max_items: int,
                 waker: Waker | None = None, chunk_id: str | None = None, index: int = 0) -> None:
        self.request_id = request_id
        self.chunk_id = chunk_id or request_id  # the request id and choice its chunks carry
        self.index = index
        self._loop = loop
        self._waker = waker
        self._max_items = max_items
        self._items: deque[GenerationChunk | Token | _Run | EngineError] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._notified = False
        self._pause: asyncio.Future[None] | None = None  # the consumer waits for output to gather
        self.closed = False  # set by the consumer side when it goes away
        self.finished = False  # set by the producer after the final chunk or an error
        self.last_read = time.monotonic()
        self._unread_since = self.last_read  # when the oldest item the consumer has not read came

    # -- producer side (GPU thread) -------------------------------------------------------------
    def push_token(self, text: str, token: int) -> None:
        """One plain token (answer text, not the last): the common case, queued without a chunk object
        (the consumer builds one chunk per read); the waker's next flush wakes the consumer."""
        self.push((text, token), deferred=True)

    def push(self, item: GenerationChunk | Token | EngineError, deferred: bool = False) -> None:
        """Queue ``item``; ``deferred`` leaves waking the consumer to the waker's next flush."""
        with self._lock:
            if self.finished or self.closed:
                return
            error = isinstance(item, EngineError)
            if error or (type(item) is not tuple and item.finish_reason is not None):  # type: ignore[union-attr]
                self.finished = True
            last = self._items[-1] if self._items else None
            if last is None:
                self._unread_since = time.monotonic()
            if not error and isinstance(last, _Run):
                last.append(item)  # type: ignore[arg-type]
            elif (
                not error and last is not None and not isinstance(last, EngineError)
                and len(self._items) >= self._max_items
            ):
                self._items[-1] = _Run((last, item))
            else:
                self._items.append(item)
            pause = None
            if self._notified:
                pause = self._pause if self.finished else None  # the last item ends a pause at once
                if pause is None:
                    return
            self._notified = True
        if pause is not None:
            self._call_soon(_resolve, pause)
            return
        if deferred and self._waker is not None:
            self._waker.defer(self)
            return
        self._call_soon(self._ready.set)

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening any more
            self.closed = True

    def backlog(self) -> int:
        return len(self._items)

    def stalled(self, timeout_s: float, now: float) -> bool:
        """Items have waited unread for ``timeout_s``: counted from the later of the consumer's last
        read and the oldest item's arrival, so a first token after a long queue is no stall."""
        return bool(self._items) and now - max(self.last_read, self._unread_since) > timeout_s

    # -- consumer side (caller's event loop) ----------------------------------------------------
    async def pause(self, seconds: float) -> None:
        """Let output gather for up to ``seconds``: one read then takes many tokens. The final chunk
        or an error ends the pause, so the end of a stream never waits."""
        fut = self._loop.create_future()
        with self._lock:
            if self.finished:
                return
            self._pause = fut
        timer = self._loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._pause = None

    async def next(self) -> GenerationChunk:
        """Everything available now, merged into one chunk; raises the engine's error if any."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    break
                self._ready.clear()
                self._notified = False
            await self._ready.wait()
        self.last_read = time.monotonic()
        parts: list[GenerationChunk | Token] = []
        for item in items:
            if isinstance(item, EngineError):
                chunk = self._join(parts) if parts else None
                if chunk is not None and (chunk.text or chunk.token_ids):
                    with self._lock:  # deliver the text first, the error on the next call
                        self._items.appendleft(item)
                        self._notified = True
                        self._ready.set()
                    return chunk
                raise item
            if isinstance(item, _Run):
                parts.extend(item)
            else:
                parts.append(item)
        return self._join(parts)

    def _join(self, parts: list[GenerationChunk | Token]) -> GenerationChunk:
        """Parts in order as one chunk; each run of plain tokens becomes one chunk first."""
        chunks: list[GenerationChunk] = []
        texts: list[str] = []
        ids: list[int] = []
        for part in parts:
            if type(part) is tuple:
                texts.append(part[0])
                ids.append(part[1])
                continue
            if ids:
                chunks.append(self._plain(texts, ids))
                texts, ids = [], []
            chunks.append(part)  # type: ignore[arg-type]
        if ids:
            chunks.append(self._plain(texts, ids))
        return GenerationChunk.concat(chunks)

    def _plain(self, texts: list[str], ids: list[int]) -> GenerationChunk:
        return GenerationChunk.model_construct(request_id=self.chunk_id, text="".join(texts), token_ids=ids,
                                               index=self.index)


class StreamRegistry:
    """All open streams of one engine. Closing a stream tells the scheduler to drop the sequence."""

    def __init__(self, on_close: Callable[[str], None], max_items: int = 8, waker: Waker | None = None) -> None:
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._on_close = on_close
        self._max_items = max_items
        self.waker = waker or Waker()

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop, chunk_id: str | None = None,
             index: int = 0) -> RequestStream:
        with self._lock:
            if request_id in self._streams:
                from .errors import InvalidRequestError

                raise InvalidRequestError(f"request id {request_id!r} is already in flight", param="request_id")
            stream = RequestStream(request_id, loop, self._max_items, self.waker, chunk_id, index)
            self._streams[request_id] = stream
            return stream

    def get(self, request_id: str) -> RequestStream | None:
        return self._streams.get(request_id)

    def close(self, request_id: str) -> None:
        """Consumer side is done (finished, cancelled or gone)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.closed = True
        if not stream.finished:
            self._on_close(request_id)

    def __len__(self) -> int:
        return len(self._streams)

    def snapshot(self) -> list[RequestStream]:
        with self._lock:
            return list(self._streams.values())
