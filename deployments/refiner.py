"""Refiner deployment: refines a few tiles per call, so several replicas share one image's detail pass."""

import asyncio
import time

from ray import serve

from deployments import metrics
from deployments._replica import OwnsOutputs, TileQueue, fetch, load_model, replica_id, routed, stored
from deployments.config import ModelConfig, TileConfig
from deployments.regions import InRegion
from stages.driver import Part, RefinerInfo
from stages.refine import Refiner
from stages.types import PromptEmbeds


@serve.deployment(name="refiner")
class RefinerDeployment(InRegion, OwnsOutputs):
    def __init__(self, model: ModelConfig, tiles: TileConfig):
        self._refiner = Refiner.from_pretrained(load_model(model.model, model.torch_threads), device=model.device,
                                                tile_size=tiles.tile_size, overlap=tiles.overlap)
        self._tiles_per_call = tiles.tiles_per_call
        self._queue = TileQueue("refine")

    def info(self) -> RefinerInfo:
        r = self._refiner
        return RefinerInfo(r.tile_size, r.overlap, r.strength, self._tiles_per_call)

    @routed("refine")
    async def refine(self, crops: list[Part], embeds: PromptEmbeds, seed: int, steps: int, guidance_scale: float) -> Part:
        """Refine these crops (read from the object store); the results go back there."""
        pixels = await asyncio.gather(*[fetch(c) for c in crops])
        return await self._queue.run(self._refine, pixels, [c.meta["box"] for c in crops], embeds, seed, steps,
                                     guidance_scale, tiles=len(crops))

    def _refine(self, pixels, boxes, embeds: PromptEmbeds, seed: int, steps: int, guidance_scale: float) -> Part:
        t0 = time.perf_counter()
        with metrics.timed("refine"):
            results = [self._refiner.refine_tile(p, b, embeds, seed=seed, steps=steps, guidance_scale=guidance_scale)
                       for p, b in zip(pixels, boxes)]
        run = self._refiner.steps_run(steps)
        metrics.get().tiles.inc(len(boxes), tags={"stage": "refine"})
        metrics.get().steps.inc(run * len(boxes), tags={"stage": "refine"})
        return stored(results, replica=replica_id(), compute_s=time.perf_counter() - t0, steps=run)
