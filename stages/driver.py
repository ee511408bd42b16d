"""The pipeline, once: encode -> base -> upscale passes -> refine -> watermark + encode, over an executor.

An executor runs each step where its pixels are: `stages.pipeline.Flashtile` on the stage objects of one process
(`flashtile generate`), `deployments.executor.ServeExecutor` on Ray Serve handles (the cluster), where images and
tiles go from stage replica to stage replica as object references. The driver holds handles to pixels, never
pixels: it plans the passes, cuts the tile grid into calls, puts results in tile order and writes the provenance.
Both executors get the same calls in the same order, so a request and seed give the same pixels from either.
"""

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from stages import sizes, tiling
from stages.imagefile import provenance
from stages.types import TileBox
from stages.upscale import plan

if TYPE_CHECKING:
    from stages.pipeline import GenerationParams

PREVIEWS_PER_RUN = 8  # streamed base previews per request, at most
P = TypeVar("P")


# --- what executors answer ---------------------------------------------------------------------------------------


@dataclass
class Part(Generic[P]):
    """A step's output: a handle to its pixels (tensors in process, an object reference in the cluster) and what
    the driver needs to know of how they were made (replica, compute_s, steps, box, ...)."""

    pixels: P
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratorInfo:
    model_id: str
    base_resolution: int  # pixels: UNet sample size x VAE factor
    size_multiple: int  # base sides divide by this
    default_scheduler: str
    default_guidance: dict[str, float]  # mode -> scale, the model's own (flashtile.json); may be empty


@dataclass(frozen=True)
class UpscalerInfo:
    scale: int
    tile_size: int
    overlap: int
    tiles_per_call: int = 1


@dataclass(frozen=True)
class RefinerInfo:
    tile_size: int
    overlap: int
    strength: float
    tiles_per_call: int = 1


@dataclass(frozen=True)
class StageInfo:
    generator: GeneratorInfo
    upscaler: UpscalerInfo
    refiner: RefinerInfo


@dataclass(frozen=True)
class FileSpec:
    """The file to write. `output_format` None: no file, the final image's handle instead (in process only)."""

    output_format: str | None = "png"
    compression: int | None = None


class Executor(Protocol):
    """Where each step runs. Every method but `encode` and `cancel` may be awaited concurrently."""

    async def info(self) -> StageInfo: ...

    def encode(self, prompt: str, negative_prompt: str) -> Any:
        """Start encoding; the handle goes on to `generate` and `refine` unawaited."""

    async def generate(self, embeds: Any, base: dict) -> Part:
        """The base image. meta: steps, replica, batch_size, prompt_truncated."""

    def generate_stream(self, embeds: Any, base: dict, preview_every: int, request_id: str) -> AsyncIterator[dict | Part]:
        """Progress dicts ({stage, step, total}, some with `preview_png_b64`), then the base image's Part."""

    async def upscale(self, image: Part, boxes: list[TileBox]) -> Part:
        """Upscale these boxes of the image, each on its own. pixels: the results in the boxes' order."""

    async def merge(self, parts: list[Part], boxes: list[list[TileBox]], size: tuple[int, int], scale: int,
                    overlap: int) -> Part:
        """Blend upscaled tiles (parts[i] holds boxes[i]) of a `size` source into one image."""

    async def resize(self, image: Part, size: tuple[int, int]) -> Part: ...

    async def select(self, image: Part, budget: int, tile_size: int, overlap: int) -> list[Part]:
        """The tiles most in need of detail, one Part each: pixels the crop, meta["box"] its TileBox."""

    async def refine(self, crops: list[Part], embeds: Any, seed: int, steps: int, guidance_scale: float) -> Part:
        """Refine crops. pixels: the results in the crops' order; meta: replica, compute_s, steps (per tile)."""

    async def finish(self, image: Part, refined: list[Part], boxes: list[list[TileBox]], overlap: int, request_id: str,
                     text: dict[str, str], file: FileSpec) -> Any:
        """Blend the refined tiles in, watermark, encode: the file's bytes (or the image, when file asks none)."""

    async def detect(self, data: bytes) -> Any:
        """Read the watermark of an encoded image (stages.watermark.Detection)."""

    def cancel(self) -> dict[str, int]:
        """Stop the calls still open (the request ended early); how many per stage."""


# --- what the driver answers -------------------------------------------------------------------------------------


@dataclass
class Render:
    params: "GenerationParams"
    request_id: str
    model_id: str
    width: int
    height: int
    output: Any  # the file's bytes; the final image's handle when FileSpec.output_format is None
    steps: dict[str, int] = field(default_factory=dict)  # steps / tiles actually run per stage
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, as the driver saw it
    replicas: dict[str, list[str]] = field(default_factory=dict)  # who ran each stage (the cluster's replica ids)
    prompt_truncated: bool = False
    base_batch_size: int = 1


