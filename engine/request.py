"""The engine's boundary types: what a caller submits and what comes back.

Everything a client controls is validated here, before a request reaches the GPU thread; the HTTP
layer builds these from OpenAI bodies, so its 400s and the engine's agree.
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Priority = Literal["interactive", "batch"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]

# What one request may ask for, declared once: the engine's models and the HTTP bodies both use these.
MAX_NEW_TOKENS = 1_000_000
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # any int64, as OpenAI's and vLLM's APIs take
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string (the matcher holds back up to this much text)
MAX_MESSAGES = 2048
MAX_TOKEN_IDS = 1_048_576  # token lists: completion prompts, /detokenize
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_LOGIT_BIAS = 1024
MAX_CHOICES = 256  # guided_choice alternatives
MAX_CHOICE_CHARS = 1024
MAX_JSON_DEPTH = 64  # nesting of any JSON value a client sends (schemas, extra message fields)
MAX_CACHE_SALT_CHARS = 256
MAX_TOOLS = 128
MAX_N = 64  # choices per request (the engine's max_n, default 8, is the configured bound)
MAX_TOOL_DESCRIPTION_CHARS = 8192


# The sampling knobs' bounds, as types: SamplingParams and the HTTP bodies (deployments/protocol.py) both
# use these, so each bound is written once. Bounds follow OpenAI where it has them.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0, description="0 turns it off; any size is accepted (the engine clamps it to the "
                                              "vocabulary).")]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # presence and frequency penalties
Seed = Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
ScoreOrMaxTokens = Annotated[int, Field(ge=0, le=MAX_NEW_TOKENS, description="0: score the prompt, generate nothing.")]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]
ChoiceCount = Annotated[int, Field(ge=1, le=MAX_N)]
DraftTokens = Annotated[int, Field(ge=0, le=64, description="Speculative draft tokens per step (0 turns it off).")]


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON-like value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, (list, tuple)):
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        if depth + 1 > MAX_JSON_DEPTH:  # deep enough to refuse: stop walking
            return depth + 1
        stack.extend((child, depth + 1) for child in node)
    return deepest


def check_depth(value: Any, what: str) -> Any:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class FunctionDef(BaseModel):
    """A function the model may call (OpenAI's ``tools[].function``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_TOOL_DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; arguments always validate against `parameters`.")

    @field_validator("parameters")
    @classmethod
    def _shallow(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_depth(v, "function parameters") if v is not None else v


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call exactly this function."""

    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallDelta(BaseModel):
    """A piece of one tool call, as OpenAI streams them: the first piece of call ``index`` carries its
    ``id`` and ``name``, later ones fragments of its JSON ``arguments``; joined, they are the call."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, name, ... pass through to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _shallow_extras(self) -> ChatMessage:
        check_depth(self.model_extra or {}, "a message field")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class SamplingParams(BaseModel):
    """OpenAI's sampling knobs plus mlx-lm's; bounds follow OpenAI where it has them."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: ScoreOrMaxTokens = 256
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[int, float] | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    logprobs: bool = False
    top_logprobs: TopLogprobs = 0

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        """Ids are checked against the model's tokenizer when the engine prepares the request."""
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens")
        for tok, bias in v.items():
            if tok < 0:
                raise ValueError(f"logit_bias token id {tok} is negative")
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias value {bias} for token {tok} is not a number in [-100, 100]")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationRequest(BaseModel):
    """One generation: exactly one of ``prompt``, ``prompt_token_ids`` or ``messages``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = None
    prompt_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_IDS)
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    priority: Priority = "interactive"
    timeout_s: float | None = Field(None, gt=0.0)
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    num_draft_tokens: DraftTokens | None = None
    # Structured output (see engine.structured); kept opaque here so this module stays light.
    response_format: dict[str, Any] | None = None
    n: ChoiceCount = 1
    prompt_logprobs: TopLogprobs | None = Field(
        None, description="Return the prompt tokens' logprobs (with this many alternatives each); the first is None.")
    echo: bool = Field(False, description="Return the prompt's text with the first chunk (prompt_text).")
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(None, description="Default: auto when tools are given.")
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to the chat template (e.g. {\"enable_thinking\": false}).")
    cache_scope: str = Field(
        "", max_length=2 * MAX_CACHE_SALT_CHARS,
        description="Prefix-cache entries are shared only among requests of one scope (the ingress sets it "
                    "per API key and cache_salt), so cached_tokens and TTFT reveal nothing across tenants.")

    @field_validator("response_format", "chat_template_kwargs")
    @classmethod
    def _shallow_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_depth(v, "response_format / chat_template_kwargs") if v is not None else v

    @model_validator(mode="after")
    def _tools_fit(self) -> GenerationRequest:
        if self.tools and self.messages is None:
            raise ValueError("tools need messages (a chat request)")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools or []}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not one of the tools")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise ValueError("tool names must be unique")
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        return self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerationRequest:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.prompt_token_ids is not None and (
            not self.prompt_token_ids or min(self.prompt_token_ids) < 0
        ):
            raise ValueError("prompt_token_ids must be a non-empty list of non-negative ids")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float | None  # None: nothing predicts it (a prompt's first token)
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    draft_tokens: int | None = None  # proposed by the draft model (speculative requests only)
    accepted_draft_tokens: int | None = None
    # This choice's timing: to its first token, and the mean time per output token after it. The
    # engine fills them from submission; a model replica restates them as it delivered the tokens.
    ttft_s: float | None = None
    tpot_s: float | None = None


class GenerationChunk(BaseModel):
    """A piece of one request's output. The last chunk carries ``finish_reason`` and ``usage``."""

    request_id: str
    text: str = ""  # the answer (``content``)
    reasoning: str = ""  # the thought, for models with thinking markers (``reasoning_content``)
    tool_calls: list[ToolCallDelta] | None = None
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    index: int = 0  # which choice of the request (n > 1, several prompts)
    prompt_text: str | None = None  # with ``echo``: the prompt, in a choice's first chunk
    prompt_logprobs: list[TokenLogprob] | None = None  # with ``prompt_logprobs``: in a choice's first chunk

    @staticmethod
    def concat(chunks: Sequence[GenerationChunk]) -> GenerationChunk:
        """Chunks of one choice, in order, as one: a single pass, so coalescing n tokens costs O(n)."""
        first, last = chunks[0], chunks[-1]
        if len(chunks) == 1:
            return first

        def joined(name: str) -> list[Any] | None:
            parts = [getattr(c, name) for c in chunks]
            return None if all(p is None for p in parts) else [x for p in parts if p for x in p]

        return GenerationChunk.model_construct(
            request_id=first.request_id,
            text="".join(c.text for c in chunks),
            reasoning="".join(c.reasoning for c in chunks),
            tool_calls=joined("tool_calls") or None,
            token_ids=[t for c in chunks for t in c.token_ids],
            logprobs=joined("logprobs"),
            finish_reason=last.finish_reason,
            usage=last.usage,
            index=first.index,
            prompt_text=next((c.prompt_text for c in chunks if c.prompt_text is not None), None),
            prompt_logprobs=next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None),
        )


class ModelInfo(BaseModel):
    name: str
    source: str
    kind: Literal["text", "vision"] = "text"
    nbytes: int
    vocab_size: int
    loaded_at: float
    active: int = 0
    waiting: int = 0
    draft: bool = False
    prompt_cache_bytes: int = 0
    shard: str | None = None  # a model sharded across processes: "tensor, 2 ranks"; nbytes is this rank's shard
