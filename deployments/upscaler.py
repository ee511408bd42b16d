"""Upscaler deployment: upscales one tile per call, so the tiles of one image spread over all replicas."""

import time

from ray import serve

from deployments import metrics
from deployments._replica import TileQueue, load_model, replica_id
from stages.pipeline import upscaler_location
from stages.types import Tile
from stages.upscale import Upscaler


@serve.deployment(name="upscaler")
class UpscalerDeployment:
    def __init__(self, model: str | None = None, device: str = "cpu", torch_threads: int = 1, tile_size: int = 256, overlap: int = 16):
        self._upscaler = Upscaler.from_pretrained(upscaler_location(load_model(model, torch_threads)), device=device, tile_size=tile_size, overlap=overlap)
        self._queue = TileQueue("upscale")

    def info(self) -> dict:
        u = self._upscaler
        return {"scale": u.scale, "tile_size": u.tile_size, "overlap": u.overlap}

    async def upscale_tile(self, tile: Tile) -> Tile:
        return await self._queue.run(self._upscale, tile)

    def _upscale(self, tile: Tile) -> Tile:
        t0 = time.perf_counter()
        with metrics.timed("upscale"):
            tile = self._upscaler.upscale_tile(tile)
        tile.meta["compute_s"] = time.perf_counter() - t0
        metrics.get().tiles.inc(tags={"stage": "upscale"})
        tile.pixels = tile.pixels[..., :0, :0]  # the caller has the input; send back only the result
        tile.meta["replica"] = replica_id()
        return tile
