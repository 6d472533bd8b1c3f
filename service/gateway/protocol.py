"""The API contract: every request and response body of the gateway, and the one error shape."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PROMPT_CHARS = 8192
MAX_TOKENS_LIMIT = 2048  # the language model handler's own cap (service/archive.py)
MAX_STOP = 4
MAX_STOP_CHARS = 32


class StrictModel(BaseModel):
    # unknown fields are a mistake of the caller, not something to ignore silently
    model_config = ConfigDict(extra="forbid")


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
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end the text")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same text")

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    def upstream_body(self, prompt: str) -> dict:
        """The handler's request body (rnnserve.service.handlers.frames.GENERATE_FIELDS)."""
        return {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "stop": self.stop or [], "seed": self.seed}


class GenerateRequest(SamplingFields):
    model: str = Field(..., min_length=1, max_length=128)
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    stream: bool = False

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    models: dict[str, str] = {}

    @model_validator(mode="after")
    def _no_empty_status(self) -> "Health":
        if not self.status:
            raise ValueError("status must be set")
        return self
