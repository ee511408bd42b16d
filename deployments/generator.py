"""Base generator deployment: a thin wrapper around stages.generate.BaseGenerator."""

from ray import serve

from deployments._replica import load_model, replica_id
from stages.generate import BaseGenerator
from stages.types import BaseImage, PromptEmbeds


@serve.deployment(name="base_generator")
class GeneratorDeployment:
    def __init__(self, model: str | None = None, device: str = "cpu", torch_threads: int = 1):
        self._generator = BaseGenerator.from_pretrained(load_model(model, torch_threads), device=device)

    def info(self) -> dict:
        g = self._generator
        return {
            "model_id": g.model_id,
            "base_resolution": g.base_resolution,
            "size_multiple": g.size_multiple,
            "default_scheduler": g.default_scheduler,
        }

    def generate(self, embeds: PromptEmbeds, params: dict) -> BaseImage:
        base = self._generator(embeds, **params)
        base.meta["replica"] = replica_id()
        return base
