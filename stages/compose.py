"""The pixel work between the models, without weights: merge upscaled tiles, resize, pick and cut the tiles to
refine, blend them back, watermark and encode. `flashtile generate` runs it in process; the cluster in a deployment
of its own (deployments/compositor.py), so no pixel passes through the ingress."""

import io

import torch
from PIL import Image

from stages import watermark
from stages.driver import FileSpec
from stages.imagefile import encode_image
from stages.refine import blend_tiles, crop, select_tiles
from stages.types import TileBox
from stages.upscale import merge, resize


def flat(nested: list[list]) -> list:
    return [x for inner in nested for x in inner]


class Compositor:
    def merge(self, results: list[list[torch.Tensor]], boxes: list[list[TileBox]], size: tuple[int, int], scale: int,
              overlap: int) -> torch.Tensor:
        """Upscaled tiles, as the calls returned them (results[i] for boxes[i]), into one image: [1, 3, H*s, W*s]."""
        return merge(flat(results), flat(boxes), size, scale, overlap)

    def resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize(image, size)

    def select(self, image: torch.Tensor, budget: int, tile_size: int, overlap: int) -> list[tuple[TileBox, torch.Tensor]]:
        """The `budget` most detailed tiles, each with its crop ([1, 3, h, w]), in grid order."""
        return [(box, crop(image, box)) for box in select_tiles(image, tile_size, overlap, budget)]

    def finish(self, image: torch.Tensor, results: list[list[torch.Tensor]], boxes: list[list[TileBox]], overlap: int,
               request_id: str, text: dict[str, str], file: FileSpec) -> bytes | torch.Tensor:
        """Blend the refined tiles in, then watermark and encode the file (or return the image: no file asked)."""
        if boxes:
            image = blend_tiles(image, flat(results), flat(boxes), overlap)
        image = image.clamp(0, 1)
        if file.output_format is None:
            return image
        return encode_image(image, text, request_id=request_id, output_format=file.output_format,
                            compression=file.compression)

    def detect(self, data: bytes) -> watermark.Detection:
        """Read the watermark of an encoded image (PNG, JPEG or WebP)."""
        with Image.open(io.BytesIO(data)) as image:
            return watermark.detect(image.convert("RGB"))
