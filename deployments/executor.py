"""The pipeline's executor over Ray Serve handles (stages/driver.Executor), one per request.

Every answer it awaits is small: a Part's object reference and metadata, the tiles to refine as references, the
encoded file. Pixels go from stage replica to stage replica through Ray's object store; `no_pixels` checks each
answer, so a step that sent pixels to the ingress would fail loudly rather than slow every request down.
"""

import asyncio
import dataclasses
from collections import Counter

import numpy as np
import torch
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments import metrics
from stages.driver import FileSpec, Part, StageInfo
from stages.types import TileBox


class PixelLeak(TypeError):
    """An answer to the replica running the driver held an array: pixels must travel by reference."""


def no_pixels(value, where: str = "answer"):
    """`value` itself; raises PixelLeak if any tensor or array is inside it (containers and dataclasses walked)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        raise PixelLeak(f"{where} holds a {type(value).__name__} of shape {tuple(value.shape)}; pixels travel by reference")
    if isinstance(value, dict):
        for k, v in value.items():
            no_pixels(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            no_pixels(v, f"{where}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            no_pixels(getattr(value, f.name), f"{where}.{f.name}")
    return value


@dataclasses.dataclass
class StageHandles:
    encoder: DeploymentHandle
    generator: DeploymentHandle
    upscaler: DeploymentHandle
    refiner: DeploymentHandle
    compositor: DeploymentHandle
    _info: StageInfo | None = None

    async def info(self) -> StageInfo:
        """What the stages are (read once: replicas of a deployment share their settings)."""
        if self._info is None:
            generator, upscaler, refiner = await asyncio.gather(
                self.generator.info.remote(), self.upscaler.info.remote(), self.refiner.info.remote())
            self._info = StageInfo(generator, upscaler, refiner)
        return self._info


class ServeExecutor:
    """One request's calls. `region`: the request's region, named in every call for Serve's region router
    (deployments/regions.py); `served` collects, per stage, the regions whose replicas answered."""

    def __init__(self, stages: StageHandles, region: str | None = None):
        self._stages = stages
        self._region = region
        self._open: dict[int, tuple[str, DeploymentResponse, int]] = {}  # id -> (stage, call, tiles it carries)
        self.served: dict[str, set[str]] = {}

    async def info(self) -> StageInfo:
        return await self._stages.info()

    def encode(self, prompt: str, negative_prompt: str) -> DeploymentResponse:
        # Unawaited: Serve hands the embeddings from the encoder to the generator and refiner replicas directly.
        r = self._region
        return self._track("encode", self._stages.encoder.encode.remote(prompt, negative_prompt, region=r))

    async def generate(self, embeds, base: dict) -> Part:
        return self._base(await self._call("base", self._stages.generator.generate.remote(embeds, base, region=self._region)))

    async def generate_stream(self, embeds, base: dict, preview_every: int, request_id: str):
        stream = self._track("base", self._stages.generator.options(stream=True).generate_stream.remote(
            embeds, base, preview_every, request_id, region=self._region))
        async for item in stream:
            yield self._base(no_pixels(item, "base stream"))
        self._open.pop(id(stream), None)

    async def upscale(self, image: Part, boxes: list[TileBox]) -> Part:
        return await self._call("upscale", self._stages.upscaler.upscale.remote(image, boxes, region=self._region),
                                len(boxes))

    async def merge(self, parts: list[Part], boxes, size, scale: int, overlap: int) -> Part:
        return await self._call("compose", self._stages.compositor.merge.remote(parts, boxes, size, scale, overlap,
                                                                                region=self._region))

    async def resize(self, image: Part, size) -> Part:
        return await self._call("compose", self._stages.compositor.resize.remote(image, size, region=self._region))

    async def select(self, image: Part, budget: int, tile_size: int, overlap: int) -> list[Part]:
        return await self._call("compose", self._stages.compositor.select.remote(image, budget, tile_size, overlap,
                                                                                 region=self._region))

    async def refine(self, crops: list[Part], embeds, seed: int, steps: int, guidance_scale: float) -> Part:
        return await self._call("refine", self._stages.refiner.refine.remote(
            crops, embeds, seed, steps, guidance_scale, region=self._region), len(crops))

    async def finish(self, image: Part, refined: list[Part], boxes, overlap: int, request_id: str, text: dict,
                     file: FileSpec) -> bytes:
        return (await self._call("compose", self._stages.compositor.finish.remote(
            image, refined, boxes, overlap, request_id, text, file, region=self._region))).pixels

    async def detect(self, data: bytes):
        return await self._call("compose", self._stages.compositor.detect.remote(data, region=self._region))

    def cancel(self) -> dict[str, int]:
        """Cancel the calls still open: queued tiles are dropped, the generator stops at its next step. Returns the
        calls (tiles, for the tile stages) cancelled per stage."""
        dropped = Counter()
        for stage, response, tiles in self._open.values():
            response.cancel()
            if stage != "encode":  # the encoder's answer stays open for the refiner until the request ends
                dropped[stage] += tiles
        self._open.clear()
        for stage in ("upscale", "refine"):
            if dropped[stage]:
                metrics.get().cancellations.inc(dropped[stage], tags={"stage": stage, "reason": "cancelled"})
        return dict(dropped)

    def _track(self, stage: str, response, tiles: int = 1):
        self._open[id(response)] = (stage, response, tiles)
        return response

    async def _call(self, stage: str, response: DeploymentResponse, tiles: int = 1):
        self._track(stage, response, tiles)
        value = await response
        self._open.pop(id(response), None)
        for part in value if isinstance(value, list) else [value]:
            if isinstance(part, Part):
                self._saw(stage, part.meta.get("region"))
        return no_pixels(value, stage)

    def _base(self, item):
        """A base image's Part also says where its prompt was encoded."""
        if isinstance(item, Part):
            self._saw("base", item.meta.get("region"))
            self._saw("encode", item.meta.get("encoder_region"))
        return item

    def _saw(self, stage: str, region: str | None) -> None:
        if region is not None:
            self.served.setdefault(stage, set()).add(region)
