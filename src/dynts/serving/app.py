"""The HTTP routes (FastAPI) over an OpenAIService: OpenAI's endpoints under /v1, /health and /metrics.

The service is anything with the OpenAIService surface used here (chat, completions, models, healthy, metrics):
the local one, or ray_serve.py's, which forwards to engine replicas.

Every error leaves as OpenAI's envelope, whatever raised it: a bad body (400, never FastAPI's 422), a missing or
wrong key (401), an unknown route or model (404), a body over the size limit (413), a full queue (503 with
Retry-After). /health and /metrics need no key, as in vLLM.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynts import __version__
from dynts.serving.errors import APIError, envelope
from dynts.serving.service import ClientGone, JSONReply, OpenAIService

log = logging.getLogger("dynts.serve")
MAX_BODY_BYTES = 8 * 2**20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def check_key(request: Request, api_key: str | None) -> None:
    """Bearer authentication, compared in constant time."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes")
    return bytes(body)


def build_app(service: OpenAIService, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="dynts", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return error_response(APIError(exc.status_code, str(message)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(envelope(f"internal error: {type(exc).__name__}", "internal_server_error", None, 500), 500)

    async def generate(request: Request, endpoint) -> Response:
        check_key(request, api_key)
        body = await read_body(request, max_body_bytes)
        try:
            reply = await endpoint(body, request.is_disconnected)
        except ClientGone:
            return Response(status_code=499)
        if isinstance(reply, JSONReply):
            return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        return StreamingResponse(reply.events, media_type="text/event-stream", headers={**SSE_HEADERS, **reply.headers})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, service.chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, service.completions)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, api_key)
        return await service.models()

    @app.get("/health")
    async def health():
        if not await service.healthy():
            raise APIError(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(await service.render_metrics(), media_type=service.metrics_content_type)

    return app
