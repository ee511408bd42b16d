"""Output tiers and aspect ratios: the one table every part of Flashtile reads sizes from.

A tier fixes the long side exactly; the aspect ratio fixes the short side. All sizes are (width, height).
"""

from typing import Literal

Tier = Literal["preview", "1k", "2k", "4k"]
Aspect = Literal["1:1", "4:3", "3:4", "16:9", "9:16"]
Mode = Literal["fast", "quality"]
SchedulerName = Literal["euler", "dpmpp_2m_karras", "hybrid", "ddim"]
OutputFormat = Literal["png", "jpeg", "webp"]  # stages.imagefile encodes them

TIERS: tuple[str, ...] = ("preview", "1k", "2k", "4k")
ASPECTS: tuple[str, ...] = ("1:1", "4:3", "3:4", "16:9", "9:16")
MODES: tuple[str, ...] = ("fast", "quality")
SCHEDULERS: tuple[str, ...] = ("euler", "dpmpp_2m_karras", "hybrid", "ddim")
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
MAX_GUIDANCE = 30.0  # classifier-free guidance scale, requests and model defaults alike

LONG_SIDE = {"1k": 1024, "2k": 2048, "4k": 4096}
# Tiles the refiner may re-denoise per tier: detail goes where the image has the most of it.
REFINE_BUDGET = {"preview": 0, "1k": 2, "2k": 4, "4k": 8}


def _ratio(aspect: str) -> tuple[int, int]:
    if aspect not in ASPECTS:
        raise ValueError(f"aspect_ratio must be one of {', '.join(ASPECTS)}; got {aspect!r}")
    w, h = aspect.split(":")
    return int(w), int(h)


def output_size(tier: str, aspect: str, base_resolution: int) -> tuple[int, int]:
    """Exact (width, height) of a tier's output; `preview` is the base image itself."""
    if tier not in TIERS:
        raise ValueError(f"size must be one of {', '.join(TIERS)}; got {tier!r}")
    if tier == "preview":
        return base_size(aspect, base_resolution)
    long_side = LONG_SIDE[tier]
    rw, rh = _ratio(aspect)
    # Every tier's long side is divisible by 16 and 9, so the short side is exact: 4096 * 9 / 16 = 2304.
    if rw >= rh:
        return long_side, long_side * rh // rw
    return long_side * rw // rh, long_side


def base_size(aspect: str, base_resolution: int, multiple: int = 64) -> tuple[int, int]:
    """(width, height) the base generator draws at: about base_resolution**2 pixels at the aspect ratio.

    Sides are multiples of `multiple` (the UNet's downsampling factor in pixels), as SDXL's 1344x768 for 16:9.
    """
    rw, rh = _ratio(aspect)
    area = base_resolution * base_resolution
    width = (area * rw / rh) ** 0.5
    height = width * rh / rw
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)
