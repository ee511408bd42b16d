"""Refiner deployment: refines one tile per call, so several replicas share one image's detail pass."""

import time

from ray import serve

from deployments import metrics
from deployments._replica import TileQueue, load_model, replica_id
from stages.refine import Refiner
from stages.types import PromptEmbeds, Tile


@serve.deployment(name="refiner")
class RefinerDeployment:
    def __init__(self, model: str | None = None, device: str = "cpu", torch_threads: int = 1):
        self._refiner = Refiner.from_pretrained(load_model(model, torch_threads), device=device)
        self._queue = TileQueue("refine")

    def info(self) -> dict:
        r = self._refiner
        return {"tile_size": r.tile_size, "overlap": r.overlap, "strength": r.strength}

    async def refine_tile(self, tile: Tile, embeds: PromptEmbeds, seed: int, steps: int, guidance_scale: float) -> Tile:
        return await self._queue.run(self._refine, tile, embeds, seed, steps, guidance_scale)

    def _refine(self, tile: Tile, embeds: PromptEmbeds, seed: int, steps: int, guidance_scale: float) -> Tile:
        t0 = time.perf_counter()
        with metrics.timed("refine"):
            tile = self._refiner.refine_tile(tile, embeds, seed=seed, steps=steps, guidance_scale=guidance_scale)
        tile.meta["compute_s"] = time.perf_counter() - t0
        metrics.get().tiles.inc(tags={"stage": "refine"})
        metrics.get().steps.inc(self._refiner.steps_run(steps), tags={"stage": "refine"})
        tile.pixels = tile.pixels[..., :0, :0]  # the caller has the input; send back only the result
        tile.meta["replica"] = replica_id()
        tile.meta["steps"] = self._refiner.steps_run(steps)
        return tile
