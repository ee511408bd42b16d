"""Payloads that travel between stages. Images are float tensors in [0, 1], shape [1, 3, H, W]."""

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

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
    meta: dict = field(default_factory=dict)  # where it was made (the cluster's region), for the result


@dataclass
class BaseImage:
    """The base generator's output: the composition at the model's base resolution."""

    image: torch.Tensor  # [1, 3, h, w] in [0, 1]
    seed: int
    steps: int  # denoising steps actually run
    meta: dict = field(default_factory=dict)


class TileBox(NamedTuple):
    """Where a tile sits: its index in the image's tile grid (row by row) and its box in source pixels."""

    index: int
    x: int
    y: int
    w: int
    h: int


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
