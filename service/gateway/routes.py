"""HTTP routes: validate, call the generation service, return a typed model."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rnnserve.service.gateway.deps import (MetricsDep, ReadinessDep, RegistryDep, RequestIdDep, require_api_key)
from rnnserve.service.gateway.generation import (Context, Run, collect_unless_disconnected, frame_text, sse_stream,
                                                 start)
from rnnserve.service.gateway.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse,
                                               GenerateChunk, GenerateRequest, GenerateResponse, Health, ModelList,
                                               TranslateChunk, TranslateRequest, TranslateResponse, Translation,
                                               Usage)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 502, 503, 504)}
SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or Server-Sent Events when stream=true"}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

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
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[m.card() for m in registry.models.values()])


def _context(request: Request, model: str, route: str, request_id: str) -> Context:
    state = request.app.state
    return Context(state.upstream, state.metrics, state.admissions[model], model, route, request_id,
                   time.monotonic() + state.settings.request_timeout_s)


def _usage(runs: list[Run]) -> Usage:
    p = sum(int((r.final or {}).get("usage", {}).get("prompt_tokens", 0)) for r in runs)
    c = sum(int((r.final or {}).get("usage", {}).get("completion_tokens", 0)) for r in runs)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


@api.post("/v1/generate", response_model=GenerateResponse, tags=["generation"], responses=SSE)
async def generate(req: GenerateRequest, request: Request, registry: RegistryDep, request_id: RequestIdDep):
    """Generate text after `prompt`. With `stream: true`: `data: {"text": ...}` per chunk, a last
    event with `finish_reason` and `usage`, then `data: [DONE]`."""
    registry.get(req.model, "lm").check_generate(req.max_tokens, [req.prompt])
    ctx = _context(request, req.model, "generate", request_id)
    started = await start(ctx, [req.upstream_body(req.prompt)])
    if not req.stream:
        done = await collect_unless_disconnected(request, started)
        if done is None:
            return Response(status_code=499)  # nobody is listening
        ((run, text),) = done
        return GenerateResponse(id=request_id, model=req.model, text=text, finish_reason=run.finish_reason,
                                usage=_usage([run]))

    def render(run: Run, frame: dict) -> list[dict]:
        text = frame_text(frame)
        if not frame.get("finish_reason"):
            return [GenerateChunk.text_event(request_id, req.model, text)] if text else []
        return [GenerateChunk(id=request_id, model=req.model, text=text, finish_reason=frame["finish_reason"],
                              usage=_usage([run])).model_dump(exclude_none=True)]

    return _stream(sse_stream(started, render))


@api.post("/v1/completions", response_model=CompletionResponse, tags=["generation"], responses=SSE)
async def completions(req: CompletionRequest, request: Request, registry: RegistryDep, request_id: RequestIdDep):
    """OpenAI-compatible text completions (the official `openai` client works against it)."""
    registry.get(req.model, "lm").check_generate(req.max_tokens, req.prompts)
    ctx = _context(request, req.model, "completions", request_id)
    choices = req.choices()
    started = await start(ctx, [body for _, _, body in choices])
    cid, created = f"cmpl-{request_id}", int(time.time())
    if not req.stream:
        done = await collect_unless_disconnected(request, started)
        if done is None:
            return Response(status_code=499)  # nobody is listening
        return CompletionResponse(id=cid, created=created, model=req.model, usage=_usage([r for r, _ in done]),
                                  choices=[CompletionChoice(text=text, index=choices[run.index][0],
                                                            finish_reason=run.finish_reason) for run, text in done])

    def chunk(choice: CompletionChoice | None, usage: Usage | None = None) -> dict:
        return CompletionResponse(id=cid, created=created, model=req.model, choices=[choice] if choice else [],
                                  usage=usage).model_dump()

    def render(run: Run, frame: dict) -> list[dict]:
        text = frame_text(frame)
        if not frame.get("finish_reason"):
            return [CompletionResponse.text_event(cid, created, req.model, choices[run.index][0], text)] if text else []
        return [chunk(CompletionChoice(text=text, index=choices[run.index][0], finish_reason=frame["finish_reason"]))]

    def trailer() -> list[dict]:
        if req.stream_options and req.stream_options.include_usage:
            return [chunk(None, _usage([r for r, _ in started]))]
        return []

    return _stream(sse_stream(started, render, trailer))


@api.post("/v1/translate", response_model=TranslateResponse, tags=["translation"], responses=SSE)
async def translate(req: TranslateRequest, request: Request, registry: RegistryDep, request_id: RequestIdDep):
    """Translate one text or a list. With `stream: true` (one text): `data: {"text": ...}` as the
    words every beam agrees on become final, a last event with the whole `translation`, then `[DONE]`."""
    registry.get(req.model, "translation").check_translate(req.texts, req.max_tokens)
    ctx = _context(request, req.model, "translate", request_id)
    started = await start(ctx, [req.upstream_body()])
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

    return _stream(sse_stream(started, render))


router.include_router(api)
