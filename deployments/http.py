"""Flashtile's HTTP API: routes of a few lines each over a Service (deployments/service.py), and the error shape.

`create_app` builds the FastAPI app for one Service; the ingress deployment serves it, unit tests call it with
FastAPI's TestClient. Everything the app counts lives on the app, none of it in this module.
"""

import time

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics, sse
from deployments.errors import FlashtileError, classify, error
from deployments.guard import GuardMiddleware
from deployments.regions import HEADER
from deployments.schemas import (
    MEDIA_TYPES,
    GenerateRequest,
    GenerateResult,
    ImagesRequest,
    ImagesResponse,
    WatermarkDetectRequest,
    WatermarkDetectResult,
    describe_errors,
    error_responses,
)

BODY_MODELS = {"/v1/images/generations": ImagesRequest, "/v1/watermark/detect": WatermarkDetectRequest}
IDEMPOTENCY_KEY = Header(default=None, min_length=1, max_length=255,
                         description="Makes the request repeatable: the same key and body return the stored result.")
REGION = Header(default=None, alias=HEADER, description="The region to serve this request in (GET /v1/regions lists "
                "them); default: the region of the ingress that received it. Spills to other regions at peak.")


def create_app(service) -> FastAPI:
    api = FastAPI(title="Flashtile", version="0.1.0", description="Fast 4K image generation.")
    api.state.in_flight = 0  # requests inside this app now
    api.add_middleware(GuardMiddleware, guard=service.guard)
    _count(api)
    _errors(api, service)

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @api.post("/v1/generate", response_model=GenerateResult, summary="Generate one image (native API)",
              responses=error_responses(400, 401, 403, 408, 409, 413, 422, 500, 503))
    async def generate(body: GenerateRequest, request: Request, idempotency_key: str | None = IDEMPOTENCY_KEY,
                       region: str | None = REGION):
        # Keys are per caller: one caller's key never replays another's result.
        scoped = None if idempotency_key is None else f"{request.state.principal}:{idempotency_key}"
        result, replayed = await service.generate(body, scoped, base_url(request), service.regions.resolve(region))
        headers = {"X-Flashtile-Seed": str(result.seed), "X-Flashtile-Model": result.model,
                   "X-Flashtile-Request-Id": result.request_id,
                   "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in result.timings.items())}
        if idempotency_key is not None:
            headers["Idempotent-Replayed"] = "true" if replayed else "false"
        accept = request.headers.get("accept", "")
        if result.image_b64 is not None and (result.media_type in accept or "image/*" in accept):
            return Response(content=result.image_bytes(), media_type=result.media_type, headers=headers)
        return JSONResponse(content=result.model_dump(), headers=headers)

    @api.post("/v1/generate/stream", summary="Generate one image, streaming progress (server-sent events)",
              responses=error_responses(400, 401, 403, 413, 422, 500, 503))
    async def generate_stream(body: GenerateRequest, request: Request, region: str | None = REGION):
        """Events: `progress` ({stage, step, total}, base steps with `preview_png_b64`), then `result`
        (the native JSON result) or `error` ({type, message}; type timeout, overloaded, replica_lost, ...)."""
        region = service.regions.resolve(region)
        slot = await service.open_stream(body)  # refused here with a real status; released when the stream ends
        # The background task also releases the slot should the stream never start (client gone at once).
        return StreamingResponse(sse.events(service, body, slot, base_url(request), region), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"}, background=BackgroundTask(slot.release))

    @api.post("/v1/images/generations", response_model=ImagesResponse, summary="OpenAI Images API",
              responses=error_responses(400, 401, 403, 404, 408, 413, 422, 500, 503))
    async def openai_images(body: ImagesRequest, request: Request, region: str | None = REGION):
        return await service.images(body, base_url(request), service.regions.resolve(region))

    @api.get("/v1/outputs/{key:path}", summary="A stored image (local output storage)", responses=error_responses(404))
    async def outputs(key: str):
        data = await service.output(key)
        if data is None:
            return error(404, "not_found", "no such output")
        return Response(content=data, media_type=MEDIA_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream"))

    @api.post("/v1/watermark/detect", response_model=WatermarkDetectResult, summary="Is Flashtile's watermark in this image?",
              responses=error_responses(400, 401, 403, 413, 422, 500))
    async def watermark_detect(body: WatermarkDetectRequest):
        return await service.detect(body)

    @api.get("/v1/models", summary="Models this cluster serves", responses=error_responses(401, 403, 500))
    async def models():
        return await service.models()

    @api.get("/v1/regions", summary="Regions, with live replicas per deployment", responses=error_responses(401, 403, 500))
    async def regions():
        return await service.regions.status()

    @api.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    return api


def _count(api: FastAPI) -> None:
    @api.middleware("http")
    async def count(request: Request, call_next):
        m, route, start, status = metrics.get(), metrics.route_label(request.url.path), time.perf_counter(), 500
        cpu = time.process_time()
        api.state.in_flight += 1
        m.in_flight.set(api.state.in_flight)
        try:
            response = await call_next(request)
            status = response.status_code
            # Server-Timing (browsers' dev tools and `make bench` read it): this replica's wall and CPU time for the
            # request, the CPU time being the whole replica's (exact when it serves one request at a time).
            own = f"ingress;dur={(time.perf_counter() - start) * 1000:.1f}, ingress-cpu;dur={(time.process_time() - cpu) * 1000:.1f}"
            stages = response.headers.get("Server-Timing")
            response.headers["Server-Timing"] = f"{stages}, {own}" if stages else own
            return response
        finally:
            api.state.in_flight -= 1
            m.in_flight.set(api.state.in_flight)
            m.requests.inc(tags={"route": route, "status": str(status)})
            m.request_latency.observe(time.perf_counter() - start, tags={"route": route})


def _errors(api: FastAPI, service) -> None:
    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = describe_errors(list(err.errors()), BODY_MODELS.get(request.url.path, GenerateRequest))
        return error(422, "invalid_request", "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own errors (unknown route, wrong method, unparsable body) in Flashtile's error shape.
        kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
        return error(err.status_code, kinds.get(err.status_code, "http_error"), str(err.detail), err.headers)

    async def classified(request: Request, err: Exception) -> JSONResponse:
        return classify(err, service.guard.retry_after_s).response()

    for kind in (FlashtileError, BackPressureError, RayActorError, Exception):
        api.add_exception_handler(kind, classified)
