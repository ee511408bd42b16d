"""Payloads that travel between stages. Images are float tensors in [0, 1], shape [1, 3, H, W]."""

from dataclasses import dataclass, field
from typing import Callable

import torch


class Cancelled(Exception):
    """Raised from a step callback to stop a stage between two steps."""


@dataclass
class PromptEmbeds:
    """Text conditioning for one prompt (and its negative), ready for a UNet's cross-attention."""

    model_id: str
    prompt_embeds: torch.Tensor  # [1, T, D] token states
    negative_embeds: torch.Tensor  # [1, T, D]
    pooled: torch.Tensor | None = None  # [1, P] pooled text embedding (SDXL's text_embeds)
    negative_pooled: torch.Tensor | None = None  # [1, P]
    truncated: bool = False  # the prompt was cut at the encoder's token limit
    token_limit: int = 0
    cache_hit: bool = False


@dataclass
class BaseImage:
    """The base generator's output: the composition at the model's base resolution."""

    image: torch.Tensor  # [1, 3, h, w] in [0, 1]
    seed: int
    steps: int  # denoising steps actually run
    meta: dict = field(default_factory=dict)


@dataclass
class Tile:
    """One independent unit of upscaling or refining work: a box of a source image and its pixels.

    (x, y, w, h) is the box in source pixels; `pixels` is the input, `result` the output once done.
    """

    index: int
    x: int
    y: int
    w: int
    h: int
    pixels: torch.Tensor  # [1, 3, h, w]
    result: torch.Tensor | None = None  # [1, 3, h*s, w*s] for the upscaler, [1, 3, h, w] for the refiner
    meta: dict = field(default_factory=dict)


@dataclass
class StepEvent:
    """Progress of one stage: `step` of `total` done.

    Base generator only: `latents` after the step, `denoised` the scheduler's estimate of the final
    latents (when it gives one; else the latents), for previews.
    """

    stage: str
    step: int
    total: int
    latents: torch.Tensor | None = None  # [1, C, h/8, w/8]
    denoised: torch.Tensor | None = None  # [1, C, h/8, w/8]


StepCallback = Callable[[StepEvent], None]
