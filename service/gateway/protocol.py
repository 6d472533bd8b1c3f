"""The API contract: every request and response body of the gateway, and the one error shape."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PROMPT_CHARS = 8192
MAX_TOKENS_LIMIT = 2048  # the language model handler's own cap (service/archive.py)
MAX_STOP = 4
MAX_STOP_CHARS = 32


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class StrictModel(BaseModel):
    # unknown fields and wrong JSON types ("12" for 12) are mistakes of the caller: say so
    model_config = ConfigDict(extra="forbid", strict=True)


# -- errors -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- generation ---------------------------------------------------------------------------------
class SamplingFields(StrictModel):
    max_tokens: int = Field(128, ge=1, le=MAX_TOKENS_LIMIT, description="characters to generate")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, le=1000, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"up to {MAX_STOP} strings that end the text")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same text")

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        return [v] if isinstance(v, str) else list(v or [])

    def upstream_body(self, prompt: str) -> dict:
        """The handler's request body (rnnserve.service.handlers.frames.GENERATE_FIELDS)."""
        return {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "stop": self.stop or [], "seed": self.seed}


class GenerateRequest(SamplingFields):
    model: str = Field(..., min_length=1, max_length=128)
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    stream: bool = False

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "lm-shakespeare", "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0.8, "stream": True}]})


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: Literal["length", "stop"]
    usage: Usage


class GenerateChunk(BaseModel):
    """One SSE event of a streamed generation; the last carries finish_reason and usage."""
    id: str
    model: str
    text: str
    finish_reason: Literal["length", "stop"] | None = None
    usage: Usage | None = None

    @staticmethod
    def text_event(id: str, model: str, text: str) -> dict:
        """`GenerateChunk(id=, model=, text=).model_dump(exclude_none=True)` without building a model:
        this runs for every frame of every stream (tests check the two agree)."""
        return {"id": id, "model": model, "text": text}


# -- models -------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rnnserve"
    task: str
    cell: str
    vocab_size: int
    limits: dict[str, int]
    languages: dict[str, str] | None = Field(None, description="translation: source and target language codes")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    models: dict[str, str] = {}


# -- OpenAI-compatible completions ----------------------------------------------------------------
MAX_PROMPTS = 8
MAX_N = 8


class StreamOptions(StrictModel):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    model: str = Field(..., min_length=1, max_length=128)
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        "", description=f"a string or up to {MAX_PROMPTS} strings")
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted for compatibility, not used")

    @model_validator(mode="after")
    def _fan_out(self) -> "CompletionRequest":
        if len(self.prompts) * self.n > MAX_N:
            raise ValueError(f"prompts x n must be at most {MAX_N}; send fewer prompts or a smaller n")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def choices(self) -> list[tuple[int, str, dict]]:
        """(choice index, prompt, upstream body) for every completion; n > 1 with a seed uses seed + j."""
        out = []
        for p_i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                body = self.upstream_body(prompt)
                if self.seed is not None and j:
                    body["seed"] = (self.seed + j) % 2**63
                out.append((p_i * self.n + j, prompt, body))
        return out


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["length", "stop"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @staticmethod
    def text_event(id: str, created: int, model: str, index: int, text: str) -> dict:
        """The `model_dump()` of a streamed chunk with one choice's new text, built directly (per frame)."""
        return {"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": None}], "usage": None}


# -- translation ----------------------------------------------------------------------------------
MAX_TEXTS = 64
MAX_TEXT_CHARS = 1000
MAX_BEAM = 8
MAX_TRANSLATION_TOKENS = 256
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class TranslateRequest(StrictModel):
    model: str = Field(..., min_length=1, max_length=128)
    text: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)] = Field(
        ..., description=f"one text or up to {MAX_TEXTS}")
    beam_size: int = Field(4, ge=1, le=MAX_BEAM, description="1 = greedy")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TRANSLATION_TOKENS,
                                   description="output tokens per text (default: 2 x source tokens + 10)")
    length_penalty: float = Field(0.6, ge=0.0, le=2.0, description="GNMT alpha: higher favours longer output")
    return_attention: bool = Field(False, description="per output token, attention weights over the source tokens")
    stream: bool = False

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "translate-de-en", "text": "Ein Mann fährt Fahrrad.", "beam_size": 4}]})

    @model_validator(mode="after")
    def _stream_one(self) -> "TranslateRequest":
        if self.stream and isinstance(self.text, list) and len(self.text) != 1:
            raise ValueError("stream=true translates one text; send a single string or stream=false")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)

    def upstream_body(self) -> dict:
        body = {"texts": self.texts, "beam_size": self.beam_size, "length_penalty": self.length_penalty,
                "return_attention": self.return_attention}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


class Translation(BaseModel):
    text: str
    finish_reason: Literal["length", "stop"]
    tokens: list[str]
    source_tokens: list[str]
    attention: list[list[float]] | None = None


class TranslateResponse(BaseModel):
    id: str
    model: str
    translations: list[Translation]
    usage: Usage


class TranslateChunk(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: Literal["length", "stop"] | None = None
    translation: Translation | None = None
    usage: Usage | None = None

    @staticmethod
    def text_event(id: str, model: str, text: str) -> dict:
        """The `model_dump(exclude_none=True)` of a chunk with new text only, built directly (per frame)."""
        return {"id": id, "model": model, "text": text}
