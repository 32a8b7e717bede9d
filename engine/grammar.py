"""Structured-output specs and their llguidance grammars; no MLX here.

The ingress and the engine both validate a ``response_format`` with this module, so a bad schema is
refused with its reason before the request reaches a GPU thread. Tokenizer-dependent work (masks,
per-sequence matchers) lives in ``engine.structured``.

Why these grammar options (DESIGN.md section 5): flexible whitespace lets a weak model emit
whitespace forever, so it is off and the separators are the ones ``json.dumps`` writes; llguidance
treats an object without ``additionalProperties`` as open, so objects that list ``properties`` are
closed unless the schema says otherwise; ``lenient`` stays off so unimplemented keywords are refused
rather than silently ignored.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from llguidance import LLMatcher, LLParserLimits, LLTokenizer, regex_to_lark
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidRequestError
from .request import MAX_CHOICE_CHARS, MAX_CHOICES

StructuredKind = Literal["json_object", "json_schema", "regex", "choice"]

PARAM = "response_format"

# A grammar is client input compiled on a worker thread: its size is bounded here and its
# complexity by llguidance's own fuel and size limits (the defaults bound a compile to tens of
# milliseconds). Errors name the limit, never echo the grammar.
MAX_GRAMMAR_BYTES = 1 << 20
LIMITS = LLParserLimits(verbose_errors=False)
_LIMIT_WORDS = ("too big", "too complex", "limit", "fuel")

# Applied after the schema's own "x-guidance", so a client cannot turn runaway whitespace back on.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}


class StructuredSpec(BaseModel):
    """What a constrained request must produce.

    ``json_object``: any JSON object. ``json_schema``: a value valid for ``schema`` (always enforced;
    ``strict`` is accepted for OpenAI compatibility). ``regex``: text that fully matches ``pattern``
    (Rust ``regex`` syntax; ``\\d`` and ``\\w`` are ASCII). ``choice``: exactly one of ``choices``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    kind: StructuredKind
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    name: str | None = None
    strict: bool | None = None
    pattern: str | None = None
    choices: list[Annotated[str, Field(max_length=MAX_CHOICE_CHARS)]] | None = Field(None, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _fields_match_kind(self) -> StructuredSpec:
        needed = {"json_schema": "json_schema", "regex": "pattern", "choice": "choices"}
        for kind, field in needed.items():
            given = getattr(self, field) is not None
            if kind == self.kind and not given:
                raise ValueError(f"kind {kind!r} needs {field!r}")
            if kind != self.kind and given:
                raise ValueError(f"{field!r} is only valid with kind {kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError("choices must not be empty")
        return self


def spec_from_response_format(response_format: Mapping[str, Any] | StructuredSpec | None) -> StructuredSpec | None:
    """Accept OpenAI's ``response_format`` (``text`` / ``json_object`` / ``json_schema``) or our own
    ``StructuredSpec`` fields (``{"kind": ...}``); ``None`` and ``text`` mean unconstrained."""
    if response_format is None or isinstance(response_format, StructuredSpec):
        return response_format
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError("response_format must be an object", param=PARAM)
    try:
        if "kind" in response_format:
            return StructuredSpec.model_validate(dict(response_format))
        rf_type = response_format.get("type")
        if rf_type == "text":
            return None
        if rf_type == "json_object":
            return StructuredSpec(kind="json_object")
        if rf_type == "json_schema":
            js = response_format.get("json_schema")
            if not isinstance(js, Mapping):
                raise InvalidRequestError("response_format.json_schema must be an object", param=PARAM)
            schema = js.get("schema", {})  # OpenAI: a missing schema means any JSON value
            return StructuredSpec(kind="json_schema", schema=schema, name=js.get("name"), strict=js.get("strict"))
        if rf_type == "regex":
            return StructuredSpec(kind="regex", pattern=response_format.get("pattern"))
        if rf_type == "choice":
            return StructuredSpec(kind="choice", choices=response_format.get("choices"))
    except ValidationError as e:
        raise InvalidRequestError(f"invalid response_format: {_pydantic_reason(e)}", param=PARAM) from None
    raise InvalidRequestError(f"unsupported response_format type {rf_type!r}", param=PARAM)


def _pydantic_reason(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())


# Keywords whose values are subschemas, by shape; used to reach every object schema without mistaking a
# property *named* "properties" for the keyword.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "unevaluatedProperties", "items", "additionalItems", "unevaluatedItems",
               "contains", "propertyNames", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


def close_objects(schema: Any) -> Any:
    """Return a copy where every object schema listing ``properties`` forbids other keys, unless it says
    otherwise (``additionalProperties``, ``patternProperties``, ``unevaluatedProperties``).

    Bare ``{"type": "object"}`` stays open (it means "any object"). ``allOf`` members and schemas that
    combine ``properties`` with ``allOf`` or ``$ref`` are left alone: closing each part of an
    intersection would forbid the other part's keys.
    """
    out = copy.deepcopy(schema)
    _close(out, in_all_of=False)
    return out


def _close(node: Any, *, in_all_of: bool) -> None:
    if not isinstance(node, dict):
        return
    if (isinstance(node.get("properties"), dict) and not in_all_of
            and not any(k in node for k in ("additionalProperties", "patternProperties", "unevaluatedProperties",
                                            "allOf", "$ref"))):
        node["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        sub = node.get(key)
        if isinstance(sub, dict):
            for child in sub.values():
                _close(child, in_all_of=False)
    for key in _SCHEMA_ONE:
        _close(node.get(key), in_all_of=False)
    for key in _SCHEMA_LISTS:
        sub = node.get(key)
        if isinstance(sub, list):
            for child in sub:
                _close(child, in_all_of=key == "allOf")


def to_grammar(spec: StructuredSpec, after_thought: int | None = None) -> str:
    """The llguidance grammar (a JSON string) for ``spec``; it is not validated here.

    ``after_thought``: the token id that ends a thought the prompt opened. The output then starts
    with a free thought, that token, and only then what ``spec`` asks for (a grammar from the first
    token would force the answer into the thought)."""
    if after_thought is not None:
        return lark_grammar(with_thought(f"start: {spec_rule(spec)}\n", after_thought))
    try:
        if spec.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        if spec.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(close_objects(spec.json_schema), overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as e:  # not serialisable as JSON (e.g. NaN bounds)
        raise InvalidRequestError(f"invalid JSON schema: {e}", param=PARAM) from None
    return lark_grammar(f"start: {spec_rule(spec)}")


def spec_rule(spec: StructuredSpec) -> str:
    """``spec`` as the body of a Lark rule, to compose with other rules."""
    if spec.kind in ("json_object", "json_schema"):
        return json_rule(close_objects(spec.json_schema) if spec.kind == "json_schema" else {"type": "object"})
    if spec.kind == "regex":
        # \d and \w mean ASCII digits and word characters, as in JSON Schema ``pattern`` (the Rust regex
        # default is Unicode, which lets a model answer a "\d{3}" with Arabic-Indic digits).
        return f"/{regex_to_lark(spec.pattern or '', 'dw')}/"
    # choice: Lark string literals use JSON escapes; keep non-ASCII text as it is.
    return " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices or [])


def json_rule(schema: Any) -> str:
    """An inline ``%json`` rule, with our JSON options over the schema's own ``x-guidance``."""
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), **JSON_OPTIONS}}
    try:
        return "%json " + json.dumps(schema, allow_nan=False)
    except ValueError as e:
        raise InvalidRequestError(f"invalid JSON schema: {e}", param=PARAM) from None


def lark_grammar(lark: str) -> str:
    return LLMatcher.grammar_from_lark(lark)


def with_thought(lark: str, think_end: int) -> str:
    """``lark`` (whose top rule is ``start``) preceded by a free thought and the token that ends it."""
    body = "\n".join("answer:" + line[len("start:"):] if line.startswith("start:") else line for line in lark.splitlines())
    return (f"start: THOUGHT? <[{think_end}]> SEP answer\nTHOUGHT: /(.|\\n)+/\nSEP: /[ \\t\\n]*/\n{body}\n")


_byte_tokenizer: LLTokenizer | None = None
_byte_tokenizer_lock = threading.Lock()


def _tokenizer_for_checks() -> LLTokenizer:
    """A one-byte-per-token vocabulary: enough to compile a grammar and find unsatisfiable schemas
    without knowing the model."""
    global _byte_tokenizer
    with _byte_tokenizer_lock:
        if _byte_tokenizer is None:
            _byte_tokenizer = LLTokenizer("byte")
        return _byte_tokenizer


def check_grammar(grammar: str, tokenizer: LLTokenizer | None = None) -> LLMatcher:
    """Compile ``grammar`` and return a fresh matcher, or raise ``InvalidRequestError`` with
    llguidance's reason (invalid types, unimplemented keywords, bad regexes, unsatisfiable bounds;
    code ``grammar_too_complex`` when a size or fuel limit was hit).

    A matcher is built because ``validate_grammar`` alone misses unsatisfiable schemas.
    """
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidRequestError(f"response_format compiles to a grammar of {len(grammar):,} bytes, over the limit "
                                  f"of {MAX_GRAMMAR_BYTES:,}", param=PARAM, code="grammar_too_complex")
    tok = tokenizer or _tokenizer_for_checks()
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tok, limits=LIMITS)
    if is_error:
        raise _grammar_error(messages[0])
    matcher = LLMatcher(tok, grammar, log_level=0, limits=LIMITS)
    if matcher.is_error():
        raise _grammar_error(matcher.get_error())
    return matcher


def _grammar_error(message: str) -> InvalidRequestError:
    reason = _first_line(message)
    code = "grammar_too_complex" if any(w in reason.lower() for w in _LIMIT_WORDS) else None
    return InvalidRequestError(f"invalid response_format: {reason}", param=PARAM, code=code)


def _first_line(message: str) -> str:
    # llguidance appends parser state and the whole grammar to some errors; the client needs the reason.
    return message.strip().split("\n", 1)[0].strip()


def validate_spec(spec: StructuredSpec | Mapping[str, Any] | None,
                  tokenizer: LLTokenizer | None = None) -> StructuredSpec | None:
    """Parse and compile ``spec`` (our fields or an OpenAI ``response_format``); raise
    ``InvalidRequestError`` (param ``response_format``) with the reason when it cannot be enforced.
    Returns None when nothing is constrained (``None`` or ``{"type": "text"}``).

    Cheap (milliseconds) and model-independent unless ``tokenizer`` is given: call it where the
    request is accepted, before it is queued for the GPU thread.
    """
    parsed = spec_from_response_format(spec)
    if parsed is not None:
        check_grammar(to_grammar(parsed), tokenizer)
    return parsed
