"""HTTP ingress and the DAG's driver: validates, calls the stage deployments, encodes the PNG.

Only this deployment encodes PNG. Between stages travel Ray objects: embeddings, the base image, tiles.
"""

import asyncio
import base64
import logging
import time

import torch

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.schemas import GenerateRequest, GenerateResult, describe_errors
from stages import sizes
from stages.pipeline import REFINE_BUDGET, resolve_params
from stages.png import encode_png
from stages.refine import blend_tiles, select_tiles
from stages.upscale import TiledUpscale, resize

log = logging.getLogger("ray.serve")
api = FastAPI(title="Flashtile", version="0.1.0", description="Fast 4K image generation.")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = describe_errors(list(err.errors()))
    return JSONResponse(status_code=422, content={"error": {"type": "invalid_request", "errors": errors}})


@api.exception_handler(Exception)
async def _internal(request: Request, err: Exception) -> JSONResponse:
    log.exception("request failed")  # the trace stays in the server log, never in the response
    return JSONResponse(status_code=500, content={"error": {"type": "internal", "message": "image generation failed"}})


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
    ):
        torch.set_num_threads(torch_threads)  # blending and PNG encoding; the proxy shares the node's cores
        self._encoder, self._generator, self._upscaler, self._refiner = encoder, generator, upscaler, refiner
        self._info: dict | None = None

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
        info = await self._stage_info()
        g = info["generator"]
        params = resolve_params(default_scheduler=g["default_scheduler"], **request.model_dump(exclude_none=True))
        timings, steps, replicas = {}, {}, {}

        # 1+2. Encode and generate: the encoder's response goes to the generator unawaited (a reference).
        t0 = time.perf_counter()
        embeds = self._encoder.encode.remote(params.prompt, params.negative_prompt)
        width, height = sizes.base_size(params.aspect_ratio, g["base_resolution"], g["size_multiple"])
        base = await self._generator.generate.remote(
            embeds,
            dict(seed=params.seed, width=width, height=height, steps=params.steps,
                 guidance_scale=params.guidance_scale, scheduler=params.scheduler),
        )
        timings["encode+base"] = time.perf_counter() - t0
        steps["base"], replicas["base_generator"] = base.steps, [base.meta.get("replica", "")]
        image = base.image

        if params.size != "preview":
            # 3. Upscale: every tile of every pass is its own call, spread over the upscaler's replicas.
            t0 = time.perf_counter()
            up = info["upscaler"]
            geometry = TiledUpscale(up["scale"], up["tile_size"], up["overlap"])
            target = sizes.output_size(params.size, params.aspect_ratio, g["base_resolution"])
            tiles_run, seen = 0, set()
            for p in geometry.plan((image.shape[-1], image.shape[-2]), target):
                if p.kind == "resize":
                    image = resize(image, p.size)
                    continue
                tiles = await asyncio.gather(*[self._upscaler.upscale_tile.remote(t) for t in geometry.split(image)])
                image = geometry.merge(tiles, (image.shape[-1], image.shape[-2]))
                tiles_run += len(tiles)
                seen |= {t.meta["replica"] for t in tiles}
            timings["upscale"] = time.perf_counter() - t0
            steps["upscale_tiles"], replicas["upscaler"] = tiles_run, sorted(seen)

            # 4. Refine the most detailed tiles, each on whichever refiner replica is free.
            t0 = time.perf_counter()
            ref = info["refiner"]
            chosen = select_tiles(image, ref["tile_size"], ref["overlap"], REFINE_BUDGET[params.size])
            refined = await asyncio.gather(*[
                self._refiner.refine_tile.remote(t, embeds, params.seed, params.steps, params.guidance_scale) for t in chosen
            ])
            for original, done in zip(chosen, refined):
                original.result = done.result
            image = blend_tiles(image, chosen, ref["overlap"])
            timings["refine"] = time.perf_counter() - t0
            steps["refine_tiles"] = len(refined)
            steps["refine_steps_per_tile"] = refined[0].meta["steps"] if refined else 0
            replicas["refiner"] = sorted({t.meta["replica"] for t in refined})

        # 5. Encode the PNG (the only encode in the DAG).
        t0 = time.perf_counter()
        embeds_result = await embeds
        png = encode_png(image.clamp(0, 1), {
            "prompt": params.prompt, "seed": params.seed, "size": params.size, "aspect_ratio": params.aspect_ratio,
            "mode": params.mode, "steps": ",".join(f"{k}={v}" for k, v in steps.items()), "model": g["model_id"],
            "software": "Flashtile",
        })
        timings["encode_png"] = time.perf_counter() - t0
        return GenerateResult(
            image_b64=base64.b64encode(png).decode(), seed=params.seed, width=image.shape[-1], height=image.shape[-2],
            size=params.size, aspect_ratio=params.aspect_ratio, mode=params.mode, scheduler=params.scheduler,
            model=g["model_id"], steps=steps, timings={k: round(v, 4) for k, v in timings.items()},
            prompt_truncated=embeds_result.truncated, replicas=replicas,
        )

    # --- HTTP -------------------------------------------------------------------------------------------

    @api.post("/v1/generate", response_model=GenerateResult, summary="Generate one image (native API)")
    async def http_generate(self, body: GenerateRequest, request: Request):
        try:
            result = await self.generate(body)
        except ValueError as err:  # a stage's own input check: still the client's request
            return JSONResponse(status_code=422, content={"error": {"type": "invalid_request", "message": str(err)}})
        if "image/png" in request.headers.get("accept", ""):
            headers = {"X-Flashtile-Seed": str(result.seed), "X-Flashtile-Model": result.model}
            return Response(content=result.png(), media_type="image/png", headers=headers)
        return result

    @api.get("/v1/models", summary="Models this cluster serves")
    async def models(self):
        info = await self._stage_info()
        g = info["generator"]
        return {"object": "list", "data": [{"id": g["model_id"], "object": "model", "owned_by": "flashtile",
                                            "base_resolution": g["base_resolution"], "tiers": list(sizes.TIERS),
                                            "aspect_ratios": list(sizes.ASPECTS)}]}

    @api.get("/healthz", summary="Liveness")
    async def healthz(self):
        return {"status": "ok"}
