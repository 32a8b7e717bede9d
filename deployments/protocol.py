"""OpenAI-compatible HTTP bodies, and their translation to the engine's request.

Field names and bounds follow OpenAI's API reference so that the official client works unchanged;
knobs OpenAI lacks (``top_k``, ``min_p``, ``repetition_penalty``) are accepted as extensions, the way
vLLM and mlx_lm.server accept them.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import InvalidRequestError
from engine.tools import assemble
from engine.request import (
    MAX_CACHE_SALT_CHARS, MAX_CHOICE_CHARS, MAX_CHOICES, MAX_MESSAGES, MAX_PROMPTS, MAX_TOKEN_IDS, MAX_TOOLS,
    ChatMessage, ScoreOrMaxTokens,
    ChoiceCount, DraftTokens, GenerationChunk, GenerationRequest, MaxTokens, MinP, Penalty, RepetitionPenalty, SamplingParams, Seed, StopList,
    StopString, Temperature, TokenLogprob, ToolCallDelta, ToolChoice, ToolDef, TopK, TopLogprobs, TopP,
)

TokenIds = Annotated[list[int], Field(max_length=MAX_TOKEN_IDS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields that change nothing in the output: accepted and not used (docs/api.md lists every field).
NO_OP_FIELDS = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prediction"})


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Any other field is kept aside (``extra="allow"``) and refused by ``check_fields`` unless it is a
    no-op (``NO_OP_FIELDS``) or null: a field that would change the output and is not honoured is a
    400, never silently dropped."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[int, float] | None = None
    seed: Seed | None = None
    stop: StopString | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount = Field(1, description="Choices; they share one prefill. At most the engine's max_n (default 8).")
    user: str | None = None
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="Extension: interactive requests go first wherever requests wait; an API key's "
                                   "max_priority may lower it (docs/qos.md).")
    timeout: float | None = Field(
        None, gt=0, description="Extension: seconds this request may take from its arrival, waiting included (504 "
                                "deadline_exceeded after); default: the model's qos.default_timeout_s, at most "
                                "limits.request_timeout_s.")
    response_format: dict[str, Any] | None = Field(
        None, description="OpenAI's {'type': 'text'|'json_object'|'json_schema', ...}; also {'type': 'regex', "
                          "'pattern': ...} and {'type': 'choice', 'choices': [...]}.")
    guided_regex: str | None = Field(None, description="Extension: output must match this regex.")
    guided_choice: list[Annotated[str, Field(max_length=MAX_CHOICE_CHARS)]] | None = Field(
        None, max_length=MAX_CHOICES, description="Extension: output is exactly one of these strings.")
    guided_json: dict[str, Any] | None = Field(None, description="Extension: output is JSON valid against this schema.")
    num_draft_tokens: DraftTokens | None = Field(None, description="Extension: speculative draft tokens per step "
                                                                  "(models with a draft_model).")
    cache_salt: str | None = Field(
        None, max_length=MAX_CACHE_SALT_CHARS,
        description="Extension (as in vLLM): prefix-cache entries are shared only among requests with the same "
                    "salt (and API key), so a cache hit reveals nothing to someone without it.")

    def check_fields(self) -> None:
        """400 ``unsupported_parameter`` for a field given that this server does not honour."""
        unknown = sorted(k for k, v in (self.model_extra or {}).items() if v is not None and k not in NO_OP_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unsupported parameter(s): {', '.join(unknown)} (docs/api.md lists what is "
                                      "supported)", param=unknown[0], code="unsupported_parameter")

    def structured(self) -> dict[str, Any] | None:
        """The one constraint this request asks for, in ``response_format`` form."""
        given = [x for x in (self.response_format, self.guided_regex, self.guided_choice, self.guided_json) if x is not None]
        if len(given) > 1:
            raise InvalidRequestError("give at most one of response_format, guided_regex, guided_choice, guided_json",
                                      param="response_format")
        if self.guided_regex is not None:
            return {"type": "regex", "pattern": self.guided_regex}
        if self.guided_choice is not None:
            return {"type": "choice", "choices": self.guided_choice}
        if self.guided_json is not None:
            return {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": self.guided_json}}
        return self.response_format

    def sampling(self, max_tokens: int | None, default_max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        fields = {
            k: getattr(self, k)
            for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                      "frequency_penalty", "logit_bias", "seed", "stop")
            if getattr(self, k) is not None
        }
        return SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens, logprobs=logprobs,
                              top_logprobs=top_logprobs, **fields)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(None, description="none | auto (the default with tools) | required | "
                                                             "{type: function, function: {name}}.")
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extension (as in vLLM): passed to the chat template, e.g. {\"enable_thinking\": false}; "
                          "a key the template does not use is a 400.")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="Passed to the chat template as `reasoning_effort` (a 400 when the template does not use it).")
    modalities: list[Literal["text"]] | None = Field(None, description="Text only.")

    @property
    def choices(self) -> int:
        return self.n

    def to_engine(self, default_max_tokens: int, timeout_s: float | None, request_id: str,
                  cache_scope: str) -> list[GenerationRequest]:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        return [GenerationRequest(
            model=self.model, messages=self.messages,
            sampling=self.sampling(self.max_completion_tokens or self.max_tokens, default_max_tokens,
                                   self.logprobs, self.top_logprobs or 0),
            priority=self.priority, timeout_s=timeout_s, request_id=request_id, response_format=self.structured(),
            num_draft_tokens=self.num_draft_tokens, cache_scope=cache_scope, n=self.n, tools=self.tools,
            tool_choice=self.tool_choice, parallel_tool_calls=self.parallel_tool_calls,
            chat_template_kwargs=kwargs or None,
        )]


PromptList = Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
TokenIdsList = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]


class CompletionRequest(_SamplingFields):
    prompt: str | TokenIds | PromptList | TokenIdsList = Field(
        description="A string, a list of token ids, or a list of either (several prompts: their choices come in "
                    "prompt order, n each).")
    max_tokens: ScoreOrMaxTokens | None = Field(16, description="0 with echo: score the prompt, generate nothing.")
    logprobs: TopLogprobs | None = None
    echo: bool = Field(False, description="The prompt comes first; with logprobs, its tokens' logprobs too (the "
                                          "first is null).")
    best_of: int | None = Field(None, ge=1, description="Only best_of equal to n (or unset) is supported.")
    suffix: str | None = Field(None, max_length=0, description="Not supported: only an empty or absent suffix.")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: Any) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("only best_of equal to n is supported")
        return v

    @model_validator(mode="after")
    def _prompts_and_scoring(self) -> CompletionRequest:
        if any(not p for p in self.prompts()):
            raise ValueError("prompt must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 scores the prompt and needs echo")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts())

    def to_engine(self, default_max_tokens: int, timeout_s: float | None, request_id: str,
                  cache_scope: str) -> list[GenerationRequest]:
        """One engine request per prompt (the replica batches them), the first with ``request_id``."""
        return [GenerationRequest(
            model=self.model, **({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}),
            sampling=self.sampling(self.max_tokens, default_max_tokens, self.logprobs is not None, self.logprobs or 0),
            priority=self.priority, timeout_s=timeout_s, request_id=request_id if i == 0 else f"{request_id}-{i}",
            response_format=self.structured(), num_draft_tokens=self.num_draft_tokens, cache_scope=cache_scope,
            n=self.n, echo=self.echo, prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
        ) for i, p in enumerate(self.prompts())]


# -- responses ------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    draft_tokens: int | None = Field(None, description="Extension: tokens proposed by the draft model.")
    accepted_draft_tokens: int | None = Field(None, description="Extension: draft tokens the model accepted.")

    @classmethod
    def total(cls, chunks: list[GenerationChunk]) -> UsageInfo | None:
        """The usage of a request from its choices' last chunks: the prompt once, every choice's tokens."""
        usages = [c.usage for c in chunks if c.usage is not None]
        if not usages:
            return None
        first = usages[0]
        completion = sum(u.completion_tokens for u in usages)
        drafts = [u.draft_tokens for u in usages if u.draft_tokens is not None]
        accepted = [u.accepted_draft_tokens for u in usages if u.accepted_draft_tokens is not None]
        return cls(prompt_tokens=first.prompt_tokens, completion_tokens=completion,
                   total_tokens=first.prompt_tokens + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
                   draft_tokens=sum(drafts) if drafts else None, accepted_draft_tokens=sum(accepted) if accepted else None)


LOGPROB_FLOOR = -9999.0  # what a token the grammar or a bias ruled out (-inf) reports: JSON has no -inf (as vLLM)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobOut]

    @classmethod
    def of(cls, lps: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if lps is None:
            return None
        return cls(content=[ChatLogprobOut(
            token=lp.token, logprob=_finite(lp.logprob or 0.0), bytes=list(lp.token.encode()),
            top_logprobs=[TopLogprobOut(token=t.token, logprob=_finite(t.logprob), bytes=list(t.token.encode()))
                          for t in lp.top_logprobs],
        ) for lp in lps])


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # with echo, the first prompt token's is null
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token starts in the choice's text

    @classmethod
    def of(cls, chunk: GenerationChunk, offset: int = 0) -> CompletionLogprobs | None:
        """The prompt's logprobs (with echo) and the generated tokens', as one list; ``offset``: where
        this chunk's text starts in the choice's whole text."""
        if chunk.logprobs is None and chunk.prompt_logprobs is None:
            return None
        lps = [*(chunk.prompt_logprobs or []), *(chunk.logprobs or [])]
        offsets = []
        for lp in lps:
            offsets.append(offset)
            offset += len(lp.token)
        return cls(tokens=[lp.token for lp in lps], text_offset=offsets,
                   token_logprobs=[None if lp.logprob is None else _finite(lp.logprob) for lp in lps],
                   top_logprobs=[None if lp.logprob is None else {t.token: _finite(t.logprob) for t in lp.top_logprobs}
                                 for lp in lps])


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="The model's thought (DeepSeek / vLLM convention).")
    tool_calls: list[ToolCallOut] | None = None

    @classmethod
    def of(cls, chunk: GenerationChunk) -> AssistantMessage:
        calls = [ToolCallOut(id=c["id"] or "", function=FunctionCallOut(name=c["name"], arguments=c["arguments"]))
                 for c in assemble(chunk.tool_calls or [])]
        return cls(content=chunk.text or (None if calls else ""), reasoning_content=chunk.reasoning or None,
                   tool_calls=calls or None)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class FunctionDeltaOut(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDeltaOut

    @classmethod
    def of(cls, d: ToolCallDelta) -> ToolCallDeltaOut:
        """The first delta of a call carries its id, type and name (and empty arguments), as OpenAI sends it."""
        first = d.id is not None
        return cls(index=d.index, id=d.id, type="function" if first else None,
                   function=FunctionDeltaOut(name=d.name, arguments=d.arguments if d.arguments or first else None))


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-serving"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS, description="Rendered into the chat template.")
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int


class DetokenizeRequest(BaseModel):
    model: str
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ReplicaLoad(BaseModel):
    """A starting replica's progress: downloading its weights (bytes), then loading them."""

    replica: str
    phase: Literal["downloading", "loading"]
    done_bytes: int = 0
    total_bytes: int = 0
    updated_at: float = 0.0  # epoch seconds of the replica's last report

    def describe(self) -> str:
        if self.phase == "loading":
            return "loading weights"
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 0.0
        return f"downloading {pct:.0f}% of {size_text(self.total_bytes)}"


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class ModelStatus(BaseModel):
    name: str
    ready: bool
    replicas_healthy: int | None = None
    detail: str = ""
    replicas_target: int | None = None  # what the config asks for (autoscaling: min_replicas)
    degraded: bool = False  # fewer running replicas than replicas_target (a host is down), or a sharded replica lost a host
    autoscaling_target: int | None = None  # autoscaled models: the replicas Serve's autoscaler wants now
    loading: list[ReplicaLoad] = []  # replicas still starting: downloading or loading their weights
    lost_hosts: list[str] = []  # a sharded model's hosts with no live node: its replica waits for them


class ReadyResponse(BaseModel):
    ready: bool
    models: list[ModelStatus]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
