"""The API contract: every request and response body of the gateway, and the one error shape."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PROMPT_CHARS = 8192
MAX_TOKENS_LIMIT = 2048  # the language model handler's own cap (service/archive.py)
MAX_STOP = 4
MAX_STOP_CHARS = 32


MAX_LOGPROBS = 5
MAX_STATE_CHARS = 131072  # a signed state of a served model is far smaller (lm-shakespeare: 11k in fp32)
SESSION_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
SessionId = Annotated[str, Field(pattern=SESSION_PATTERN, description="letters, digits and _.:- (1 to 64)")]


class StrictModel(BaseModel):
    # unknown fields and wrong JSON types ("12" for 12) are mistakes of the caller: say so
    model_config = ConfigDict(extra="forbid", strict=True)


# -- errors -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int  # the HTTP status the error stands for (an SSE error event: the status it would have had)


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


class ContinuationFields(StrictModel):
    """Continuing a text the model read before, from a session the server holds or a state the client holds."""
    session: SessionId | None = Field(
        None, description="continue this session's text (a new id starts one); its text grows by the prompt "
                          "and the generation")
    state: str | None = Field(None, max_length=MAX_STATE_CHARS,
                              description="continue from a state an earlier response returned")
    return_state: bool = Field(False, description="return the final state: pass it as `state` to continue")

    @model_validator(mode="after")
    def _one_origin(self):
        if self.session is not None and self.state is not None:
            raise ValueError("send either session or state, not both")
        return self

    @property
    def continues(self) -> bool:
        return self.session is not None or self.state is not None or self.return_state


class GenerateRequest(SamplingFields, ContinuationFields):
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
    session: str | None = None
    state: str | None = Field(None, description="with return_state: the state after this text, signed")


class GenerateChunk(BaseModel):
    """One SSE event of a streamed generation; the last carries finish_reason and usage."""
    id: str
    model: str
    text: str
    finish_reason: Literal["length", "stop"] | None = None
    usage: Usage | None = None
    session: str | None = None
    state: str | None = None

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


class CompletionRequest(SamplingFields, ContinuationFields):
    model: str = Field(..., min_length=1, max_length=128)
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        "", description=f"a string or up to {MAX_PROMPTS} strings")
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="generate this many per prompt, return the n "
                                                                   "with the highest logprob per token")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="per token: its logprob and this many most likely alternatives")
    echo: bool = Field(False, description="the prompt before the completion (with its logprobs when asked)")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted for compatibility, not used")

    @model_validator(mode="after")
    def _fan_out(self) -> "CompletionRequest":
        if len(self.prompts) * self.n > MAX_N:
            raise ValueError(f"prompts x n must be at most {MAX_N}; send fewer prompts or a smaller n")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError("best_of must be at least n")
            if len(self.prompts) * self.best_of > MAX_N:
                raise ValueError(f"prompts x best_of must be at most {MAX_N}")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of larger than n cannot be streamed: the best are known at the end")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.continues and (len(self.prompts) != 1 or self.n != 1 or (self.best_of or 1) != 1):
            raise ValueError("session, state and return_state continue one text: one prompt, n=1, no best_of")
        return self

    @property
    def candidates_per_prompt(self) -> int:
        return max(self.n, self.best_of or 1)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def choices(self) -> list[tuple[int, str, dict]]:
        """(prompt index, prompt, upstream body) for every candidate completion, `candidates_per_prompt` per
        prompt in order; several with a seed use seed + j."""
        out = []
        for p_i, prompt in enumerate(self.prompts):
            for j in range(self.candidates_per_prompt):
                body = self.upstream_body(prompt)
                if self.seed is not None and j:
                    body["seed"] = (self.seed + j) % 2**63
                if self.logprobs is not None or (self.best_of or 1) > self.n:
                    body["logprobs"] = self.logprobs or 0  # best_of ranks by the logprobs
                if self.echo and self.logprobs is not None:
                    body["echo"] = True
                out.append((p_i, prompt, body))
        return out


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: one entry per token of the choice's text."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


CONTINUATION = {"session", "state"}  # extension fields, sent only to requests that continue a text


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session: str | None = None
    state: str | None = None

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
    beam_size: int = Field(4, ge=1, le=MAX_BEAM, description="1 = greedy (default: 4, or n_best when that is larger)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TRANSLATION_TOKENS,
                                   description="output tokens per text (default: 2 x source tokens + 10)")
    length_penalty: float = Field(0.6, ge=0.0, le=2.0, description="GNMT alpha: higher favours longer output")
    return_attention: bool = Field(False, description="per output token, attention weights over the source tokens")
    return_alignment: bool = Field(False, description="per output token, the index of its most-attended source token")
    n_best: int = Field(1, ge=1, le=MAX_BEAM, description="hypotheses per text with their logprobs (at most beam_size)")
    target_prefix: str | None = Field(None, max_length=MAX_TEXT_CHARS,
                                      description="the translation starts with this text and continues it")
    stream: bool = False

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "translate-de-en", "text": "Ein Mann fährt Fahrrad.", "beam_size": 4}]})

    @model_validator(mode="after")
    def _stream_one(self) -> "TranslateRequest":
        if self.stream and isinstance(self.text, list) and len(self.text) != 1:
            raise ValueError("stream=true translates one text; send a single string or stream=false")
        if self.n_best > self.beam_size:
            if "beam_size" in self.model_fields_set:
                raise ValueError(f"n_best ({self.n_best}) must be at most beam_size ({self.beam_size}); ask for "
                                 f"beam_size {self.n_best} or more")
            self.beam_size = self.n_best  # n_best alone widens the default beam (4) to hold that many hypotheses
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)

    def upstream_body(self) -> dict:
        body = {"texts": self.texts, "beam_size": self.beam_size, "length_penalty": self.length_penalty,
                "return_attention": self.return_attention, "return_alignment": self.return_alignment,
                "n_best": self.n_best}
        if self.target_prefix is not None:
            body["target_prefix"] = self.target_prefix
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


class Hypothesis(BaseModel):
    text: str
    logprob: float = Field(description="natural log of P(text | source)")
    score: float = Field(description="logprob / GNMT length penalty: what ranks the hypotheses")


class Translation(BaseModel):
    text: str
    finish_reason: Literal["length", "stop"]
    tokens: list[str]
    source_tokens: list[str]
    logprob: float | None = None
    attention: list[list[float]] | None = None
    alignment: list[int] | None = None
    hypotheses: list[Hypothesis] | None = None


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


# -- scoring ----------------------------------------------------------------------------------------
MAX_CANDIDATES = 16


class ScoreRequest(StrictModel):
    """A language model scores `text` (or ranks `candidates`); a translation model scores each of
    `candidates` as a translation of `source` (forced decoding)."""
    model: str = Field(..., min_length=1, max_length=128)
    text: Prompt | None = Field(None, description="language models: the text to score")
    source: Text | None = Field(None, description="translation models: the source text")
    candidates: Annotated[list[Prompt], Field(min_length=1, max_length=MAX_CANDIDATES)] | None = Field(
        None, description=f"up to {MAX_CANDIDATES} texts to score and rank")
    token_logprobs: bool = Field(False, description="each token's logprob too")
    length_penalty: float = Field(0.6, ge=0.0, le=2.0, description="translation: GNMT alpha of the score")

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "lm-shakespeare", "candidates": ["To be, or not to be", "be not or To, to be"]},
        {"model": "translate-de-en", "source": "Ein Hund rennt.", "candidates": ["A dog runs.", "A runs dog."]}]})


class TokenLogprob(BaseModel):
    token: str
    logprob: float


class ScoreItem(BaseModel):
    text: str
    logprob: float = Field(description="natural log of the text's probability (translation: given the source)")
    tokens: int
    perplexity: float | None = Field(None, description="exp(-logprob / tokens)")
    score: float | None = Field(None, description="translation: logprob / GNMT length penalty")
    token_logprobs: list[TokenLogprob] | None = None


class ScoreResponse(BaseModel):
    id: str
    model: str
    logprob: float | None = Field(None, description="`text` scored: its logprob, tokens and perplexity")
    tokens: int | None = None
    perplexity: float | None = None
    token_logprobs: list[TokenLogprob] | None = None
    scores: list[ScoreItem] | None = Field(None, description="`candidates` scored, in the order sent")
    usage: Usage


# -- sessions ---------------------------------------------------------------------------------------
class SessionInfo(BaseModel):
    id: str
    model: str
    tokens: int = Field(description="tokens the session's state has read")
    bytes: int = Field(description="bytes the server holds for it")
    created: int
    last_used: int


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class ForkRequest(StrictModel):
    id: SessionId | None = Field(None, description="the new session's id (default: a new random one)")
