"""The API's own documentation, served with no network: `/docs` (Swagger UI), `/redoc` and
`/openapi.json` take the same API key as every API route (the contract says what a key may do), and
the pages' scripts and styles come from the `fastapi-offline` package, never from a CDN. The assets
themselves, a public library's files, are served without a key: a browser fetches them without the
`Authorization` header the pages were loaded with."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from rnnserve.service.gateway.deps import require_api_key

ASSETS = "/docs/assets"

router = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API",
                               swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url=f"{ASSETS}/favicon.png")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} API",
                          redoc_js_url=f"{ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{ASSETS}/favicon.png",
                          with_google_fonts=False)


def install_docs(app: FastAPI) -> None:
    """Call on an app made with docs_url, redoc_url and openapi_url set to None."""
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=str(resources.files("fastapi_offline") / "static")), name="docs-assets")
