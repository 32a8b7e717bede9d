"""Stream registry: request id -> bounded buffer from the GPU thread to the caller's event loop.

The GPU thread never blocks on a consumer (that would stall the whole batch). When a consumer lags,
new tokens join the run of chunks still waiting for it (an append: the GPU thread never copies text),
so the buffer holds at most ``max_items`` entries and one request's buffered text is bounded by its
own ``max_tokens``; the consumer joins a run in one pass when it reads. A consumer
that reads nothing for ``stall_timeout_s`` while output waits is cut off and its slot freed. The
consumer always receives everything available in one item, which is also how tokens get coalesced
across Ray hops without delaying the first one.
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


def _wake(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream._ready.set()


class _Run(list):
    """Chunks coalesced for a lagging consumer, in order; the consumer concatenates them once."""


class RequestStream:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, max_items: int,
                 waker: Waker | None = None) -> None:
        self.request_id = request_id
        self._loop = loop
        self._waker = waker
        self._max_items = max_items
        self._items: deque[GenerationChunk | _Run | EngineError] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._notified = False
        self.closed = False  # set by the consumer side when it goes away
        self.finished = False  # set by the producer after the final chunk or an error
        self.last_read = time.monotonic()
        self._unread_since = self.last_read  # when the oldest item the consumer has not read came

    # -- producer side (GPU thread) -------------------------------------------------------------
    def push(self, item: GenerationChunk | EngineError, deferred: bool = False) -> None:
        """Queue ``item``; ``deferred`` leaves waking the consumer to the waker's next flush."""
        with self._lock:
            if self.finished or self.closed:
                return
            if isinstance(item, EngineError) or item.finish_reason is not None:
                self.finished = True
            last = self._items[-1] if self._items else None
            if last is None:
                self._unread_since = time.monotonic()
            if isinstance(item, GenerationChunk) and isinstance(last, _Run):
                last.append(item)
            elif (
                isinstance(item, GenerationChunk)
                and isinstance(last, GenerationChunk)
                and len(self._items) >= self._max_items
            ):
                self._items[-1] = _Run((last, item))
            else:
                self._items.append(item)
            if self._notified:
                return
            self._notified = True
        if deferred and self._waker is not None:
            self._waker.defer(self)
            return
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening any more
            self.closed = True

    def backlog(self) -> int:
        return len(self._items)

    def stalled(self, timeout_s: float, now: float) -> bool:
        """Items have waited unread for ``timeout_s``: counted from the later of the consumer's last
        read and the oldest item's arrival, so a first token after a long queue is no stall."""
        return bool(self._items) and now - max(self.last_read, self._unread_since) > timeout_s

    # -- consumer side (caller's event loop) ----------------------------------------------------
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
        chunks: list[GenerationChunk] = []
        for item in items:
            if isinstance(item, EngineError):
                chunk = GenerationChunk.concat(chunks) if chunks else None
                if chunk is not None and (chunk.text or chunk.token_ids):
                    with self._lock:  # deliver the text first, the error on the next call
                        self._items.appendleft(item)
                        self._notified = True
                        self._ready.set()
                    return chunk
                raise item
            if isinstance(item, _Run):
                chunks.extend(item)
            else:
                chunks.append(item)
        return GenerationChunk.concat(chunks)


class StreamRegistry:
    """All open streams of one engine. Closing a stream tells the scheduler to drop the sequence."""

    def __init__(self, on_close: Callable[[str], None], max_items: int = 8, waker: Waker | None = None) -> None:
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._on_close = on_close
        self._max_items = max_items
        self.waker = waker or Waker()

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop) -> RequestStream:
        with self._lock:
            if request_id in self._streams:
                from .errors import InvalidRequestError

                raise InvalidRequestError(f"request id {request_id!r} is already in flight", param="request_id")
            stream = RequestStream(request_id, loop, self._max_items, self.waker)
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
