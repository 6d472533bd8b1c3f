"""HTTP routes: validate, call the generation service, return a typed model."""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic_core import to_json

from rnnserve.service.gateway.continuation import Continuation, begin
from rnnserve.service.gateway.cost import generation_cost, score_cost, translation_cost, translation_score_cost
from rnnserve.service.gateway.deps import (MetricsDep, ReadinessDep, RegistryDep, RequestIdDep, owner,
                                         require_api_key)
from rnnserve.service.gateway.errors import invalid
from rnnserve.service.gateway.generation import (Context, EventStream, Run, collect_unless_disconnected, frame_text,
                                                 sse_stream, start)
from rnnserve.service.gateway.protocol import (CONTINUATION, SESSION_PATTERN, CompletionChoice, CompletionLogprobs,
                                               CompletionRequest, CompletionResponse, ErrorResponse, ForkRequest,
                                               GenerateChunk, GenerateRequest, GenerateResponse, Health, ModelList,
                                               ScoreRequest, ScoreResponse, SessionInfo, SessionList,
                                               TranslateChunk, TranslateRequest, TranslateResponse, Translation,
                                               Usage)
from rnnserve.service.gateway.sessions import Session, call

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 502, 503, 504)}
SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or Server-Sent Events when stream=true"}}

router = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    """The gateway process is alive (it says nothing of the models)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
async def readyz(readiness: ReadinessDep) -> JSONResponse:
    """Ready once every served model has answered a real inference through TorchServe."""
    body = Health(status="ready" if readiness.ready else "not ready", models=dict(readiness.status))
    return JSONResponse(body.model_dump(), status_code=200 if readiness.ready else 503)


@api.get("/metrics", tags=["health"], response_class=Response)
async def metrics_route(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[m.card() for m in registry.models.values()])


def _context(state, model: str, route: str, request_id: str) -> Context:
    return Context(state.upstream, state.metrics, state.admissions[model], model, route, request_id,
                   time.monotonic() + state.settings.request_timeout_s)


def _usage(runs: list[Run]) -> Usage:
    p = sum(int((r.final or {}).get("usage", {}).get("prompt_tokens", 0)) for r in runs)
    c = sum(int((r.final or {}).get("usage", {}).get("completion_tokens", 0)) for r in runs)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _json(body: dict) -> Response:
    """A large answer (megabytes of logprobs) as JSON at once: pydantic-core's encoder, several times faster
    than the json module and without validating the route's model again, so that building it holds the
    event loop, and every other request's stream, for as short a time as possible."""
    return Response(to_json(body), media_type="application/json")


def _stream(events: AsyncIterator[bytes], ctx: Context) -> EventStream:
    return EventStream(events, ctx.deadline)


async def _start(ctx: Context, bodies: list[dict], cont: Continuation | None, costs: list[int]):
    try:
        return await start(ctx, bodies, costs)
    except BaseException:
        if cont is not None:
            await cont.release()
        raise


@dataclass
class Opened:
    """A generation request whose runs have started (admitted, first frames in): what its answer is made of."""
    ctx: Context
    started: list[tuple[Run, dict]]
    cont: Continuation | None
    choices: list[tuple[int, str, dict]] = field(default_factory=list)  # completions: (prompt index, prompt, body)
    created: int = 0  # completions: the answer's time


# The generation routes in two steps, `open_*` (the model's limits, the continuation, admission, the first
# frames) and `*_events` (a stream's SSE body), which the FastAPI routes below and the streamed requests'
# fast path (fastpath.py) share. `request` is only read for a request that continues a text (its key's
# sessions and states): None on the fast path, which takes no such request.

async def open_generate(state, req: GenerateRequest, request_id: str, request: Request | None) -> Opened:
    state.registry.get(req.model, "lm").check_generate(req.max_tokens, [req.prompt])
    ctx = _context(state, req.model, "generate", request_id)
    body = req.upstream_body(req.prompt)
    cont = await begin(request, req.model, req, body)
    return Opened(ctx, await _start(ctx, [body], cont, [generation_cost(req.prompt, req.max_tokens)]), cont)


