"""Compositor deployment: the pixel work between the models (stages/compose.py) in replicas of its own, off every
event loop: merge upscaled tiles, resize, cut the tiles to refine, blend, watermark and encode. Its inputs and
outputs stay in the object store; only the encoded file leaves it."""

import asyncio

import torch
from ray import serve

from deployments import metrics
from deployments._replica import OwnsOutputs, fetch, region, routed, stored
from deployments.regions import InRegion
from stages import watermark
from stages.compose import Compositor
from stages.driver import FileSpec, Part
from stages.types import TileBox


@serve.deployment(name="compositor")
class CompositorDeployment(InRegion, OwnsOutputs):
    def __init__(self, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self._compositor = Compositor()
        metrics.get()  # from the start: its heartbeat shows in every export round

    @routed("compose")
    async def merge(self, parts: list[Part], boxes: list[list[TileBox]], size, scale: int, overlap: int) -> Part:
        results = await asyncio.gather(*[fetch(p) for p in parts])
        return stored(await asyncio.to_thread(self._compositor.merge, results, boxes, size, scale, overlap))

    @routed("compose")
    async def resize(self, image: Part, size) -> Part:
        return stored(await asyncio.to_thread(self._compositor.resize, await fetch(image), size))

    @routed("compose")
    async def select(self, image: Part, budget: int, tile_size: int, overlap: int) -> list[Part]:
        chosen = await asyncio.to_thread(self._compositor.select, await fetch(image), budget, tile_size, overlap)
        return [stored(pixels, box=box) for box, pixels in chosen]

    @routed("compose")
    async def finish(self, image: Part, refined: list[Part], boxes: list[list[TileBox]], overlap: int,
                     request_id: str, text: dict[str, str], file: FileSpec) -> Part:
        """The encoded file, as a Part: its pixels the file's bytes (small: they travel by value), meta its region."""
        pixels, results = await asyncio.gather(fetch(image), asyncio.gather(*[fetch(p) for p in refined]))
        data = await asyncio.to_thread(self._compositor.finish, pixels, list(results), boxes, overlap, request_id, text, file)
        return Part(data, {"region": region()})

    @routed("compose")
    async def detect(self, data: bytes) -> watermark.Detection:
        """Read the watermark of an encoded image (PNG, JPEG or WebP, checked by the caller)."""
        return await asyncio.to_thread(self._compositor.detect, data)
