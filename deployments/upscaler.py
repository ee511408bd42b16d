"""Upscaler deployment: upscales a few tiles of one image per call, so one image's tiles spread over all replicas."""

import time

from ray import serve

from deployments import metrics
from deployments._replica import OwnsOutputs, TileQueue, fetch, load_model, replica_id, routed, stored
from deployments.config import ModelConfig, TileConfig
from deployments.regions import InRegion
from stages.driver import Part, UpscalerInfo
from stages.pipeline import upscaler_location
from stages.types import TileBox
from stages.upscale import Upscaler


@serve.deployment(name="upscaler")
class UpscalerDeployment(InRegion, OwnsOutputs):
    def __init__(self, model: ModelConfig, tiles: TileConfig):
        grid = {k: v for k, v in (("tile_size", tiles.tile_size), ("overlap", tiles.overlap)) if v is not None}
        self._upscaler = Upscaler.from_pretrained(upscaler_location(load_model(model.model, model.torch_threads)),
                                                  device=model.device, **grid)
        self._tiles_per_call = tiles.tiles_per_call
        self._queue = TileQueue("upscale")

    def info(self) -> UpscalerInfo:
        u = self._upscaler
        return UpscalerInfo(u.scale, u.tile_size, u.overlap, self._tiles_per_call)

    @routed("upscale")
    async def upscale(self, image: Part, boxes: list[TileBox]) -> Part:
        """Upscale these boxes of the image (read from the object store); the results go back there."""
        return await self._queue.run(self._upscale, await fetch(image), boxes, tiles=len(boxes))

    def _upscale(self, image, boxes: list[TileBox]) -> Part:
        t0 = time.perf_counter()
        with metrics.timed("upscale"):
            results = self._upscaler.upscale_tiles(image, boxes)
        metrics.get().tiles.inc(len(boxes), tags={"stage": "upscale"})
        return stored(results, replica=replica_id(), compute_s=time.perf_counter() - t0)
