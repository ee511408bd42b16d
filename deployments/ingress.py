"""HTTP ingress: validates and admits requests, runs the pipeline (stages/driver.py) over the stage deployments,
answers with the encoded file. No pixels come here: stage replicas pass them to each other by reference.
"""

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from PIL import Image, UnidentifiedImageError
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.schemas import (
    MEDIA_TYPES,
    GenerateRequest,
    GenerateResult,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    WatermarkDetectRequest,
    WatermarkDetectResult,
    describe_errors,
    error_responses,
)
from deployments import guard as _guard
from deployments.guard import Guard, GuardMiddleware, Refusal, error as _error
from deployments.executor import ServeExecutor, StageHandles
from deployments.storage import LocalOutputStore, OutputStore, StorageError
from stages import driver, sizes
from stages.driver import FileSpec, StageInfo
from stages.pipeline import guidance_for, resolve_params

log = logging.getLogger("ray.serve")
api = FastAPI(title="Flashtile", version="0.1.0", description="Fast 4K image generation.")
MAX_DETECT_PIXELS = 8192 * 8192  # images larger than this are refused before decoding


api.add_middleware(GuardMiddleware)


def _body_hash(request: GenerateRequest) -> str:
    """Identity of a request body for Idempotency-Key checks (field order and defaults do not matter)."""
    return hashlib.sha256(request.model_dump_json(exclude={"timeout_s"}).encode()).hexdigest()


_in_flight = 0  # requests inside this ingress replica (one event loop: no lock needed)


