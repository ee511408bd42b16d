"""Prompt encoder deployment: a thin wrapper around stages.encode.PromptEncoder, with dynamic batching."""

import asyncio

from ray import serve

from deployments import metrics
from deployments._replica import load_model, region, routed
from deployments.config import BatchConfig, ModelConfig
from deployments.regions import InRegion
from stages.encode import PromptEncoder
from stages.types import PromptEmbeds


@serve.deployment(name="prompt_encoder")
class EncoderDeployment(InRegion):
    def __init__(self, model: ModelConfig, batch: BatchConfig):
        self._encoder = PromptEncoder.from_pretrained(load_model(model.model, model.torch_threads), device=model.device)
        self._batched.set_max_batch_size(batch.max_batch)
        self._batched.set_batch_wait_timeout_s(batch.wait_s)

    @routed("encode")
    async def encode(self, prompt: str, negative: str) -> PromptEmbeds:
        embeds = await self._batched(prompt, negative)
        embeds.meta["region"] = region()  # where it was encoded: the generator reports it with the base image
        return embeds

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, prompts: list[str], negatives: list[str]) -> list[PromptEmbeds]:
        # Requests arriving within the wait share one text-encoder pass (cached texts skip it).
        with metrics.timed("encode"):
            out = await asyncio.to_thread(self._encoder.encode_batch, list(zip(prompts, negatives)))
        m = metrics.get()
        m.batch_size.observe(len(prompts), tags={"stage": "encode"})
        for embeds in out:
            m.cache.inc(tags={"cache": "prompt", "result": "hit" if embeds.cache_hit else "miss"})
        return out
