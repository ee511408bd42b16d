"""PNG encoding with metadata text chunks and the invisible watermark. Same pixels, request id and metadata -> the
same bytes."""

import io

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from stages import watermark


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def encode_png(image: torch.Tensor, text: dict[str, str] | None = None, *, request_id: str) -> bytes:
    """[1, 3, H, W] RGB in [0, 1] -> PNG bytes carrying the invisible watermark for `request_id` (12 hex digits).

    Every image is marked: there is no way to encode one without. The stream's latent previews (1/8 of the base
    size, e.g. 32x32: progress frames, never an output) are marked too, at one or two pixels a cell: their mark reads
    back from the PNG itself, not after resizing or JPEG. A side under watermark.MIN_SIDE (16) raises ValueError.
    """
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt round-trips
    buf = io.BytesIO()
    marked = watermark.embed_rgb(to_uint8(image), request_id)
    Image.fromarray(marked, "RGB").save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()
