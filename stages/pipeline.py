"""All four stages in one process: prompt encoder -> base generator -> upscaler -> refiner.

The cluster runs the same stages as separate deployments; this in-process form backs `flashtile generate`
and is the reference the cluster's output is compared with.
"""

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from stages import sizes
from stages.encode import PromptEncoder
from stages.generate import BaseGenerator
from stages.models import ModelDir, resolve_model
from stages.refine import Refiner
from stages.types import StepEvent
from stages.upscale import Upscaler

DEFAULT_STEPS = {"fast": 4, "quality": 30}
DEFAULT_GUIDANCE = 5.0  # for models whose flashtile.json names no guidance for the mode
# Tiles the refiner may re-denoise per tier: detail goes where the image has the most of it.
REFINE_BUDGET = {"preview": 0, "1k": 2, "2k": 4, "4k": 8}


@dataclass(frozen=True)
class GenerationParams:
    """A request with every default resolved: what the stages run. Same params -> same pixels."""

    prompt: str
    negative_prompt: str
    seed: int
    size: str
    aspect_ratio: str
    mode: str
    steps: int
    guidance_scale: float
    scheduler: str

    def as_dict(self) -> dict:
        return asdict(self)


def guidance_for(mode: str, model_guidance: dict[str, float] | None) -> float:
    """A mode's default guidance: the model's own (its flashtile.json), else DEFAULT_GUIDANCE."""
    return (model_guidance or {}).get(mode, DEFAULT_GUIDANCE)


def resolve_params(
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int | None = None,
    size: str = "1k",
    aspect_ratio: str = "1:1",
    mode: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    default_scheduler: str = "hybrid",
    default_guidance: dict[str, float] | None = None,
) -> GenerationParams:
    """Fill the defaults: a drawn seed, steps and guidance by mode (the model's own guidance where it has one)."""
    if size not in sizes.TIERS:
        raise ValueError(f"size must be one of {', '.join(sizes.TIERS)}; got {size!r}")
    if mode is None:
        mode = "fast" if size == "preview" else "quality"
    if mode not in sizes.MODES:
        raise ValueError(f"mode must be one of {', '.join(sizes.MODES)}; got {mode!r}")
    if size == "preview" and mode != "fast":
        raise ValueError("mode must be 'fast' for size 'preview' (a preview is the fast base render)")
    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=random.SystemRandom().randrange(2**31) if seed is None else seed,
        size=size,
        aspect_ratio=aspect_ratio,
        mode=mode,
        steps=steps if steps is not None else DEFAULT_STEPS[mode],
        guidance_scale=guidance_for(mode, default_guidance) if guidance_scale is None else guidance_scale,
        scheduler=scheduler or default_scheduler,
    )


@dataclass
class GenerationResult:
    image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    params: GenerationParams
    model_id: str
    steps: dict[str, int] = field(default_factory=dict)  # steps / tiles actually run per stage
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    prompt_truncated: bool = False

    @property
    def width(self) -> int:
        return self.image.shape[-1]

    @property
    def height(self) -> int:
        return self.image.shape[-2]


ProgressCallback = Callable[[StepEvent], None]


class Flashtile:
    """The four stages, wired in process."""

    def __init__(self, encoder: PromptEncoder, generator: BaseGenerator, upscaler: Upscaler, refiner: Refiner):
        self.encoder = encoder
        self.generator = generator
        self.upscaler = upscaler
        self.refiner = refiner

    @classmethod
    def from_pretrained(cls, location: str | None = None, device: str = "cpu") -> "Flashtile":
        return cls.from_model(resolve_model(location), device)

    @classmethod
    def from_model(cls, model: ModelDir, device: str = "cpu") -> "Flashtile":
        return cls(
            PromptEncoder.from_pretrained(model, device=device),
            BaseGenerator.from_pretrained(model, device=device),
            Upscaler.from_pretrained(upscaler_location(model), device=device),
            Refiner.from_pretrained(model, device=device),
        )

    @property
    def model_id(self) -> str:
        return self.generator.model_id

    def params(self, prompt: str, **fields) -> GenerationParams:
        g = self.generator
        return resolve_params(prompt, default_scheduler=g.default_scheduler, default_guidance=g.default_guidance, **fields)

    def output_size(self, params: GenerationParams) -> tuple[int, int]:
        if params.size == "preview":
            return self.base_size(params)
        return sizes.output_size(params.size, params.aspect_ratio, self.generator.base_resolution)

    def base_size(self, params: GenerationParams) -> tuple[int, int]:
        g = self.generator
        return sizes.base_size(params.aspect_ratio, g.base_resolution, g.size_multiple)

    def __call__(self, params: GenerationParams, on_progress: ProgressCallback | None = None) -> GenerationResult:
        timings, steps = {}, {}
        report = on_progress or (lambda event: None)

        # 1. Encode the prompt (cached per model and text).
        t0 = time.perf_counter()
        embeds = self.encoder(params.prompt, params.negative_prompt)
        timings["encode"] = time.perf_counter() - t0
        report(StepEvent("encode", 1, 1))

        # 2. Compose at base resolution.
        t0 = time.perf_counter()
        width, height = self.base_size(params)
        base = self.generator(
            embeds, seed=params.seed, width=width, height=height, steps=params.steps,
            guidance_scale=params.guidance_scale, scheduler=params.scheduler, mode=params.mode, on_step=report,
        )
        timings["base"] = time.perf_counter() - t0
        steps["base"] = base.steps
        image = base.image
        if params.size == "preview":
            return GenerationResult(image, params, self.model_id, steps, timings, embeds.truncated)

        # 3. Upscale to the tier's exact size.
        t0 = time.perf_counter()
        image, tiles = self.upscaler(image, self.output_size(params), lambda n, total: report(StepEvent("upscale", n, total)))
        timings["upscale"] = time.perf_counter() - t0
        steps["upscale_tiles"] = tiles

        # 4. Refine the tiles with the most detail.
        t0 = time.perf_counter()
        image, refined = self.refiner(
            image, embeds, seed=params.seed, budget=REFINE_BUDGET[params.size], steps=params.steps,
            guidance_scale=params.guidance_scale, on_tile=lambda n, total: report(StepEvent("refine", n, total)),
        )
        timings["refine"] = time.perf_counter() - t0
        steps["refine_tiles"] = refined
        steps["refine_steps_per_tile"] = self.refiner.steps_run(params.steps) if refined else 0
        return GenerationResult(image, params, self.model_id, steps, timings, embeds.truncated)


def upscaler_location(model: ModelDir):
    """The model's own upscaler folder, or the embedded default's for checkpoints that ship none."""
    if model.upscaler_dir is not None:
        return model.upscaler_dir
    return resolve_model(None).upscaler_dir

