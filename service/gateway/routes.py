"""HTTP routes: validate, call the generation service, return a typed model."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rnnserve.service.gateway.deps import (MetricsDep, ReadinessDep, RegistryDep, RequestIdDep, SettingsDep,
                                           UpstreamDep, require_api_key)
from rnnserve.service.gateway.generation import Run, collect, first_frame, sse_events
from rnnserve.service.gateway.protocol import (ErrorResponse, GenerateChunk, GenerateRequest, GenerateResponse,
                                               Health, ModelList, Usage)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 502, 503, 504)}
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


@api.post("/v1/generate", response_model=GenerateResponse, tags=["generation"],
          responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
async def generate(req: GenerateRequest, registry: RegistryDep, upstream: UpstreamDep, metrics: MetricsDep,
                   settings: SettingsDep, request_id: RequestIdDep):
    """Generate text after `prompt`. With `stream: true` the answer is Server-Sent Events:
    `data: {"text": ...}` per chunk, a last event with `finish_reason` and `usage`, then `data: [DONE]`."""
    registry.get(req.model, "lm")
    run = Run(upstream, metrics, req.model, req.upstream_body(req.prompt), request_id, settings.request_timeout_s)
    if not req.stream:
        text, finish_reason, usage = await collect(run, "generate")
        return GenerateResponse(id=request_id, model=req.model, text=text, finish_reason=finish_reason,
                                usage=_usage(usage))
    first = await first_frame(run, "generate")

    def render(frame: dict) -> dict | None:
        if not frame.get("text") and not frame.get("finish_reason"):
            return None
        usage = _usage(frame["usage"]) if frame.get("finish_reason") else None
        return GenerateChunk(id=request_id, model=req.model, text=frame.get("text", ""),
                             finish_reason=frame.get("finish_reason"), usage=usage).model_dump(exclude_none=True)

    return StreamingResponse(sse_events(run, "generate", first, render), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def _usage(u: dict) -> Usage:
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


router.include_router(api)
