"""Tool calls: grammars that make every call well-formed, and the parser that streams calls as OpenAI deltas.

The grammars are for models that write calls as mlx-lm's ``json_tools`` parser reads them (Qwen,
Hermes and the demo): an opening marker token, ``{"name": ..., "arguments": {...}}`` on its own line,
a closing marker token. The markers are named by token id, so a model cannot spell them in pieces.

- ``tool_choice: required`` or a named function: the whole output is one call (or several, with
  ``parallel_tool_calls``), each valid against its function's ``parameters`` schema, then EOS.
- ``auto``: text is free; once the model writes the opening marker, the call must be whole and
  valid, then text is free again (one call at most without ``parallel_tool_calls``).
- ``none``: the opening marker is masked; the model answers in text.

Marker tokens are special to every grammar (``structured.GrammarCompiler``): free text can never
produce one, so the grammar switches on exactly when the model writes the marker.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable

from .chat import ChatFormat
from .errors import InvalidRequestError
from .grammar import close_objects, json_rule
from .request import NamedToolChoice, ToolCallDelta, ToolChoice, ToolDef

JSON_TOOLS = "json_tools"  # the mlx-lm parser whose format the grammars write


def call_schema(tools: list[ToolDef]) -> dict[str, Any]:
    """``{"name": <one of the tools>, "arguments": <that tool's parameters>}``, keys in that order."""
    variants = [{
        "type": "object",
        "properties": {"name": {"const": t.function.name},
                       "arguments": close_objects(t.function.parameters or {"type": "object"})},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def tools_lark(tools: list[ToolDef], choice: ToolChoice, fmt: ChatFormat, parallel: bool) -> str:
    """Lark for what the model may write: only calls (``required``, a named function), or free text
    in which the opening marker starts a call (``auto``). Marker tokens are special to the grammar,
    so free text can never contain one and a call can only open with the real token."""
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    call = f'call: <[{fmt.tool_start}]> "\\n" {json_rule(call_schema(tools))} "\\n" <[{fmt.tool_end}]>\n'
    if choice == "auto":
        start = "start: TEXT? (call TEXT?)*" if parallel else "start: TEXT? (call TEXT?)?"
        return f"{start}\nTEXT: /(.|\\n)+/\n{call}"
    return ('start: call ("\\n" call)*' if parallel else "start: call") + "\n" + call


def check_tool_choice(fmt: ChatFormat, choice: ToolChoice) -> None:
    """Grammars exist for the ``json_tools`` format only; other formats get no forced calls."""
    if choice in ("required",) or isinstance(choice, NamedToolChoice):
        if fmt.tool_format != JSON_TOOLS:
            raise InvalidRequestError(
                f"tool_choice {choice if isinstance(choice, str) else 'by name'} needs a grammar for this model's "
                f"tool-call format ({fmt.tool_format}); only the {JSON_TOOLS} format has one: use tool_choice auto",
                param="tool_choice", code="tool_choice_unsupported")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}?\s*$")  # what may be the end of the outer object: held back until the call ends


class ToolCallStream:
    """One call's text as it arrives, as OpenAI deltas: ``id`` and ``name`` as soon as the name is
    complete, then fragments of ``arguments``. Joined, the fragments are exactly the arguments'
    JSON text the model wrote. A format read incrementally only for ``json_tools``; other formats
    (and text that does not fit) come out whole when the call ends, through the model's parser."""

    def __init__(self, index: int, parser: Callable[[str, Any], dict] | None, tools: list[dict] | None,
                 incremental: bool) -> None:
        self.index = index
        self.id = new_call_id()
        self._parser = parser
        self._tools = tools
        self._incremental = incremental
        self._text = ""
        self._args_at: int | None = None  # where the arguments start in the text, once the name is out
        self._sent = 0  # characters of the arguments sent so far

    def feed(self, text: str) -> list[ToolCallDelta]:
        self._text += text
        out: list[ToolCallDelta] = []
        if not self._incremental:
            return out
        if self._args_at is None:
            m = _HEAD.match(self._text)
            if m is None:
                return out
            self._args_at = m.end()
            out.append(ToolCallDelta(index=self.index, id=self.id, name=json.loads(f'"{m.group(1)}"')))
        args = self._text[self._args_at:]
        safe = _TAIL.search(args).start()  # type: ignore[union-attr]
        if safe > self._sent:
            out.append(ToolCallDelta(index=self.index, arguments=args[self._sent:safe]))
            self._sent = safe
        return out

    def finish(self, complete: bool) -> list[ToolCallDelta]:
        """The rest of the call; ``complete`` when its closing marker came (else max_tokens cut it)."""
        if self._args_at is not None:  # streamed: send the rest of the arguments, without the outer '}'
            args = self._text[self._args_at:].rstrip()
            if complete and args.endswith("}"):
                args = args[:-1].rstrip()
            rest = args[self._sent:]
            self._sent = len(args)
            return [ToolCallDelta(index=self.index, arguments=rest)] if rest else []
        if not complete or self._parser is None:
            return []
        try:
            call = self._parser(self._text.strip(), self._tools)
        except Exception:  # noqa: BLE001 - unconstrained text that is no call: nothing to report
            return []
        arguments = call.get("arguments", {})
        return [ToolCallDelta(index=self.index, id=self.id, name=str(call.get("name", "")),
                              arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))]


def assemble(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Whole calls from their deltas (what a non-streaming answer carries)."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": d.id, "name": d.name or "", "arguments": ""})
        if d.id:
            call["id"] = d.id
        if d.name:
            call["name"] = d.name
        call["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]
