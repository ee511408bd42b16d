"""The output file: the invisible watermark, then PNG, JPEG or WebP with the request's provenance. Same pixels,
request id, metadata and settings -> the same bytes.

PNG is deflated with zlib's run-length strategy (Z_RLE): on Flashtile's renders it encodes a 4K image about
twice as fast as zlib's default strategy at level 6 (Pillow's default), and smaller (docs/benchmarks.md,
figure 7). Lossless, as before: only the compressed stream differs.
"""

import io
import json
import zlib

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from stages import watermark
from stages.sizes import OUTPUT_FORMATS

PNG_OPTIONS = {"compress_level": 6, "compress_type": zlib.Z_RLE}
DEFAULT_COMPRESSION = 100  # OpenAI's default output_compression: the lossy formats at their highest quality
_EXIF_DESCRIPTION, _EXIF_SOFTWARE = 0x010E, 0x0131


def provenance(params, steps: dict[str, int], model_id: str, request_id: str) -> dict[str, str]:
    """What every output file says of how it was made (PNG text chunks; JPEG/WebP EXIF): the resolved request
    (stages.pipeline.GenerationParams), the steps run per stage, the model and the request id. No timings, so the
    same request writes the same bytes. The one place these fields are chosen, for the CLI and the cluster alike."""
    return {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": str(params.seed),
        "size": params.size,
        "aspect_ratio": params.aspect_ratio,
        "mode": params.mode,
        "steps": ",".join(f"{k}={v}" for k, v in steps.items()),
        "guidance_scale": str(params.guidance_scale),
        "scheduler": params.scheduler,
        "model": model_id,
        "software": "Flashtile",
        "request_id": request_id,
    }


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def encode_image(
    image: torch.Tensor,
    text: dict[str, str] | None = None,
    *,
    request_id: str,
    output_format: str = "png",
    compression: int | None = None,
) -> bytes:
    """[1, 3, H, W] RGB in [0, 1] -> the file's bytes, carrying the invisible watermark for `request_id` (12 hex digits).

    Every image is marked: there is no way to encode one without. PNG keeps `text` in iTXt chunks; JPEG and WebP
    in EXIF (ImageDescription: `text` as JSON; Software: Flashtile). `compression` (0-100, the lossy formats only)
    is the encoder's quality, as OpenAI's `output_compression`. The stream's latent previews (1/8 of the base size,
    e.g. 32x32: progress frames, never an output) are marked too, at one or two pixels a cell: their mark reads back
    from the PNG itself, not after resizing or JPEG. A side under watermark.MIN_SIDE (16) raises ValueError.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}")
    marked = Image.fromarray(watermark.embed_rgb(to_uint8(image), request_id), "RGB")
    buf = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt round-trips
        marked.save(buf, format="PNG", pnginfo=info, **PNG_OPTIONS)
    else:
        exif = Image.Exif()
        exif[_EXIF_SOFTWARE] = "Flashtile"
        if text:
            exif[_EXIF_DESCRIPTION] = json.dumps({k: str(v) for k, v in text.items()})  # EXIF strings are ASCII: JSON escapes the rest
        quality = DEFAULT_COMPRESSION if compression is None else compression
        marked.save(buf, format=output_format.upper(), quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def encode_png(image: torch.Tensor, text: dict[str, str] | None = None, *, request_id: str) -> bytes:
    """encode_image as PNG."""
    return encode_image(image, text, request_id=request_id)