def generate_events(req: GenerateRequest, opened: Opened) -> AsyncIterator[bytes]:
    request_id, cont = opened.ctx.request_id, opened.cont

    def render(run: Run, frame: dict) -> list[dict]:
        text = frame_text(frame)
        if not frame.get("finish_reason"):
            return [GenerateChunk.text_event(request_id, req.model, text)] if text else []
        return [GenerateChunk(id=request_id, model=req.model, text=text, finish_reason=frame["finish_reason"],
                              usage=_usage([run]), session=req.session,
                              state=cont.state if cont else None).model_dump(exclude_none=True)]

    return sse_stream(opened.started, render, on_final=cont.end if cont else None,
                      on_close=cont.release if cont else None)


@api.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=True, tags=["generation"],
          responses=SSE)
async def generate(req: GenerateRequest, request: Request, request_id: RequestIdDep):
    """Generate text after `prompt`. With `stream: true`: `data: {"text": ...}` per chunk, a last
    event with `finish_reason` and `usage`, then `data: [DONE]`. With `session` or `state` the prompt
    continues an earlier text; `return_state` returns the state to continue from."""
    opened = await open_generate(request.app.state, req, request_id, request)
    if req.stream:
        return _stream(generate_events(req, opened), opened.ctx)
    cont = opened.cont
    try:
        done = await collect_unless_disconnected(request, opened.started)
        if done is None:
            return Response(status_code=499)  # nobody is listening
        ((run, text),) = done
        if cont is not None:
            await cont.end(run.final)
    finally:
        if cont is not None:
            await cont.release()
    return GenerateResponse(id=request_id, model=req.model, text=text, finish_reason=run.finish_reason,
                            usage=_usage([run]), session=req.session, state=cont.state if cont else None)