def render_id(params: "GenerationParams", model_id: str) -> str:
    """The request id the watermark carries: a hash of the resolved request and the model, so the same request
    renders the same bytes wherever it runs (12 hex digits, as watermark.ID_HEX)."""
    blob = json.dumps({**params.as_dict(), "model": model_id}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def calls(items: list, per_call: int) -> list[list]:
    """Items cut into calls of at most `per_call` each, in order."""
    return [items[i : i + per_call] for i in range(0, len(items), max(1, per_call))]


async def in_completion_order(work: list[Awaitable]) -> AsyncIterator[tuple[int, Any]]:
    """(index, result) of each awaitable as it finishes; the ones left are cancelled if the caller stops early."""
    tasks = [asyncio.ensure_future(w) for w in work]
    index = {t: i for i, t in enumerate(tasks)}
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in sorted(done, key=index.get):
                yield index[t], t.result()
    finally:
        for t in tasks:
            t.cancel()


async def run(executor: Executor, params: "GenerationParams", file: FileSpec = FileSpec(),
              stream: bool = False) -> AsyncIterator[dict]:
    """One request through the four stages: progress events ({"event": "progress", stage, step, total}; only when
    `stream`), then {"event": "result", "render": Render}. Ended early (deadline, client gone, a stage failed), the
    executor's open calls are cancelled: queued tiles are dropped and the generator stops at its next step."""
    try:
        async for event in _stages(executor, params, file, stream):
            yield event
    finally:
        executor.cancel()


async def _stages(ex: Executor, params: "GenerationParams", file: FileSpec, stream: bool) -> AsyncIterator[dict]:
    info = await ex.info()
    g, up, ref = info.generator, info.upscaler, info.refiner
    request_id = render_id(params, g.model_id)
    timings: dict[str, float] = {}
    steps: dict[str, int] = {}
    replicas: dict[str, list[str]] = {}

    # 1+2. Encode the prompt and compose at base resolution. The embeddings go on as a handle, unawaited.
    t0 = time.perf_counter()
    embeds = ex.encode(params.prompt, params.negative_prompt)
    size = sizes.base_size(params.aspect_ratio, g.base_resolution, g.size_multiple)
    base_args = dict(seed=params.seed, width=size[0], height=size[1], steps=params.steps,
                     guidance_scale=params.guidance_scale, scheduler=params.scheduler, mode=params.mode)
    if stream:
        every = max(1, params.steps // PREVIEWS_PER_RUN)
        async for item in ex.generate_stream(embeds, base_args, every, request_id):
            if isinstance(item, Part):
                base = item
            else:
                yield {"event": "progress", **item}
    else:
        base = await ex.generate(embeds, base_args)
    timings["encode+base"] = time.perf_counter() - t0
    steps["base"], replicas["base_generator"] = base.meta["steps"], [base.meta.get("replica", "")]
    image, refined, refined_boxes = base, [], []

    if params.size != "preview":
        # 3. Upscale: model passes at native resolution, then one resize to the tier's exact size. Each pass's tile
        #    grid goes out in calls of `tiles_per_call`, all at once; results merge in tile order, not arrival order.
        t0 = time.perf_counter()
        passes = plan(up.scale, size, sizes.output_size(params.size, params.aspect_ratio, g.base_resolution))
        grids = {p.size: [TileBox(i, *b) for i, b in enumerate(tiling.boxes(p.size[0] // up.scale, p.size[1] // up.scale,
                                                                            up.tile_size, up.overlap))]
                 for p in passes if p.kind == "model"}
        total, done, seen, compute = sum(map(len, grids.values())), 0, set(), 0.0
        for p in passes:
            if p.kind == "resize":
                image = await ex.resize(image, p.size)
            else:
                batches = calls(grids[p.size], up.tiles_per_call)
                parts: list[Part] = [None] * len(batches)  # type: ignore[list-item]
                async for i, part in in_completion_order([ex.upscale(image, b) for b in batches]):
                    parts[i] = part
                    done += len(batches[i])
                    if stream:
                        yield {"event": "progress", "stage": "upscale", "step": done, "total": total}
                image = await ex.merge(parts, batches, size, up.scale, up.overlap)
                seen |= {q.meta.get("replica", "") for q in parts}
                compute += sum(q.meta.get("compute_s", 0.0) for q in parts)
            size = p.size
        timings["upscale"] = time.perf_counter() - t0
        timings["upscale_compute"] = compute  # summed over calls, whichever replica ran them
        steps["upscale_tiles"], replicas["upscaler"] = done, sorted(seen)

        # 4. Refine the tiles with the most detail, in calls of `tiles_per_call`, all at once.
        t0 = time.perf_counter()
        crops = await ex.select(image, sizes.REFINE_BUDGET[params.size], ref.tile_size, ref.overlap)
        batches, done = calls(crops, ref.tiles_per_call), 0
        refined = [None] * len(batches)
        async for i, part in in_completion_order(
                [ex.refine(b, embeds, params.seed, params.steps, params.guidance_scale) for b in batches]):
            refined[i] = part
            done += len(batches[i])
            if stream:
                yield {"event": "progress", "stage": "refine", "step": done, "total": len(crops)}
        refined_boxes = [[c.meta["box"] for c in b] for b in batches]
        timings["refine"] = time.perf_counter() - t0
        timings["refine_compute"] = sum(q.meta.get("compute_s", 0.0) for q in refined)
        steps["refine_tiles"] = len(crops)
        steps["refine_steps_per_tile"] = refined[0].meta["steps"] if refined else 0
        replicas["refiner"] = sorted({q.meta.get("replica", "") for q in refined})

    # 5. Blend the refined tiles in, watermark and encode: the file says how it was made (no timings: same request,
    #    same bytes).
    t0 = time.perf_counter()
    output = await ex.finish(image, refined, refined_boxes, ref.overlap, request_id,
                             provenance(params, steps, g.model_id, request_id), file)
    timings["watermark+encode"] = time.perf_counter() - t0
    yield {"event": "result", "render": Render(
        params=params, request_id=request_id, model_id=g.model_id, width=size[0], height=size[1], output=output,
        steps=steps, timings=timings, replicas=replicas, prompt_truncated=base.meta.get("prompt_truncated", False),
        base_batch_size=base.meta.get("batch_size", 1))}
