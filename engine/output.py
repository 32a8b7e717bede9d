"""Token ids -> output for one sequence: streaming detokenization, channels, stop strings, logprobs.

A model with thinking or tool-call markers writes three kinds of output: its thought, its answer and
its calls. The marker tokens (``chat.ChatFormat``) switch between them and are never emitted; the
thought comes out as ``reasoning``, the answer as ``text``, each call as OpenAI deltas
(``tools.ToolCallStream``). Stop strings apply to the answer. They are matched on text, so one split
across several tokens is still caught; any tail of the pending text that could begin a stop string is
held back until it is resolved, so a stop string is never emitted, not even in part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .chat import Channel, ChatFormat
from .request import SamplingParams, TokenLogprob, ToolCallDelta, TopLogprob
from .tools import JSON_TOOLS, ToolCallStream


@dataclass
class Piece:
    """What one token (or the final flush) adds to each channel."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprob: TokenLogprob | None = None
    stop_hit: bool = False


class SequenceOutput:
    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: set[int], fmt: ChatFormat | None = None,
                 channel: Channel = "content", tools: list[dict] | None = None) -> None:
        """``tools`` (the request's, as dicts) turn call parsing on; without them a call marker is text."""
        self._tok = tokenizer
        self._detok = tokenizer.detokenizer
        self._stops = params.stop
        self._want_logprobs = params.logprobs
        self._top = params.top_logprobs
        self._eos = eos_ids
        self._pending = ""
        self.completion_tokens = 0
        self._fmt = fmt
        self._markers = fmt.markers() if fmt is not None else {}
        if fmt is not None and not tools and fmt.has_tools:
            self._markers.pop(fmt.tool_start, None)  # type: ignore[arg-type]
            self._markers.pop(fmt.tool_end, None)  # type: ignore[arg-type]
        self._tools = tools
        self._channel: Channel = channel
        self._call: ToolCallStream | None = None
        self.calls = 0  # calls opened

    def add(self, token: int, logprobs: mx.array | None) -> Piece:
        """Consume one generated token."""
        self.completion_tokens += 1
        piece = Piece(logprob=self._logprob(token, logprobs) if self._want_logprobs and logprobs is not None else None)
        if token in self._eos:
            return piece
        opens = self._markers.get(token)
        if opens is None:
            self._detok.add_token(token)
            self._route(self._detok.last_segment, piece)
            return piece
        self._detok.finalize()  # what the detokenizer held back belongs to the channel being left
        self._route(self._detok.last_segment, piece)
        self._detok.reset()
        self._switch(opens, piece)
        return piece

    def finish(self) -> Piece:
        """Flush what the detokenizer and the stop-string matcher held back (and a call cut short)."""
        piece = Piece()
        self._detok.finalize()
        self._route(self._detok.last_segment, piece, final=True)
        if self._call is not None:
            piece.tool_calls += self._call.finish(complete=False)
            self._call = None
        return piece

    def _switch(self, opens: Channel, piece: Piece) -> None:
        if self._channel == "tool" and self._call is not None:  # the closing marker (or any other) ends the call
            piece.tool_calls += self._call.finish(complete=True)
            self._call = None
        if opens == "tool":
            fmt = self._fmt
            assert fmt is not None
            self._call = ToolCallStream(self.calls, fmt.tool_parser, self._tools, fmt.tool_format == JSON_TOOLS)
            self.calls += 1
        elif opens == "content" and self._channel == "content":
            return
        self._channel = opens

    def _route(self, segment: str, piece: Piece, final: bool = False) -> None:
        if self._channel == "reasoning":
            piece.reasoning += segment
        elif self._channel == "tool":
            if self._call is not None:
                piece.tool_calls += self._call.feed(segment)
        else:
            self._pending += segment
            text, hit = self._release(final)
            piece.text += text
            piece.stop_hit = piece.stop_hit or hit

    def _release(self, final: bool = False) -> tuple[str, bool]:
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending, False
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        if final:
            self._pending = ""
            return pending, False
        hold = _longest_stop_prefix_suffix(pending, self._stops)
        self._pending = pending[len(pending) - hold:] if hold else ""
        return pending[: len(pending) - hold], False

    def _logprob(self, token: int, logprobs: mx.array) -> TokenLogprob:
        lp = logprobs.reshape(-1)
        entry = TokenLogprob.model_construct(
            token_id=token, token=self._tok.decode([token]), logprob=lp[token].item(), top_logprobs=[]
        )
        if self._top:
            idx = mx.argpartition(-lp, self._top - 1)[: self._top]
            vals = lp[idx]
            order = mx.argsort(-vals)
            for i, v in zip(idx[order].tolist(), vals[order].tolist()):
                entry.top_logprobs.append(
                    TopLogprob.model_construct(token_id=i, token=self._tok.decode([i]), logprob=v)
                )
        return entry


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string.

    Runs on the GPU thread for every token: only the places where a stop string's first character
    occurs are tried, each with one C-level comparison, so a long stop string costs no quadratic loop.
    """
    best = 0
    for s in stops:
        i = text.find(s[0], max(0, len(text) - len(s) + 1))
        while i != -1 and len(text) - i > best:
            if s.startswith(text[i:]):  # the earliest match is the longest tail
                best = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return best

