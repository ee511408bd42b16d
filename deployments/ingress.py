"""HTTP ingress and the DAG's driver: validates, calls the stage deployments, encodes the PNG.

Only this deployment encodes PNG. Between stages travel Ray objects: embeddings, the base image, tiles.
"""

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.schemas import (
    GenerateRequest,
    GenerateResult,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    describe_errors,
)
from deployments.storage import LocalOutputStore, OutputStore, StorageError
from stages import sizes
from stages.pipeline import REFINE_BUDGET, resolve_params
from stages.png import encode_png
from stages.refine import blend_tiles, select_tiles
from stages.upscale import TiledUpscale, resize

log = logging.getLogger("ray.serve")
api = FastAPI(title="Flashtile", version="0.1.0", description="Fast 4K image generation.")
RETRY_AFTER_S = 5  # what a client told "busy" waits before trying again
PREVIEWS_PER_RUN = 8  # streamed base previews per request, at most


def _error(status: int, kind: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message, **extra}}, headers=headers)


def _busy() -> JSONResponse:
    return _error(503, "overloaded", "all replicas are busy; retry later", {"Retry-After": str(RETRY_AFTER_S)})


def _body_hash(request: GenerateRequest) -> str:
    """Identity of a request body for Idempotency-Key checks (field order and defaults do not matter)."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


async def _awaitable(response):
    """A DeploymentResponse as a coroutine, for asyncio.as_completed."""
    return await response


_in_flight = 0  # requests inside this ingress replica (one event loop: no lock needed)


@api.middleware("http")
async def _count(request: Request, call_next):
    global _in_flight
    m, route, start, status = metrics.get(), metrics.route_label(request.url.path), time.perf_counter(), 500
    _in_flight += 1
    m.in_flight.set(_in_flight)
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        _in_flight -= 1
        m.in_flight.set(_in_flight)
        m.requests.inc(tags={"route": route, "status": str(status)})
        m.request_latency.observe(time.perf_counter() - start, tags={"route": route})


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = describe_errors(list(err.errors()))
    return _error(422, "invalid_request", "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


@api.exception_handler(BackPressureError)
async def _backpressure(request: Request, err: BackPressureError) -> JSONResponse:
    return _busy()


@api.exception_handler(Exception)
async def _internal(request: Request, err: Exception) -> JSONResponse:
    log.exception("request failed")  # the trace stays in the server log, never in the response
    return _error(500, "internal", "image generation failed")


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        encoder: DeploymentHandle,
        generator: DeploymentHandle,
        upscaler: DeploymentHandle,
        refiner: DeploymentHandle,
        torch_threads: int = 1,
        output: str | None = None,
        url_ttl_s: int = 900,
    ):
        torch.set_num_threads(torch_threads)  # blending and PNG encoding; the proxy shares the node's cores
        self._encoder, self._generator, self._upscaler, self._refiner = encoder, generator, upscaler, refiner
        self._info: dict | None = None
        self._store = OutputStore.from_location(output)
        self._url_ttl_s = url_ttl_s

    async def _stage_info(self) -> dict:
        if self._info is None:
            gen, up, ref = await asyncio.gather(
                self._generator.info.remote(), self._upscaler.info.remote(), self._refiner.info.remote()
            )
            self._info = {"generator": gen, "upscaler": up, "refiner": ref}
        return self._info

    # --- the DAG ------------------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest | dict) -> GenerateResult:
        """Python API (through serve.get_app_handle("flashtile")): one request in, the typed result out."""
        if isinstance(request, dict):
            request = GenerateRequest.model_validate(request)
        result, output_key = await self._complete(request)
        if output_key is not None:
            result.url = self._url(output_key)
        return result

    async def _complete(self, request: GenerateRequest) -> tuple[GenerateResult, str | None]:
        """Run the DAG to its result: (result, the stored image's key when response_format is url)."""
        async for event in self._run(request, stream=False):
            if event["event"] == "result":
                return event["result"], event["output_key"]
        raise RuntimeError("the DAG ended without a result")

    async def _run(self, request: GenerateRequest, stream: bool) -> AsyncIterator[dict]:
        """Run the four stages for one request, yielding progress events and, last, {"event": "result"}."""
        info = await self._stage_info()
        g = info["generator"]
        params = resolve_params(default_scheduler=g["default_scheduler"], **request.stage_fields())
        timings, steps, replicas = {}, {}, {}

        # 1+2. Encode and generate: the encoder's response goes to the generator unawaited (a reference).
        t0 = time.perf_counter()
        embeds = self._encoder.encode.remote(params.prompt, params.negative_prompt)
        width, height = sizes.base_size(params.aspect_ratio, g["base_resolution"], g["size_multiple"])
        base_params = dict(seed=params.seed, width=width, height=height, steps=params.steps,
                           guidance_scale=params.guidance_scale, scheduler=params.scheduler)
        if stream:
            every = max(1, params.steps // PREVIEWS_PER_RUN)
            async for item in self._generator.options(stream=True).generate_stream.remote(embeds, base_params, every):
                if isinstance(item, dict):
                    preview = item.pop("preview", None)
                    if preview is not None:
                        item["preview_png_b64"] = base64.b64encode(encode_png(preview)).decode()
                    yield {"event": "progress", **item}
                else:
                    base = item
        else:
            base = await self._generator.generate.remote(embeds, base_params)
        timings["encode+base"] = time.perf_counter() - t0
        steps["base"], replicas["base_generator"] = base.steps, [base.meta.get("replica", "")]
        image = base.image

        if params.size != "preview":
            # 3. Upscale: every tile of every pass is its own call, spread over the upscaler's replicas.
            t0 = time.perf_counter()
            up = info["upscaler"]
            geometry = TiledUpscale(up["scale"], up["tile_size"], up["overlap"])
            passes = geometry.plan((image.shape[-1], image.shape[-2]), sizes.output_size(params.size, params.aspect_ratio, 0))
            total, done, seen = geometry.count_tiles(passes), 0, set()
            for p in passes:
                if p.kind == "resize":
                    image = resize(image, p.size)
                    continue
                calls = [self._upscaler.upscale_tile.remote(t) for t in geometry.split(image)]
                tiles = []
                for call in asyncio.as_completed([_awaitable(c) for c in calls]):
                    tiles.append(await call)
                    done += 1
                    if stream:
                        yield {"event": "progress", "stage": "upscale", "step": done, "total": total}
                image = geometry.merge(tiles, (image.shape[-1], image.shape[-2]))
                seen |= {t.meta["replica"] for t in tiles}
            timings["upscale"] = time.perf_counter() - t0
            steps["upscale_tiles"], replicas["upscaler"] = done, sorted(seen)

            # 4. Refine the most detailed tiles, each on whichever refiner replica is free.
            t0 = time.perf_counter()
            ref = info["refiner"]
            chosen = select_tiles(image, ref["tile_size"], ref["overlap"], REFINE_BUDGET[params.size])
            calls = [
                self._refiner.refine_tile.remote(t, embeds, params.seed, params.steps, params.guidance_scale)
                for t in chosen
            ]
            refined = {}
            for call in asyncio.as_completed([_awaitable(c) for c in calls]):
                tile = await call
                refined[tile.index] = tile
                if stream:
                    yield {"event": "progress", "stage": "refine", "step": len(refined), "total": len(chosen)}
            for tile in chosen:
                tile.result = refined[tile.index].result
            image = blend_tiles(image, chosen, ref["overlap"])
            timings["refine"] = time.perf_counter() - t0
            steps["refine_tiles"] = len(chosen)
            steps["refine_steps_per_tile"] = next(iter(refined.values())).meta["steps"] if refined else 0
            replicas["refiner"] = sorted({t.meta["replica"] for t in refined.values()})

        # 5. Encode the PNG (the only full-size encode in the DAG).
        t0 = time.perf_counter()
        embeds_result = await embeds
        png = encode_png(image.clamp(0, 1), {
            "prompt": params.prompt, "seed": params.seed, "size": params.size, "aspect_ratio": params.aspect_ratio,
            "mode": params.mode, "steps": ",".join(f"{k}={v}" for k, v in steps.items()), "model": g["model_id"],
            "software": "Flashtile",
        })
        timings["encode_png"] = time.perf_counter() - t0
        metrics.get().images.inc(tags={"size": params.size, "mode": params.mode})
        delivery, output_key = {"image_b64": base64.b64encode(png).decode()}, None
        if request.response_format == "url":
            output_key = f"images/{time.strftime('%Y-%m-%d')}/{uuid.uuid4().hex}.png"
            await self._put(output_key, png, "image/png")
            delivery = {}  # the caller signs the URL: only it knows the client's base URL
        yield {"event": "result", "output_key": output_key, "result": GenerateResult(
            **delivery, seed=params.seed, width=image.shape[-1], height=image.shape[-2],
            size=params.size, aspect_ratio=params.aspect_ratio, mode=params.mode, scheduler=params.scheduler,
            model=g["model_id"], steps=steps, timings={k: round(v, 4) for k, v in timings.items()},
            prompt_truncated=embeds_result.truncated, replicas=replicas, base_batch_size=base.meta.get("batch_size", 1),
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

    @api.post("/v1/generate", response_model=GenerateResult, summary="Generate one image (native API)")
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
        replayed = False
        # 1. A known Idempotency-Key answers from storage: no model work.
        if idempotency_key is not None:
            status, result = await self._idempotent(idempotency_key, body, base_url)
            if status == 409:
                return _error(409, "idempotency_conflict", "this Idempotency-Key was used with a different request body")
            replayed = result is not None
        # 2. Otherwise generate, and remember the result under the key.
        if not replayed:
            try:
                result, output_key = await self._complete(body)
            except ValueError as err:  # a stage's own input check: still the client's request
                return _error(422, "invalid_request", str(err))
            if output_key is not None:
                result.url = self._url(output_key, base_url)
            if idempotency_key is not None:
                status, result = await self._remember(idempotency_key, body, result, output_key, base_url)
        headers = {"X-Flashtile-Seed": str(result.seed), "X-Flashtile-Model": result.model}
        if idempotency_key is not None:
            headers["Idempotent-Replayed"] = "true" if replayed else "false"
        if result.image_b64 is not None and "image/png" in request.headers.get("accept", ""):
            return Response(content=result.png(), media_type="image/png", headers=headers)
        return JSONResponse(content=result.model_dump(), headers=headers)

    @api.get("/v1/outputs/{key:path}", summary="A stored image (local output storage)")
    async def outputs(self, key: str):
        try:
            data = await asyncio.to_thread(self._store.get, key) if isinstance(self._store, LocalOutputStore) else None
        except ValueError:
            data = None
        if data is None or not key.startswith(("images/", "idempotent/")):
            return _error(404, "not_found", "no such output")
        return Response(content=data, media_type="image/png")

    @api.post("/v1/generate/stream", summary="Generate one image, streaming progress (server-sent events)")
    async def http_generate_stream(self, body: GenerateRequest, request: Request):
        """Events: `progress` ({stage, step, total}, base steps with `preview_png_b64`), then `result`
        (the native JSON result) or `error`."""

        async def events():
            try:
                async for event in self._run(body, stream=True):
                    kind = event.pop("event")
                    data = event
                    if kind == "result":
                        if event["output_key"] is not None:
                            event["result"].url = self._url(event["output_key"], str(request.base_url).rstrip("/"))
                        data = event["result"].model_dump()
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            except BackPressureError:
                yield f"event: error\ndata: {json.dumps({'type': 'overloaded', 'retry_after': RETRY_AFTER_S})}\n\n"
            except ValueError as err:
                yield f"event: error\ndata: {json.dumps({'type': 'invalid_request', 'message': str(err)})}\n\n"
            except Exception:
                log.exception("stream failed")
                yield f"event: error\ndata: {json.dumps({'type': 'internal', 'message': 'image generation failed'})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.post("/v1/images/generations", response_model=ImagesResponse, summary="OpenAI Images API")
    async def openai_images(self, body: ImagesRequest, request: Request):
        info = await self._stage_info()
        model_id = info["generator"]["model_id"]
        if body.model not in (None, model_id, "flashtile"):
            return _error(404, "model_not_found", f"model must be {model_id!r} (or omitted); got {body.model!r}")
        try:
            results = await asyncio.gather(*[self.generate(body.to_generate(i)) for i in range(body.n)])
            for r in results:
                if r.url is not None and r.url.startswith("/"):  # local storage: make it absolute
                    r.url = str(request.base_url).rstrip("/") + r.url
        except ValueError as err:
            return _error(422, "invalid_request", str(err))
        return ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=r.image_b64, url=r.url, revised_prompt=body.prompt, seed=r.seed) for r in results],
        )

    @api.get("/v1/models", summary="Models this cluster serves")
    async def models(self):
        g = (await self._stage_info())["generator"]
        return {"object": "list", "data": [{"id": g["model_id"], "object": "model", "owned_by": "flashtile",
                                            "base_resolution": g["base_resolution"], "tiers": list(sizes.TIERS),
                                            "aspect_ratios": list(sizes.ASPECTS)}]}

    @api.get("/healthz", summary="Liveness")
    async def healthz(self):
        return {"status": "ok"}