@api.middleware("http")
async def _count(request: Request, call_next):
    global _in_flight
    m, route, start, status = metrics.get(), metrics.route_label(request.url.path), time.perf_counter(), 500
    cpu = time.process_time()
    _in_flight += 1
    m.in_flight.set(_in_flight)
    try:
        response = await call_next(request)
        status = response.status_code
        # Server-Timing (browsers' dev tools and `make bench` read it): this replica's wall and CPU time for the
        # request, the CPU time being the whole replica's (exact when it serves one request at a time).
        ingress = f"ingress;dur={(time.perf_counter() - start) * 1000:.1f}, ingress-cpu;dur={(time.process_time() - cpu) * 1000:.1f}"
        stages = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{stages}, {ingress}" if stages else ingress
        return response
    finally:
        _in_flight -= 1
        m.in_flight.set(_in_flight)
        m.requests.inc(tags={"route": route, "status": str(status)})
        m.request_latency.observe(time.perf_counter() - start, tags={"route": route})


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    body_models = {"/v1/images/generations": ImagesRequest, "/v1/watermark/detect": WatermarkDetectRequest}
    errors = describe_errors(list(err.errors()), body_models.get(request.url.path, GenerateRequest))
    return _error(422, "invalid_request", "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


@api.exception_handler(Refusal)
async def _refused(request: Request, err: Refusal) -> JSONResponse:
    return err.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own errors (unknown route, wrong method, unparsable body) in Flashtile's error shape.
    kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
    return _error(err.status_code, kinds.get(err.status_code, "http_error"), str(err.detail), err.headers)


@api.exception_handler(BackPressureError)
async def _backpressure(request: Request, err: BackPressureError) -> JSONResponse:
    return _guard.active().busy().response()


@api.exception_handler(RayActorError)
async def _replica_lost(request: Request, err: RayActorError) -> JSONResponse:
    # A stage replica died under this request. Serve replaces it; the same request (with its Idempotency-Key)
    # can be sent again.
    log.warning("a stage replica was lost during a request: %s", type(err).__name__)
    return Refusal(503, "replica_lost", "a replica serving this request was lost; retry with the same "
                   "Idempotency-Key", {"Retry-After": "1"}, retry_after=1).response()


@api.exception_handler(Exception)
async def _internal(request: Request, err: Exception) -> JSONResponse:
    log.exception("request failed")  # the trace stays in the server log, never in the response
    return _error(500, "internal", "image generation failed")


def _sse_error(kind: str, message: str, **extra) -> str:
    return f"event: error\ndata: {json.dumps({'type': kind, 'message': message, **extra})}\n\n"


# Defined before the deployment: @serve.ingress serialises the app, and what it uses, at class definition.
class _Slot:
    """Capacity held by one request in its ingress replica (see Ingress._admit)."""

    def __init__(self, ingress: "Ingress", images: int):
        self._ingress, self._images = ingress, images
        ingress._active += images

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        """Give the capacity back (once, however often called)."""
        self._ingress._active -= self._images
        self._images = 0


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        *,
        encoder: DeploymentHandle,
        generator: DeploymentHandle,
        upscaler: DeploymentHandle,
        refiner: DeploymentHandle,
        compositor: DeploymentHandle,
        output: str | None = None,
        url_ttl_s: int = 900,
        guard: dict,
    ):
        # The ingress routes and runs the driver; pixels stay in the stage replicas (deployments/executor.py).
        self._stages = StageHandles(encoder, generator, upscaler, refiner, compositor)
        self._info: StageInfo | None = None
        self._store = OutputStore.from_location(output)
        self._url_ttl_s = url_ttl_s
        self._active = 0  # images in progress in this replica (one event loop: no lock needed)
        self._guard = _guard.ACTIVE["guard"] = Guard.from_args(guard)
        if len(self._guard.keys):
            log.info("Flashtile: %d API key(s) configured; inference routes need 'Authorization: Bearer <key>'",
                     len(self._guard.keys))
        else:
            log.warning("Flashtile: no API keys configured (FLASHTILE_API_KEYS or api_keys): serving loopback clients "
                        "only; every other client gets 403")

    # --- admission: limits, policy, capacity, deadline -----------------------------------------------------

    async def _screen(self, request: GenerateRequest, images: int = 1) -> None:
        """Refuse what this server will not run, before any model work: limits (422), policy (400)."""
        base = (await self._stage_info()).generator.base_resolution
        exceeded = self._guard.limits.check(request, images, base)
        if exceeded is not None:
            raise Refusal(422, "limit_exceeded", exceeded.message, limit=exceeded.limit, allowed=exceeded.allowed)
        if self._guard.policy.blocks(request.prompt):
            metrics.get().blocked.inc()
            raise Refusal(400, "content_policy_violation", "the prompt was rejected by this server's content policy")

    def _admit(self, images: int) -> "_Slot":
        """Hold `images` of this replica's capacity, or refuse at once (503 + Retry-After): no unbounded queue."""
        if self._active + images > self._guard.max_in_flight:
            raise self._guard.busy(f"server at capacity ({self._guard.max_in_flight} images in progress); retry later")
        return _Slot(self, images)

    def _deadline(self, request: GenerateRequest) -> float:
        return min(request.timeout_s or self._guard.request_timeout_s, self._guard.request_timeout_s)

    async def _bounded(self, request: GenerateRequest, work):
        """Await `work` within the request's deadline: 408 when it runs out (the work is cancelled)."""
        deadline = self._deadline(request)
        try:
            async with asyncio.timeout(deadline):
                return await work
        except TimeoutError:
            metrics.get().cancellations.inc(tags={"stage": "request", "reason": "timeout"})
            raise Refusal(408, "timeout", f"the request ran longer than its timeout of {deadline:g} s and was "
                          "cancelled; nothing was stored", timeout_s=deadline) from None
        except asyncio.CancelledError:  # the client went away (Serve cancels the request)
            metrics.get().cancellations.inc(tags={"stage": "request", "reason": "disconnect"})
            raise

    async def _stage_info(self) -> StageInfo:
        if self._info is None:
            self._info = await self._stages.info()
        return self._info

    # --- the DAG ------------------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest | dict) -> GenerateResult:
        """Python API (through serve.get_app_handle("flashtile")): one request in, the typed result out.

        The same limits, policy, capacity and deadline as HTTP; a refusal raises ValueError naming it.
        """
        if isinstance(request, dict):
            request = GenerateRequest.model_validate(request)
        try:
            await self._screen(request)
            with self._admit(1):
                return await self._bounded(request, self._produce(request))
        except Refusal as err:
            raise ValueError(f"{err.status} {err.kind}: {err.message}") from None

    async def _produce(self, request: GenerateRequest, base_url: str = "") -> GenerateResult:
        """The result with its delivery filled in (a URL when response_format is url)."""
        result, output_key = await self._complete(request)
        if output_key is not None:
            result.url = self._url(output_key, base_url)
        return result

    async def _complete(self, request: GenerateRequest) -> tuple[GenerateResult, str | None]:
        """Run the DAG to its result: (result, the stored image's key when response_format is url)."""
        async for event in self._run(request, stream=False):
            if event["event"] == "result":
                return event["result"], event["output_key"]
        raise RuntimeError("the DAG ended without a result")

    async def _run(self, request: GenerateRequest, stream: bool) -> AsyncIterator[dict]:
        """The pipeline for one request (stages/driver.py over this cluster's stage replicas): progress events, then
        {"event": "result", "result": GenerateResult, "output_key": the stored image's key when response_format is url}."""
        info = await self._stage_info()
        g = info.generator
        params = resolve_params(default_scheduler=g.default_scheduler, default_guidance=g.default_guidance,
                                **request.stage_fields())
        file = FileSpec(request.output_format, request.output_compression)
        async for event in driver.run(ServeExecutor(self._stages, info), params, file, stream):
            if event["event"] != "result":
                yield event
                continue
            r: driver.Render = event["render"]
            metrics.get().images.inc(tags={"size": params.size, "mode": params.mode})
            delivery, output_key = {"image_b64": base64.b64encode(r.output).decode()}, None
            if request.response_format == "url":
                output_key = f"images/{time.strftime('%Y-%m-%d')}/{uuid.uuid4().hex}.{file.output_format}"
                await self._put(output_key, r.output, MEDIA_TYPES[file.output_format])
                delivery = {}  # the caller signs the URL: only it knows the client's base URL
            yield {"event": "result", "output_key": output_key, "result": GenerateResult(
                **delivery, output_format=file.output_format, request_id=r.request_id, seed=params.seed, width=r.width,
                height=r.height, size=params.size, aspect_ratio=params.aspect_ratio, mode=params.mode,
                scheduler=params.scheduler, guidance_scale=params.guidance_scale, model=r.model_id, steps=r.steps,
                timings={k: round(v, 4) for k, v in r.timings.items()}, prompt_truncated=r.prompt_truncated,
                replicas=r.replicas, base_batch_size=r.base_batch_size,
            )}

    # --- storage and idempotency ---------------------------------------------------------------------

    async def _put(self, key: str, data: bytes, content_type: str) -> bool:
        try:
            created = await asyncio.to_thread(self._store.put, key, data, content_type)
        except StorageError:
            metrics.get().storage_errors.inc(tags={"op": "put"})
            raise
        if created:
            metrics.get().storage_bytes.inc(len(data), tags={"direction": "out"})
        return created

    def _url(self, key: str, base_url: str = "") -> str:
        """A presigned URL (S3), or the ingress's own /v1/outputs/ URL under `base_url` (local storage)."""
        return self._store.url(key, self._url_ttl_s, base_url)

    async def _idempotent(self, key: str, request: GenerateRequest, base_url: str = "") -> tuple[int, GenerateResult | None]:
        """(status, result): 200 with the stored result, 409 for a reused key with another body, or
        (0, None) when this key is new (the caller generates, then `_remember`s)."""
        record = await asyncio.to_thread(self._store.get, self._record_key(key))
        metrics.get().cache.inc(tags={"cache": "idempotency", "result": "hit" if record else "miss"})
        if record is None:
            return 0, None
        stored = json.loads(record)
        if stored["body_sha256"] != _body_hash(request):
            return 409, None
        result = GenerateResult.model_validate(stored["result"])
        if stored.get("output_key"):  # presigned URLs expire: sign the stored image afresh
            result.url = self._url(stored["output_key"], base_url)
        return 200, result

    async def _remember(
        self, key: str, request: GenerateRequest, result: GenerateResult, output_key: str | None, base_url: str
    ) -> tuple[int, GenerateResult]:
        """Store the result under the key, create-only; if another request stored one first, theirs wins."""
        record = {"body_sha256": _body_hash(request), "result": result.model_dump(exclude={"url"}), "output_key": output_key}
        if await self._put(self._record_key(key), json.dumps(record).encode(), "application/json"):
            return 200, result
        return await self._idempotent(key, request, base_url)

    @staticmethod
    def _record_key(key: str) -> str:
        return f"idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"

    # --- HTTP -------------------------------------------------------------------------------------------

    @api.post("/v1/generate", response_model=GenerateResult, summary="Generate one image (native API)",
              responses=error_responses(400, 401, 403, 408, 409, 413, 422, 500, 503))
    async def http_generate(
        self,
        body: GenerateRequest,
        request: Request,
        idempotency_key: str | None = Header(
            default=None, min_length=1, max_length=255,
            description="Makes the request repeatable: the same key and body return the stored result.",
        ),
    ):
        base_url = str(request.base_url).rstrip("/")
        # 1. Refuse what will not run (limits, policy), before any model work or storage lookup.
        await self._screen(body)
        # 2. A known Idempotency-Key answers from storage: no model work. Keys are per caller.
        scoped_key = None if idempotency_key is None else f"{request.state.principal}:{idempotency_key}"
        replayed = False
        if scoped_key is not None:
            status, result = await self._idempotent(scoped_key, body, base_url)
            if status == 409:
                return _error(409, "idempotency_conflict", "this Idempotency-Key was used with a different request body")
            replayed = result is not None
        # 3. Otherwise generate within capacity and deadline, and remember the result under the key.
        if not replayed:
            with self._admit(1):
                try:
                    result, output_key = await self._bounded(body, self._complete(body))
                except ValueError as err:  # a stage's own input check: still the client's request
                    return _error(422, "invalid_request", str(err))
            if output_key is not None:
                result.url = self._url(output_key, base_url)
            if scoped_key is not None:
                status, result = await self._remember(scoped_key, body, result, output_key, base_url)
        headers = {"X-Flashtile-Seed": str(result.seed), "X-Flashtile-Model": result.model, "X-Flashtile-Request-Id": result.request_id,
                   "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in result.timings.items())}
        if idempotency_key is not None:
            headers["Idempotent-Replayed"] = "true" if replayed else "false"
        accept = request.headers.get("accept", "")
        if result.image_b64 is not None and (result.media_type in accept or "image/*" in accept):
            return Response(content=result.image_bytes(), media_type=result.media_type, headers=headers)
        return JSONResponse(content=result.model_dump(), headers=headers)

    @api.get("/v1/outputs/{key:path}", summary="A stored image (local output storage)", responses=error_responses(404))
    async def outputs(self, key: str):
        try:
            data = await asyncio.to_thread(self._store.get, key) if isinstance(self._store, LocalOutputStore) else None
        except ValueError:
            data = None
        if data is None or not key.startswith("images/"):
            return _error(404, "not_found", "no such output")
        return Response(content=data, media_type=MEDIA_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream"))

    @api.post("/v1/generate/stream", summary="Generate one image, streaming progress (server-sent events)",
              responses=error_responses(400, 401, 403, 413, 422, 500, 503))
    async def http_generate_stream(self, body: GenerateRequest, request: Request):
        """Events: `progress` ({stage, step, total}, base steps with `preview_png_b64`), then `result`
        (the native JSON result) or `error` ({type, message}; type timeout, overloaded, replica_lost, ...)."""
        await self._screen(body)
        slot = self._admit(1)  # refused here with a real 503; released when the stream ends

        async def events():
            try:
                async with asyncio.timeout(self._deadline(body)):
                    async for event in self._run(body, stream=True):
                        kind = event.pop("event")
                        data = event
                        if kind == "result":
                            if event["output_key"] is not None:
                                event["result"].url = self._url(event["output_key"], str(request.base_url).rstrip("/"))
                            data = event["result"].model_dump()
                        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            except TimeoutError:
                metrics.get().cancellations.inc(tags={"stage": "request", "reason": "timeout"})
                yield _sse_error("timeout", f"the request ran longer than {self._deadline(body):g} s and was cancelled")
            except asyncio.CancelledError:
                metrics.get().cancellations.inc(tags={"stage": "request", "reason": "disconnect"})
                raise
            except BackPressureError:
                yield _sse_error("overloaded", "all replicas are busy; retry later", retry_after=self._guard.retry_after_s)
            except RayActorError:
                yield _sse_error("replica_lost", "a replica serving this request was lost; retry", retry_after=1)
            except ValueError as err:
                yield _sse_error("invalid_request", str(err))
            except Exception:
                log.exception("stream failed")
                yield _sse_error("internal", "image generation failed")
            finally:
                slot.release()

        # The background task also releases the slot should the stream never start (client gone at once).
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(slot.release))

    @api.post("/v1/images/generations", response_model=ImagesResponse, summary="OpenAI Images API",
              responses=error_responses(400, 401, 403, 404, 408, 413, 422, 500, 503))
    async def openai_images(self, body: ImagesRequest, request: Request):
        info = await self._stage_info()
        model_id = info.generator.model_id
        if body.model not in (None, model_id, "flashtile"):
            return _error(404, "model_not_found", f"model must be {model_id!r} (or omitted); got {body.model!r}")
        first = body.to_generate(0)
        await self._screen(first, images=body.n)
        base_url = str(request.base_url).rstrip("/")
        with self._admit(body.n):
            try:
                work = asyncio.gather(*[self._produce(body.to_generate(i), base_url) for i in range(body.n)])
                results = await self._bounded(first, work)
            except ValueError as err:
                return _error(422, "invalid_request", str(err))
        return ImagesResponse(
            created=int(time.time()), output_format=first.output_format,
            data=[ImageData(b64_json=r.image_b64, url=r.url, revised_prompt=body.prompt, seed=r.seed) for r in results],
        )

    @api.post("/v1/watermark/detect", response_model=WatermarkDetectResult, summary="Is Flashtile's watermark in this image?",
              responses=error_responses(400, 401, 403, 413, 422, 500))
    async def watermark_detect(self, body: WatermarkDetectRequest):
        try:
            data = base64.b64decode(body.image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise Refusal(422, "invalid_request", "image_b64: not valid base64", field="image_b64") from None
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height, fmt = probe.width, probe.height, probe.format
        except (UnidentifiedImageError, OSError, ValueError):
            raise Refusal(422, "invalid_request", "image_b64: not a PNG, JPEG or WebP image", field="image_b64") from None
        if fmt not in ("PNG", "JPEG", "WEBP"):
            raise Refusal(422, "invalid_request", f"image_b64: format must be PNG, JPEG or WebP; got {fmt}", field="image_b64")
        if width * height > MAX_DETECT_PIXELS:
            raise Refusal(413, "image_too_large", f"image is {width}x{height}; at most {MAX_DETECT_PIXELS} pixels",
                          limit=MAX_DETECT_PIXELS)
        found = await self._stages.compositor.detect.remote(data)
        return WatermarkDetectResult(watermarked=found.found, request_id=found.request_id, width=width, height=height,
                                     bit_agreement=round(found.bit_agreement, 4), method=found.method)

    @api.get("/v1/models", summary="Models this cluster serves", responses=error_responses(401, 403, 500))
    async def models(self):
        g = (await self._stage_info()).generator
        return {"object": "list", "data": [{"id": g.model_id, "object": "model", "owned_by": "flashtile",
                                            "base_resolution": g.base_resolution, "tiers": list(sizes.TIERS),
                                            "default_guidance": {m: guidance_for(m, g.default_guidance) for m in sizes.MODES},
                                            "aspect_ratios": list(sizes.ASPECTS)}]}

    @api.get("/healthz", summary="Liveness")
    async def healthz(self):
        return {"status": "ok"}