def _completion_logprobs(entries: list[dict], offset: int, top: bool) -> tuple[CompletionLogprobs, int]:
    """Handler logprob entries as OpenAI's legacy shape; `offset` is where their text starts in the choice."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        offsets.append(offset)
        offset += len(e["token"])
        if e["logprob"] is None:
            tops.append(None)
        else:
            tops.append({**{t: lp for t, lp in e.get("top") or []}, e["token"]: e["logprob"]})
    # built without validation: the handler's own numbers, up to 8 x 10,240 entries per answer
    return CompletionLogprobs.model_construct(tokens=tokens, token_logprobs=lps, top_logprobs=tops if top else None,
                              text_offset=offsets), offset


def _mean_logprob(run: Run) -> float:
    return float((run.final or {}).get("cumulative_logprob", -math.inf)) / max(1, len(run.logprobs))


async def open_completions(state, req: CompletionRequest, request_id: str, request: Request | None) -> Opened:
    state.registry.get(req.model, "lm").check_generate(req.max_tokens, req.prompts)
    ctx = _context(state, req.model, "completions", request_id)
    choices = req.choices()
    cont = await begin(request, req.model, req, choices[0][2])
    costs = [generation_cost(prompt, req.max_tokens, bool(body.get("echo"))) for _, prompt, body in choices]
    started = await _start(ctx, [body for _, _, body in choices], cont, costs)
    return Opened(ctx, started, cont, choices, int(time.time()))


def completion_events(req: CompletionRequest, opened: Opened) -> AsyncIterator[bytes]:
    cid, created, cont, choices, echo = f"cmpl-{opened.ctx.request_id}", opened.created, opened.cont, \
        opened.choices, req.echo
    offsets: dict[int, int] = {}  # per run: where the next chunk's text starts in its choice

    def chunk(choice: CompletionChoice | None, usage: Usage | None = None, final: bool = False) -> dict:
        extra = {"session": req.session, "state": cont.state} if final and cont else {}
        return CompletionResponse(id=cid, created=created, model=req.model, choices=[choice] if choice else [],
                                  usage=usage, **extra).model_dump(exclude=None if extra else CONTINUATION)

    def render(run: Run, frame: dict) -> list[dict]:
        text = frame_text(frame)
        entries = frame.get("logprobs") or []
        if run.index not in offsets:  # the run's first frame
            offsets[run.index] = 0
            if echo:
                text = choices[run.index][1] + text
                entries = (frame.get("prompt_logprobs") or []) + entries
        logprobs = None
        if req.logprobs is not None:
            logprobs, offsets[run.index] = _completion_logprobs(entries, offsets[run.index], True)
        if not frame.get("finish_reason"):
            if not text:
                return []
            if logprobs is None:
                return [CompletionResponse.text_event(cid, created, req.model, run.index, text)]
            return [chunk(CompletionChoice(text=text, index=run.index, logprobs=logprobs))]
        return [chunk(CompletionChoice(text=text, index=run.index, logprobs=logprobs,
                                       finish_reason=frame["finish_reason"]), final=True)]

    def trailer() -> list[dict]:
        if req.stream_options and req.stream_options.include_usage:
            return [chunk(None, _usage([r for r, _ in opened.started]))]
        return []

    return sse_stream(opened.started, render, trailer, on_final=cont.end if cont else None,
                      on_close=cont.release if cont else None)


@api.post("/v1/completions", response_model=CompletionResponse, tags=["generation"], responses=SSE)
async def completions(req: CompletionRequest, request: Request, request_id: RequestIdDep):
    """OpenAI-compatible text completions (the official `openai` client works against it), with
    `logprobs`, `echo` and `best_of`; `session`, `state` and `return_state` as in /v1/generate."""
    opened = await open_completions(request.app.state, req, request_id, request)
    if req.stream:
        return _stream(completion_events(req, opened), opened.ctx)
    cont, echo = opened.cont, req.echo
    try:
        done = await collect_unless_disconnected(request, opened.started)
        if done is None:
            return Response(status_code=499)  # nobody is listening
        if cont is not None:
            await cont.end(done[0][0].final)
    finally:
        if cont is not None:
            await cont.release()
    per_prompt = req.candidates_per_prompt
    out = []
    for p_i, prompt in enumerate(req.prompts):
        group = done[p_i * per_prompt: (p_i + 1) * per_prompt]
        if len(group) > req.n:  # best_of: the n with the highest logprob per token
            group = sorted(group, key=lambda rt: _mean_logprob(rt[0]), reverse=True)[: req.n]
        for j, (run, text) in enumerate(group):
            logprobs = None
            if req.logprobs is not None:
                logprobs, _ = _completion_logprobs((run.prompt_logprobs if echo else []) + run.logprobs, 0, True)
            out.append(CompletionChoice(text=(prompt if echo else "") + text, index=p_i * req.n + j,
                                        logprobs=logprobs, finish_reason=run.finish_reason))
    resp = CompletionResponse(id=f"cmpl-{request_id}", created=opened.created, model=req.model,
                              usage=_usage([r for r, _ in done]), choices=out, session=req.session,
                              state=cont.state if cont else None)
    # the extension fields only for requests that continue a text: others get OpenAI's exact shape
    return _json(resp.model_dump(exclude=None if cont else CONTINUATION))


@api.post("/v1/translate", response_model=TranslateResponse, tags=["translation"], responses=SSE)
async def translate(req: TranslateRequest, request: Request, registry: RegistryDep, request_id: RequestIdDep):
    """Translate one text or a list. With `stream: true` (one text): `data: {"text": ...}` as the
    words every beam agrees on become final, a last event with the whole `translation`, then `[DONE]`."""
    info = registry.get(req.model, "translation")
    info.check_translate(req.texts, req.max_tokens)
    ctx = _context(request.app.state, req.model, "translate", request_id)
    cost = translation_cost(req.texts, req.beam_size, req.max_tokens, info.limits["max_tokens"], req.target_prefix)
    started = await start(ctx, [req.upstream_body()], [cost])
    if not req.stream:
        done = await collect_unless_disconnected(request, started)
        if done is None:
            return Response(status_code=499)  # nobody is listening
        ((run, _),) = done
        return TranslateResponse(id=request_id, model=req.model, usage=_usage([run]),
                                 translations=[Translation(**t) for t in run.final["translations"]])

    def render(run: Run, frame: dict) -> list[dict]:
        text = frame_text(frame)
        if frame.get("finish_reason"):
            t = Translation(**frame["translations"][0])
            return [TranslateChunk(id=request_id, model=req.model, text=text, finish_reason=t.finish_reason,
                                   translation=t, usage=_usage([run])).model_dump()]
        return [TranslateChunk.text_event(request_id, req.model, text)] if text else []

    return _stream(sse_stream(started, render), ctx)


@api.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, tags=["scoring"])
async def score(req: ScoreRequest, request: Request, registry: RegistryDep, request_id: RequestIdDep):
    """The log-probability of texts under a model. Language model: `text` (its logprob, tokens and
    perplexity) or `candidates` (each scored, to rank them). Translation model: each of `candidates`
    as a translation of `source`, log P(candidate | source) by forced decoding."""
    info = registry.get(req.model, None)
    if info.task == "lm":
        if req.source is not None:
            raise invalid("source is for translation models; a language model scores text or candidates", "source")
        if (req.text is None) == (req.candidates is None):
            raise invalid("send either text (one text) or candidates (texts to rank)", "text")
        texts = [req.text] if req.text is not None else req.candidates
        info.check_generate(1, texts)
        body = {"task": "score", "texts": texts, "token_logprobs": req.token_logprobs}
        cost = score_cost(texts)
    else:
        if req.text is not None:
            raise invalid("a translation model scores candidates against a source; send source and candidates",
                          "text")
        if req.source is None or req.candidates is None:
            raise invalid("send source and candidates", "source" if req.source is None else "candidates")
        info.check_translate([req.source, *req.candidates], None)
        body = {"task": "score", "source": req.source, "candidates": req.candidates,
                "length_penalty": req.length_penalty, "token_logprobs": req.token_logprobs}
        cost = translation_score_cost(req.source, req.candidates)
    ctx = _context(request.app.state, req.model, "score", request_id)
    done = await collect_unless_disconnected(request, await start(ctx, [body], [cost]))
    if done is None:
        return Response(status_code=499)  # nobody is listening
    ((run, _),) = done
    usage = _usage([run]).model_dump()
    scores = []
    for i, item in enumerate(run.final["scores"]):  # plain dicts: up to 16 x 8,192 token logprobs
        if info.task == "lm":
            item = {**item, "perplexity": math.exp(-item["logprob"] / item["tokens"]) if item["tokens"] else None}
            if req.token_logprobs:  # they came as the texts were read, in the frames before the last
                item["token_logprobs"] = run.score_logprobs.get(i, [])
        scores.append({k: v for k, v in item.items() if v is not None})
    if req.text is not None:
        one = scores[0]
        return _json({"id": request_id, "model": req.model, **{k: v for k, v in one.items() if k != "text"},
                      "usage": usage})
    return _json({"id": request_id, "model": req.model, "scores": scores, "usage": usage})


SessionPath = Annotated[str, Path(pattern=SESSION_PATTERN)]


def _info(s: Session) -> SessionInfo:
    return SessionInfo(id=s.id, model=s.model, tokens=s.tokens, bytes=s.nbytes, created=int(s.created),
                       last_used=int(s.last_used))


@api.get("/v1/sessions", response_model=SessionList, tags=["sessions"])
async def list_sessions(request: Request) -> SessionList:
    """The sessions of the caller's API key."""
    sessions = await call(request.app.state.sessions, "list", owner(request))
    return SessionList(data=[_info(s) for s in sessions])


@api.get("/v1/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
async def get_session(session_id: SessionPath, request: Request) -> SessionInfo:
    return _info(await call(request.app.state.sessions, "get", owner(request), session_id))


@api.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(session_id: SessionPath, request: Request) -> Response:
    await call(request.app.state.sessions, "delete", owner(request), session_id)
    return Response(status_code=204)


@api.post("/v1/sessions/{session_id}/fork", response_model=SessionInfo, status_code=201, tags=["sessions"])
async def fork_session(session_id: SessionPath, req: ForkRequest, request: Request) -> SessionInfo:
    """A new session that continues from this one's state; the two then go their own ways."""
    return _info(await call(request.app.state.sessions, "fork", owner(request), session_id,
                                         req.id or uuid.uuid4().hex))

