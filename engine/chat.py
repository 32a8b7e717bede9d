"""A model's chat format: its template (tools, history, template options) and the markers it writes.

mlx-lm's ``TokenizerWrapper`` knows, per model, whether it calls tools (``has_tool_calling``, the
``<tool_call>``-style markers and a parser) and whether it thinks (``<think>``-style markers); this
module turns that into what the engine needs: the prompt tokens of a chat, the token ids of the
markers (the output is split on them: thought, answer, calls), and the channel a generation starts
in (a template may open a thought in the prompt). Markers that take several tokens are not split on:
such models' output stays in one channel (documented in docs/api.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import InvalidRequestError
from .request import ChatMessage, ImagePart, ToolDef

Channel = Literal["content", "reasoning", "tool"]


@dataclass(frozen=True)
class ChatFormat:
    """Marker token ids of one model (None where the model has no such single-token marker)."""

    think_start: int | None
    think_end: int | None
    tool_start: int | None
    tool_end: int | None
    tool_parser: Callable[[str, Any], dict] | None

    @property
    def tool_format(self) -> str | None:
        """The mlx-lm parser module's name (``json_tools``, ``pythonic``, ...)."""
        if self.tool_parser is None:
            return None
        return getattr(self.tool_parser, "__module__", "").rsplit(".", 1)[-1] or None

    @property
    def has_tools(self) -> bool:
        return self.tool_start is not None and self.tool_end is not None and self.tool_parser is not None

    @property
    def has_thinking(self) -> bool:
        return self.think_start is not None and self.think_end is not None

    def markers(self) -> dict[int, Channel]:
        """Marker id -> the channel its token opens (a closing marker opens the answer again)."""
        out: dict[int, Channel] = {}
        if self.has_thinking:
            out[self.think_start] = "reasoning"  # type: ignore[index]
            out[self.think_end] = "content"  # type: ignore[index]
        if self.has_tools:
            out[self.tool_start] = "tool"  # type: ignore[index]
            out[self.tool_end] = "content"  # type: ignore[index]
        return out

    def first_channel(self, prompt: list[int]) -> Channel:
        """``reasoning`` when the prompt ends inside an open thought (the template opened it)."""
        if not self.has_thinking:
            return "content"
        start = _rfind(prompt, self.think_start)
        return "reasoning" if start > _rfind(prompt, self.think_end) else "content"


def _rfind(tokens: list[int], token: int | None) -> int:
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] == token:
            return i
    return -1


def _single(tokens: Any) -> int | None:
    return int(tokens[0]) if tokens is not None and len(tokens) == 1 else None


def chat_format(tokenizer: Any) -> ChatFormat:
    """The markers of an mlx-lm ``TokenizerWrapper`` (no markers for anything else)."""
    tool_start = tool_end = think_start = think_end = None
    parser = None
    if getattr(tokenizer, "has_tool_calling", False):
        tool_start = _single(getattr(tokenizer, "_tool_call_start_tokens", None))
        tool_end = _single(getattr(tokenizer, "_tool_call_end_tokens", None))
        parser = tokenizer.tool_parser
    if getattr(tokenizer, "has_thinking", False):
        think_start = _single(getattr(tokenizer, "_think_start_tokens", None))
        think_end = _single(getattr(tokenizer, "_think_end_tokens", None))
    return ChatFormat(think_start, think_end, tool_start, tool_end, parser)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: text content, and each history call's ``arguments`` as
    an object (OpenAI sends them as a JSON string; templates write them with ``tojson``)."""
    out = []
    for msg in messages:
        d = msg.model_dump(exclude_none=True)
        d["content"] = msg.text()
        for call in d.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # not JSON: the template gets the string as it came
        out.append(d)
    return out


def render_chat(tokenizer: Any, fmt: ChatFormat, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[ToolDef] | None = None, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The prompt tokens of a chat, tools and template options included; 400 for what it cannot do."""
    if any(isinstance(p, ImagePart) for msg in messages if isinstance(msg.content, list) for p in msg.content):
        raise InvalidRequestError("this model does not accept images", param="messages")
    if tools and not fmt.has_tools:
        raise InvalidRequestError("this model's chat template has no tool calling: its tokenizer names no "
                                  "single-token tool-call markers mlx-lm can parse", param="tools",
                                  code="tools_unsupported")
    kwargs = dict(template_kwargs or {})
    template = getattr(tokenizer, "chat_template", None)
    for key in kwargs:
        if key in ("messages", "tools", "add_generation_prompt", "tokenize", "conversation"):
            raise InvalidRequestError(f"chat_template_kwargs may not set {key!r}", param="chat_template_kwargs")
        if isinstance(template, str) and key not in template:  # it could change nothing: say so, do not ignore it
            raise InvalidRequestError(f"this model's chat template does not use {key!r}",
                                      param="reasoning_effort" if key == "reasoning_effort" else "chat_template_kwargs",
                                      code="unsupported_parameter")
    if tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    try:
        return list(tokenizer.apply_chat_template(template_messages(messages),
                                                  add_generation_prompt=add_generation_prompt, **kwargs))
    except Exception as e:  # jinja templates raise for roles or orders they do not support
        raise InvalidRequestError(f"the model's chat template rejected the messages: {e}", param="messages") from e
