"""Several async iterators as one: items in the order they come, every iterator closed at the end.

The n choices of a request (one stream each) and the prompts of a multi-prompt completion (one
generation each) reach their consumer as one stream; an error from any of them ends all of them,
and a consumer that leaves closes every one (which cancels their sequences).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, TypeVar

T = TypeVar("T")


async def merged(iterators: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    if len(iterators) == 1:  # the common case, without tasks
        async for item in iterators[0]:
            yield item
        return
    pending = {asyncio.ensure_future(it.__anext__()): it for it in iterators}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                it = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                yield item
                pending[asyncio.ensure_future(it.__anext__())] = it
    finally:
        for fut in pending:
            fut.cancel()
        for it in iterators:
            close = getattr(it, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
