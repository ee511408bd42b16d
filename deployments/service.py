"""Flashtile's serving logic without Ray or HTTP: admission, the pipeline (stages/driver.py) on a stage executor,
delivery and idempotency. The ingress deployment gives it Serve handles (deployments/executor.py); unit tests give
it the stages in process or fakes. deployments/http.py maps it to routes."""

import asyncio
import base64
import binascii
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable

from PIL import Image, UnidentifiedImageError

from deployments import metrics
from deployments.admission import Admission, Slot
from deployments.errors import InvalidRequest, NotFound, TooLarge
from deployments.guard import Guard
from deployments.idempotency import Idempotency, Outputs
from deployments.regions import Regions
from deployments.schemas import (
    MEDIA_TYPES,
    GenerateRequest,
    GenerateResult,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    WatermarkDetectRequest,
    WatermarkDetectResult,
)
from stages import driver, sizes
from stages.driver import Executor, FileSpec, StageInfo
from stages.pipeline import guidance_for, resolve_params

MAX_DETECT_PIXELS = 8192 * 8192  # images larger than this are refused before decoding


class Service:
    def __init__(self, executor: Callable[[str | None], Executor], guard: Guard, outputs: Outputs,
                 regions: Regions = Regions()):
        self.executor = executor  # a fresh one per request (for its region): it holds that request's open calls
        self.guard = guard
        self.admission = Admission(guard)
        self.outputs = outputs
        self.idempotency = Idempotency(outputs)
        self.regions = regions

    async def info(self) -> StageInfo:
        return await self.executor(None).info()  # cheap: the Serve executor's stage handles read it once

    async def screen(self, request: GenerateRequest, images: int = 1) -> None:
        self.admission.screen(request, (await self.info()).generator.base_resolution, images)

    # --- generation -------------------------------------------------------------------------------------------

    async def run(self, request: GenerateRequest, stream: bool = False, base_url: str = "",
                  region: str | None = None) -> AsyncIterator[dict]:
        """Progress events, then {"event": "result", "result": GenerateResult, "output_key": str | None}: with
        response_format url the image is stored under output_key and the result's URL signed under `base_url`.
        `region`: the request's region, as `self.regions.resolve` gave it."""
        info = await self.info()
        g = info.generator
        try:
            params = resolve_params(default_scheduler=g.default_scheduler, default_guidance=g.default_guidance,
                                    **request.stage_fields())
        except ValueError as err:  # the request's own fields; a stage's ValueError later is the server's fault
            raise InvalidRequest(str(err)) from None
        file = FileSpec(request.output_format, request.output_compression)
        executor = self.executor(region)
        async for event in driver.run(executor, params, file, stream):
            if event["event"] != "result":
                yield event
                continue
            r: driver.Render = event["render"]
            metrics.get().images.inc(tags={"size": params.size, "mode": params.mode})
            delivery, output_key = {"image_b64": base64.b64encode(r.output).decode()}, None
            if request.response_format == "url":
                output_key = f"images/{time.strftime('%Y-%m-%d')}/{uuid.uuid4().hex}.{file.output_format}"
                await self.outputs.put(output_key, r.output, MEDIA_TYPES[file.output_format])
                delivery = {"url": self.outputs.url(output_key, base_url)}
            yield {"event": "result", "output_key": output_key, "result": GenerateResult(
                **delivery, output_format=file.output_format, request_id=r.request_id, seed=params.seed, width=r.width,
                height=r.height, size=params.size, aspect_ratio=params.aspect_ratio, mode=params.mode,
                scheduler=params.scheduler, guidance_scale=params.guidance_scale, model=r.model_id, steps=r.steps,
                timings={k: round(v, 4) for k, v in r.timings.items()}, prompt_truncated=r.prompt_truncated,
                replicas=r.replicas, base_batch_size=r.base_batch_size,
                regions=self.regions.served(getattr(executor, "served", {})),
            )}

    async def produce(self, request: GenerateRequest, base_url: str = "",
                      region: str | None = None) -> tuple[GenerateResult, str | None]:
        """One image's result, and the stored image's key when response_format is url."""
        async for event in self.run(request, base_url=base_url, region=region):
            if event["event"] == "result":
                return event["result"], event["output_key"]
        raise RuntimeError("the pipeline ended without a result")

    async def generate(self, request: GenerateRequest, idempotency_key: str | None = None, base_url: str = "",
                       region: str | None = None) -> tuple[GenerateResult, bool]:
        """(result, replayed). Refused before any model work or storage lookup when over limits or policy; a known
        key answers from storage; else generated within capacity and deadline, and remembered under the key."""
        await self.screen(request)
        if idempotency_key is not None:
            stored = await self.idempotency.lookup(idempotency_key, request, base_url)
            if stored is not None:
                return stored, True
        with self.admission.admit(1):
            result, output_key = await self.admission.bounded(request, self.produce(request, base_url, region))
        if idempotency_key is not None:
            result = await self.idempotency.remember(idempotency_key, request, result, output_key, base_url)
        return result, False

    async def open_stream(self, request: GenerateRequest) -> Slot:
        """Screen and admit a streamed request (refused here with a real status); the caller releases the slot."""
        await self.screen(request)
        return self.admission.admit(1)

    async def images(self, body: ImagesRequest, base_url: str = "", region: str | None = None) -> ImagesResponse:
        """OpenAI's Images API: n images (seeds seed, seed+1, ...), generated together within one deadline."""
        model_id = (await self.info()).generator.model_id
        if body.model not in (None, model_id, "flashtile"):
            raise NotFound(f"model must be {model_id!r} (or omitted); got {body.model!r}", kind="model_not_found")
        first = body.to_generate(0)
        await self.screen(first, images=body.n)
        with self.admission.admit(body.n):
            work = asyncio.gather(*[self.produce(body.to_generate(i), base_url, region) for i in range(body.n)])
            results = [r for r, _ in await self.admission.bounded(first, work)]
        return ImagesResponse(
            created=int(time.time()), output_format=first.output_format,
            data=[ImageData(b64_json=r.image_b64, url=r.url, revised_prompt=body.prompt, seed=r.seed) for r in results],
        )

    # --- the rest -------------------------------------------------------------------------------------------------

    async def detect(self, body: WatermarkDetectRequest) -> WatermarkDetectResult:
        try:
            data = base64.b64decode(body.image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("image_b64: not valid base64", field="image_b64") from None
        try:
            with Image.open(io.BytesIO(data)) as probe:  # the header only: no pixels decoded here
                width, height, fmt = probe.width, probe.height, probe.format
        except (UnidentifiedImageError, OSError, ValueError):
            raise InvalidRequest("image_b64: not a PNG, JPEG or WebP image", field="image_b64") from None
        if fmt not in ("PNG", "JPEG", "WEBP"):
            raise InvalidRequest(f"image_b64: format must be PNG, JPEG or WebP; got {fmt}", field="image_b64")
        if width * height > MAX_DETECT_PIXELS:
            raise TooLarge(f"image is {width}x{height}; at most {MAX_DETECT_PIXELS} pixels", kind="image_too_large",
                           limit=MAX_DETECT_PIXELS)
        found = await self.executor(None).detect(data)
        return WatermarkDetectResult(watermarked=found.found, request_id=found.request_id, width=width, height=height,
                                     bit_agreement=round(found.bit_agreement, 4), method=found.method)

    async def models(self) -> dict:
        g = (await self.info()).generator
        return {"object": "list", "data": [{"id": g.model_id, "object": "model", "owned_by": "flashtile",
                                            "base_resolution": g.base_resolution, "tiers": list(sizes.TIERS),
                                            "default_guidance": {m: guidance_for(m, g.default_guidance) for m in sizes.MODES},
                                            "aspect_ratios": list(sizes.ASPECTS)}]}

    async def output(self, key: str) -> bytes | None:
        """A stored image by key (local storage serves them itself; S3 hands out presigned URLs instead)."""
        if not key.startswith("images/") or not self.outputs.store.serves_locally:
            return None
        try:
            return await self.outputs.get(key)
        except ValueError:
            return None
