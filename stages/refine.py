"""Refiner: a low-strength img2img detail pass on the tiles of the upscaled image that need it most.

Tiles are scored by high-frequency energy; the top ones within the tier's budget are re-denoised with
diffusers' img2img pipeline on the prompt's embeddings, then blended back under a mask that is zero at
every tile edge inside the image, so the result is continuous across tile borders (no seams).
"""

from stages import _torchvision_compat  # noqa: F401  (first: see that module)
import math

import torch
import torch.nn.functional as F

from stages import tiling
from stages.generate import make_scheduler, preferred_scheduler
from stages.models import ModelDir
from stages.types import PromptEmbeds, TileBox

# The detail pass re-noises each tile to this signal-to-noise ratio: enough to redraw edges, too little to
# redraw what the tile shows. It is where strength 0.3 starts on the plain cosine schedule; as a noise level
# rather than a share of the schedule, it means the same on shifted (`--noise-shift`) and linear schedules.
REFINE_START_SNR = 3.7

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
_LUMA = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]


def detail_map(image: torch.Tensor) -> torch.Tensor:
    """|Laplacian| of luminance: [1, 3, H, W] -> [1, 1, H, W], high where edges and texture are."""
    luma = (image * _LUMA).sum(1, keepdim=True)
    return F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), _LAPLACIAN).abs()


def select_tiles(image: torch.Tensor, tile_size: int, overlap: int, budget: int) -> list[TileBox]:
    """The `budget` boxes of the tile grid with the most detail energy, in grid order."""
    _, _, height, width = image.shape
    detail = detail_map(image)
    boxes = tiling.boxes(width, height, tile_size, overlap)
    scores = [detail[..., y : y + h, x : x + w].mean().item() for x, y, w, h in boxes]
    ranked = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))[: max(0, budget)]
    return [TileBox(i, *boxes[i]) for i in sorted(ranked)]


def crop(image: torch.Tensor, box: TileBox) -> torch.Tensor:
    """A box of [1, 3, H, W], as its own tensor: [1, 3, h, w]."""
    return image[..., box.y : box.y + box.h, box.x : box.x + box.w].clone()


def blend_tiles(image: torch.Tensor, results: list[torch.Tensor], boxes: list[TileBox], overlap: int) -> torch.Tensor:
    """Composite refined tiles (`results[i]` is `boxes[i]` refined) under masks that fall to zero at interior edges.

    Where refined tiles overlap, their pixels are averaged by mask weight; the union of the masks then blends that
    over the original. Both are continuous, so no tile edge leaves a seam. Summed in the boxes' order.
    """
    _, _, height, width = image.shape
    refined = torch.zeros_like(image)
    weight = torch.zeros(1, 1, height, width)
    for t, result in zip(boxes, results, strict=True):
        mask = tiling.feather(t.w, t.h, *tiling.ramps(t[1:], width, height, overlap), from_zero=True)
        refined[..., t.y : t.y + t.h, t.x : t.x + t.w] += result * mask
        weight[..., t.y : t.y + t.h, t.x : t.x + t.w] += mask
    cover = weight.clamp(max=1.0)
    return image * (1 - cover) + refined / weight.clamp(min=1e-8) * cover


def strength_for_snr(scheduler_config: dict, snr: float) -> float:
    """The img2img strength that starts at the first timestep whose SNR is at most `snr` on this schedule."""
    if snr <= 0:
        raise ValueError(f"snr must be positive; got {snr}")
    alphas = make_scheduler("ddim", scheduler_config).alphas_cumprod  # [T], the schedule every sampler shares
    below = (alphas / (1 - alphas) <= snr).nonzero()
    t = int(below[0]) if len(below) else len(alphas) - 1
    return (t + 1) / len(alphas)


class Refiner:
    """Detail pass over selected tiles. The UNet is the base model's or a refiner UNet of its own."""

    def __init__(
        self,
        unet,
        vae,
        scheduler_config: dict,
        model_id: str,
        family: str = "sd",
        tile_size: int | None = None,
        overlap: int | None = None,
        strength: float | None = None,
    ):
        if strength is None:
            strength = strength_for_snr(scheduler_config, REFINE_START_SNR)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"refiner strength must be in (0, 1]; got {strength}")
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.model_id = model_id
        self.family = family
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.tile_size = tile_size or unet.config.sample_size * vae_factor  # the UNet's native resolution
        self.overlap = overlap if overlap is not None else self.tile_size // 8
        self.strength = strength

    @classmethod
    def from_pretrained(cls, model: ModelDir, device="cpu", dtype=torch.float32, **kwargs) -> "Refiner":
        unet = model.load_optional_unet("refiner", dtype)
        if unet is None:
            unet = model.load("unet", dtype)
        vae = model.load("vae", dtype)
        return cls(unet.to(device), vae.to(device), model.scheduler_config(), model.model_id, model.family, **kwargs)

    def steps_run(self, steps: int) -> int:
        """Denoising steps one tile actually runs: img2img skips the first (1 - strength) of the schedule."""
        return max(1, int(self._schedule_steps(steps) * self.strength))

    def _schedule_steps(self, steps: int) -> int:
        return max(steps, math.ceil(1 / self.strength))

    def _pipeline(self):
        # A new pipeline object per call: cheap (it only holds references) and its scheduler state is private.
        scheduler = make_scheduler(preferred_scheduler(self.scheduler_config), self.scheduler_config)
        if self.family == "sdxl":
            from diffusers import StableDiffusionXLImg2ImgPipeline

            pipe = StableDiffusionXLImg2ImgPipeline(
                vae=self.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                unet=self.unet, scheduler=scheduler, requires_aesthetics_score=False,
            )
        else:
            from diffusers import StableDiffusionImg2ImgPipeline

            pipe = StableDiffusionImg2ImgPipeline(
                vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.inference_mode()
    def refine_tile(self, pixels: torch.Tensor, box: TileBox, embeds: PromptEmbeds, *, seed: int, steps: int,
                    guidance_scale: float) -> torch.Tensor:
        """Re-denoise one tile ([1, 3, h, w], cut at `box`) at low strength; seed + the tile's index keeps every tile
        reproducible wherever it runs."""
        device, dtype = self.unet.device, self.unet.dtype
        kwargs = {}
        if self.family == "sdxl":
            kwargs = {
                "pooled_prompt_embeds": embeds.pooled.to(device, dtype),
                "negative_pooled_prompt_embeds": embeds.negative_pooled.to(device, dtype),
                "original_size": (box.h, box.w),
                "target_size": (box.h, box.w),
            }
        out = self._pipeline()(
            prompt_embeds=embeds.prompt_embeds.to(device, dtype),
            negative_prompt_embeds=embeds.negative_embeds.to(device, dtype),
            image=pixels.to(device, dtype),
            strength=self.strength,
            num_inference_steps=self._schedule_steps(steps),
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed + box.index),
            output_type="pt",
            **kwargs,
        ).images  # [1, 3, h, w] in [0, 1]
        return out.float().cpu().clamp(0, 1)
