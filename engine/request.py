"""The engine's boundary types: what a caller submits and what comes back.

Everything a client controls is validated here, before a request reaches the GPU thread; the HTTP
layer builds these from OpenAI bodies, so its 400s and the engine's agree.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Priority = Literal["interactive", "batch"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, name, ... pass through to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class SamplingParams(BaseModel):
    """OpenAI's sampling knobs plus mlx-lm's; bounds follow OpenAI where it has them."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("logit_bias may name at most 1024 tokens")
        for tok, bias in v.items():
            if tok < 0:
                raise ValueError(f"logit_bias token id {tok} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias value {bias} for token {tok} is outside [-100, 100]")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationRequest(BaseModel):
    """One generation: exactly one of ``prompt``, ``prompt_token_ids`` or ``messages``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    priority: Priority = "interactive"
    timeout_s: float | None = Field(None, gt=0.0)
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    num_draft_tokens: int | None = Field(
        None, ge=0, le=64, description="Speculative decoding: draft tokens per step (0 turns it off for this request).")
    # Structured output (see engine.structured); kept opaque here so this module stays light.
    response_format: dict[str, Any] | None = None

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
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    draft_tokens: int | None = None  # proposed by the draft model (speculative requests only)
    accepted_draft_tokens: int | None = None


class GenerationChunk(BaseModel):
    """A piece of one request's output. The last chunk carries ``finish_reason`` and ``usage``."""

    request_id: str
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None

    def merge(self, later: GenerationChunk) -> GenerationChunk:
        """Coalesce a later chunk into this one (a lagging consumer gets one item, not many)."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return GenerationChunk.model_construct(
            request_id=self.request_id,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            logprobs=logprobs,
            finish_reason=later.finish_reason,
            usage=later.usage,
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
