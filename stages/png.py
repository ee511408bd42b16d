"""PNG encoding with metadata text chunks. Same pixels and metadata -> the same bytes."""

import io

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def encode_png(image: torch.Tensor, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt round-trips
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image), "RGB").save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()
