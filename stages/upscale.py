"""Upscaler: AI super-resolution from the base image to the tier's exact size, tile by tile.

Each tile is an independent unit of work (the cluster spreads tiles over replicas); overlapping tiles are blended
with feathered weights, so any output size runs in bounded memory and shows no seams.
"""

from stages import _torchvision_compat  # noqa: F401  (first: see that module)
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages import tiling
from stages.models import check_safetensors_only
from stages.types import TileBox

SPANDREL_WEIGHTS = "model.safetensors"


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of [1, 3, H, W] to (width, height), clamped to [0, 1]."""
    if (image.shape[-1], image.shape[-2]) == tuple(size):
        return image
    out = F.interpolate(image, size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1)


class SpandrelUpscaler:
    """Any super-resolution architecture spandrel detects (ESRGAN, Compact, SwinIR, ...), from safetensors."""

    def __init__(self, model: torch.nn.Module, scale: int):
        self.model = model.eval().requires_grad_(False)
        self.scale = scale

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "SpandrelUpscaler":
        from safetensors.torch import load_file
        from spandrel import ImageModelDescriptor, ModelLoader

        path = Path(path)
        check_safetensors_only(path.parent)
        descriptor = ModelLoader(device=device).load_from_state_dict(load_file(path, device=str(device)))
        if not isinstance(descriptor, ImageModelDescriptor) or descriptor.scale < 2:
            raise ValueError(f"upscaler weights {path} are not a super-resolution model (scale {descriptor.scale})")
        return cls(descriptor.model, descriptor.scale)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, folder / SPANDREL_WEIGHTS)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [1, 3, h, w] in [0, 1] on any device -> [1, 3, h*s, w*s] float32 on the CPU, where tiles are blended
        weight = next(self.model.parameters())
        return self.model(x.to(weight.device, weight.dtype)).clamp(0, 1).float().cpu()


class DiffusersX4Upscaler:
    """diffusers' Stable Diffusion x4 upscaler (a latent diffusion model) as an upscaler backend."""

    scale = 4

    def __init__(self, pipeline, steps: int = 20, noise_level: int = 20, prompt: str = ""):
        self.pipeline = pipeline
        self.steps = steps
        self.noise_level = noise_level
        self.prompt = prompt

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", **kwargs) -> "DiffusersX4Upscaler":
        from diffusers import StableDiffusionUpscalePipeline

        check_safetensors_only(Path(folder))
        pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), **kwargs)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A fixed generator per call: the same tile always upscales to the same pixels.
        generator = torch.Generator(device="cpu").manual_seed(0)
        out = self.pipeline(
            prompt=self.prompt,
            image=x,
            num_inference_steps=self.steps,
            noise_level=self.noise_level,
            guidance_scale=0.0,
            generator=generator,
            output_type="pt",
        ).images
        return out.clamp(0, 1).float().cpu()


def build_compact_upscaler(seed: int, num_feat: int = 24, num_conv: int = 4, scale: int = 4) -> SpandrelUpscaler:
    """A small Compact (Real-ESRGAN SRVGG) x4 net, deterministic from `seed`.

    The last convolution starts at zero, so before training the net returns its built-in nearest-neighbour
    upsampling exactly: a neutral upscaler that training (a later model) only improves.
    """
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact

    torch.manual_seed(seed)
    model = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    torch.nn.init.zeros_(model.body[-1].weight)
    torch.nn.init.zeros_(model.body[-1].bias)
    return SpandrelUpscaler(model, scale)


def load_upscaler_backend(folder: str | Path, device="cpu"):
    """An upscaler folder holds spandrel weights (model.safetensors) or a diffusers SD x4 upscaler."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return DiffusersX4Upscaler.from_pretrained(folder, device=device)
    if (folder / SPANDREL_WEIGHTS).is_file():
        return SpandrelUpscaler.from_file(folder / SPANDREL_WEIGHTS, device=device)
    check_safetensors_only(folder)  # a folder holding only a pickle gets the pickle error, not "missing"
    raise ValueError(f"upscaler folder {folder} has neither {SPANDREL_WEIGHTS} nor model_index.json")


@dataclass
class UpscalePass:
    """One step of an upscale plan: the AI model (x scale) or a plain resize, to `size` = (width, height)."""

    kind: str  # "model" | "resize"
    size: tuple[int, int]


def plan(scale: int, src: tuple[int, int], dst: tuple[int, int]) -> list[UpscalePass]:
    """Model passes at native resolution until the image covers `dst`, then one antialiased resize.

    The model never sees a downsampled input: it computes at input resolution, so overshooting and resizing down
    costs little and keeps all the base image's detail.
    """
    passes, (w, h) = [], src
    n = max(0, math.ceil(math.log(max(dst[0] / w, dst[1] / h), scale) - 1e-9))
    for _ in range(n):
        w, h = w * scale, h * scale
        passes.append(UpscalePass("model", (w, h)))
    if (w, h) != tuple(dst):
        passes.append(UpscalePass("resize", tuple(dst)))
    return passes


def merge(results: list[torch.Tensor], boxes: list[TileBox], size: tuple[int, int], scale: int, overlap: int) -> torch.Tensor:
    """Blend upscaled tiles (`results[i]` is `boxes[i]` x scale) of a `size` = (width, height) source: feathered
    weights, normalised. Summed in the boxes' order, so the same tiles give the same pixels however they arrived."""
    s = scale
    width, height = size
    canvas = torch.zeros(1, 3, height * s, width * s)
    weight = torch.zeros(1, 1, height * s, width * s)
    for b, result in zip(boxes, results, strict=True):
        left, top, right, bottom = tiling.ramps(b[1:], width, height, overlap)
        mask = tiling.feather(b.w * s, b.h * s, left * s, top * s, right * s, bottom * s)
        box = (..., slice(b.y * s, (b.y + b.h) * s), slice(b.x * s, (b.x + b.w) * s))
        canvas[box] += result.float().cpu() * mask
        weight[box] += mask
    return (canvas / weight).clamp(0, 1)


class Upscaler:
    """Tiled AI upscaling: a backend that multiplies a tile's sides by `scale`, and the tile grid it runs on.

    Each tile is upscaled on its own (stages/driver.py plans the passes, spreads the tiles and merges them), so
    any output size runs in bounded memory, on one process or over many replicas.
    """

    def __init__(self, backend, tile_size: int = 256, overlap: int = 16):
        if overlap * 2 >= tile_size:
            raise ValueError(f"upscaler overlap {overlap} must be less than half the tile size {tile_size}")
        self.backend = backend
        self.scale = backend.scale
        self.tile_size = tile_size
        self.overlap = overlap

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", **kwargs) -> "Upscaler":
        return cls(load_upscaler_backend(folder, device=device), **kwargs)

    def upscale_tiles(self, image: torch.Tensor, boxes: list[TileBox]) -> list[torch.Tensor]:
        """Upscale the given boxes of [1, 3, H, W], each on its own: [1, 3, h*s, w*s] per box."""
        return [self.backend(image[..., b.y : b.y + b.h, b.x : b.x + b.w]) for b in boxes]
