"""Base generator deployment: a thin wrapper around stages.generate.BaseGenerator."""

import asyncio
import base64
import queue
import threading
from collections import defaultdict

from ray import serve

from deployments import metrics
from deployments._replica import OwnsOutputs, load_model, replica_id, routed, stored
from deployments.config import BatchConfig, ModelConfig
from deployments.regions import InRegion
from stages.driver import GeneratorInfo, Part
from stages.generate import BaseGenerator, latent_preview
from stages.imagefile import encode_png
from stages.types import BaseImage, Cancelled, PromptEmbeds, StepEvent


@serve.deployment(name="base_generator")
class GeneratorDeployment(InRegion, OwnsOutputs):
    def __init__(self, model: ModelConfig, batch: BatchConfig):
        self._generator = BaseGenerator.from_pretrained(load_model(model.model, model.torch_threads), device=model.device)
        self._batched.set_max_batch_size(batch.max_batch)
        self._batched.set_batch_wait_timeout_s(batch.wait_s)

    def info(self) -> GeneratorInfo:
        g = self._generator
        return GeneratorInfo(g.model_id, g.base_resolution, g.size_multiple, g.default_scheduler, g.default_guidance)

    @routed("base")
    async def generate(self, embeds: PromptEmbeds, params: dict) -> Part:
        """One base image, into the object store. Requests that arrive together share a denoising batch (see
        _batched).

        When the caller cancels (client gone, deadline), the request leaves its batch; a batch whose
        requests have all left stops at its next step.
        """
        gone = threading.Event()
        try:
            return _part(await self._batched(embeds, params, gone), embeds)
        except asyncio.CancelledError:
            gone.set()
            raise

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, embeds: list[PromptEmbeds], params: list[dict], gone: list[threading.Event]) -> list:
        """Requests arriving within the wait that share size, steps, guidance and scheduler run as one batch."""
        groups = defaultdict(list)
        for i, p in enumerate(params):
            groups[tuple(sorted((k, v) for k, v in p.items() if k != "seed"))].append(i)
        out: list[BaseImage | None] = [None] * len(params)
        for shared, members in groups.items():
            run = _Run([gone[i] for i in members])
            with metrics.timed("base"):
                try:
                    images = await asyncio.to_thread(
                        self._generator.generate_batch, [embeds[i] for i in members],
                        [params[i]["seed"] for i in members], on_step=run.on_step, **dict(shared),
                    )
                except Cancelled:  # every caller of this group left: nothing to return
                    metrics.get().cancellations.inc(tags={"stage": "base", "reason": "cancelled"})
                    continue
                finally:
                    metrics.get().steps.inc(run.steps * len(members), tags={"stage": "base"})
            metrics.get().batch_size.observe(len(members), tags={"stage": "base"})
            for i, image in zip(members, images):
                image.meta.update(replica=replica_id(), batch_size=len(members))
                out[i] = image
        return out

    @routed("base")
    def generate_stream(self, embeds: PromptEmbeds, params: dict, preview_every: int = 1, request_id: str = ""):
        """Yields {"stage", "step", "total"[, "preview_png_b64"]} per step, then the base image's Part.

        A preview is the denoised estimate at latent resolution (1/8 of the image), a watermarked PNG. When the
        caller stops reading (a client went away), the run stops at its next step.
        """
        events: queue.Queue = queue.Queue()
        stop, end = threading.Event(), object()

        steps_run = [0]

        def on_step(event: StepEvent) -> None:
            steps_run[0] = event.step
            if stop.is_set():
                metrics.get().cancellations.inc(tags={"stage": "base", "reason": "cancelled"})
                raise Cancelled()
            item = {"stage": "base", "step": event.step, "total": event.total}
            if preview_every and (event.step % preview_every == 0 or event.step == event.total):
                png = encode_png(latent_preview(event.denoised, self._generator.family), request_id=request_id)
                item["preview_png_b64"] = base64.b64encode(png).decode()
            events.put(item)

        def work() -> None:
            try:
                events.put(_part(self._generate(embeds, params, on_step), embeds))
            except BaseException as err:  # handed to the reader, which re-raises it
                events.put(err)
            finally:
                metrics.get().steps.inc(steps_run[0], tags={"stage": "base"})
                events.put(end)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := events.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _generate(self, embeds: PromptEmbeds, params: dict, on_step) -> BaseImage:
        with metrics.timed("base"):
            base = self._generator(embeds, on_step=on_step, **params)
        base.meta["replica"] = replica_id()
        return base


def _part(base: BaseImage, embeds: PromptEmbeds) -> Part:
    return stored(base.image, steps=base.steps, prompt_truncated=embeds.truncated,
                  encoder_region=embeds.meta.get("region"), **base.meta)


class _Run:
    """Step callback of one denoising batch: counts steps, and stops the batch once all its callers left."""

    def __init__(self, gone: list[threading.Event]):
        self.gone, self.steps = gone, 0

    def on_step(self, event: StepEvent) -> None:
        self.steps = event.step
        if all(g.is_set() for g in self.gone):
            raise Cancelled()
