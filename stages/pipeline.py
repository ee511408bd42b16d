"""All four stages in one process: prompt encoder -> base generator -> upscaler -> refiner.

`Flashtile` holds the stage objects and runs the pipeline (stages/driver.py) on them: it backs `flashtile generate`
and is the reference the cluster (the same driver over Ray Serve handles) is compared with, pixel for pixel.
"""

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from stages import driver, sizes
from stages.compose import Compositor
from stages.driver import FileSpec, Part
from stages.encode import PromptEncoder
from stages.generate import BaseGenerator
from stages.models import ModelDir, resolve_model
from stages.refine import Refiner
from stages.types import PromptEmbeds, StepEvent, TileBox
from stages.upscale import Upscaler

DEFAULT_STEPS = {"fast": 4, "quality": 30}
DEFAULT_GUIDANCE = 5.0  # for models whose flashtile.json names no guidance for the mode


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
    """The four stages in this process, and the executor that runs the pipeline (stages/driver.py) on them."""

    def __init__(self, encoder: PromptEncoder, generator: BaseGenerator, upscaler: Upscaler, refiner: Refiner,
                 compositor: Compositor | None = None):
        self.encoder = encoder
        self.generator = generator
        self.upscaler = upscaler
        self.refiner = refiner
        self.compositor = compositor or Compositor()

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

    def render(self, params: GenerationParams, file: FileSpec = FileSpec(),
               on_progress: ProgressCallback | None = None) -> driver.Render:
        """Run the pipeline here, to the file's bytes (`file.output_format` None: to the image)."""

        async def drive() -> driver.Render:
            async for event in driver.run(self, params, file, stream=on_progress is not None):
                if event["event"] == "result":
                    return event["render"]
                on_progress(StepEvent(event["stage"], event["step"], event["total"]))
            raise RuntimeError("the pipeline ended without a result")

        return asyncio.run(drive())

    def __call__(self, params: GenerationParams, on_progress: ProgressCallback | None = None) -> GenerationResult:
        """The final image as a tensor, before watermark and encoding."""
        r = self.render(params, FileSpec(output_format=None), on_progress)
        return GenerationResult(r.output, params, r.model_id, r.steps, r.timings, r.prompt_truncated)

    # --- the executor (stages/driver.Executor): each step at once, in this process ------------------------------

    async def info(self) -> driver.StageInfo:
        g, u, r = self.generator, self.upscaler, self.refiner
        return driver.StageInfo(
            driver.GeneratorInfo(g.model_id, g.base_resolution, g.size_multiple, g.default_scheduler, g.default_guidance),
            driver.UpscalerInfo(u.scale, u.tile_size, u.overlap),
            driver.RefinerInfo(r.tile_size, r.overlap, r.strength),
        )

    def encode(self, prompt: str, negative_prompt: str) -> PromptEmbeds:
        return self.encoder(prompt, negative_prompt)

    async def generate(self, embeds: PromptEmbeds, base: dict) -> Part:
        return self._generate(embeds, base)

    def _generate(self, embeds: PromptEmbeds, base: dict, on_step=None) -> Part:
        b = self.generator(embeds, on_step=on_step, **base)
        return Part(b.image, {"steps": b.steps, "prompt_truncated": embeds.truncated})

    async def generate_stream(self, embeds: PromptEmbeds, base: dict, preview_every: int, request_id: str):
        # The generator runs in a thread; its steps come back through a queue as they happen (no previews here).
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        step = lambda e: loop.call_soon_threadsafe(events.put_nowait, {"stage": "base", "step": e.step, "total": e.total})  # noqa: E731
        work = asyncio.ensure_future(asyncio.to_thread(self._generate, embeds, base, step))
        while not (work.done() and events.empty()):
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait([getter, work], return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        yield work.result()

    async def upscale(self, image: Part, boxes: list[TileBox]) -> Part:
        t0 = time.perf_counter()
        results = self.upscaler.upscale_tiles(image.pixels, boxes)
        return Part(results, {"compute_s": time.perf_counter() - t0})

    async def merge(self, parts: list[Part], boxes: list[list[TileBox]], size, scale: int, overlap: int) -> Part:
        return Part(self.compositor.merge([p.pixels for p in parts], boxes, size, scale, overlap))

    async def resize(self, image: Part, size) -> Part:
        return Part(self.compositor.resize(image.pixels, size))

    async def select(self, image: Part, budget: int, tile_size: int, overlap: int) -> list[Part]:
        return [Part(pixels, {"box": box}) for box, pixels in self.compositor.select(image.pixels, budget, tile_size, overlap)]

    async def refine(self, crops: list[Part], embeds: PromptEmbeds, seed: int, steps: int, guidance_scale: float) -> Part:
        t0 = time.perf_counter()
        results = [self.refiner.refine_tile(c.pixels, c.meta["box"], embeds, seed=seed, steps=steps,
                                            guidance_scale=guidance_scale) for c in crops]
        return Part(results, {"compute_s": time.perf_counter() - t0, "steps": self.refiner.steps_run(steps)})

    async def finish(self, image: Part, refined: list[Part], boxes, overlap: int, request_id: str, text: dict,
                     file: FileSpec):
        return self.compositor.finish(image.pixels, [p.pixels for p in refined], boxes, overlap, request_id, text, file)

    async def detect(self, data: bytes):
        return self.compositor.detect(data)

    def cancel(self) -> dict[str, int]:
        return {}  # every step ran to its end before the next began


def upscaler_location(model: ModelDir):
    """The model's own upscaler folder, or the embedded default's for checkpoints that ship none."""
    if model.upscaler_dir is not None:
        return model.upscaler_dir
    return resolve_model(None).upscaler_dir
