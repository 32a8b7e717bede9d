"""What constrains one request's output: its ``response_format``, its tools and ``tool_choice``, and a
thought its prompt opened. Built where the request is prepared (a preparation thread), so a schema
that cannot be enforced is a 400 before anything reaches the GPU thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chat import Channel
from .errors import InvalidRequestError
from .grammar import lark_grammar, spec_from_response_format, with_thought
from .request import GenerationRequest
from .sampling import LogitsProcessor, forbid
from .tools import JSON_TOOLS, check_tool_choice, tools_lark

if TYPE_CHECKING:
    from .models import LoadedModel


def constraint_processors(m: LoadedModel, request: GenerationRequest, channel: Channel) -> list[LogitsProcessor]:
    """The logits processors that enforce them (empty when nothing constrains the output)."""
    fmt = m.chat
    choice = request.effective_tool_choice
    calls = bool(request.tools) and choice != "none"
    if request.tools and not calls and fmt.has_tools:
        return [forbid([fmt.tool_start, fmt.tool_end])]  # type: ignore[list-item]
    spec = spec_from_response_format(request.response_format) if request.response_format is not None else None
    if spec is not None and calls:
        raise InvalidRequestError("response_format together with tools is not supported: set tool_choice to "
                                  "none, or leave one of them out", param="response_format",
                                  code="unsupported_combination")
    if calls:
        check_tool_choice(fmt, choice)
    if spec is None and not (calls and fmt.tool_format == JSON_TOOLS):
        return []  # free output; a call in another model's format is parsed when it ends
    from .structured import compiler_for  # llguidance only when something is constrained

    compiler = compiler_for(m.tokenizer, m.vocab_size)
    after = fmt.think_end if channel == "reasoning" else None
    if spec is not None:
        compiled = compiler.compile(spec, after)
    else:
        lark = tools_lark(request.tools or [], choice, fmt, request.parallel_tool_calls)
        compiled = compiler.compile_grammar(lark_grammar(with_thought(lark, after) if after is not None else lark))
    return [compiled.make_processor()]
