"""Prompt encoder deployment: a thin wrapper around stages.encode.PromptEncoder."""

from ray import serve

from deployments._replica import load_model
from stages.encode import PromptEncoder
from stages.types import PromptEmbeds


@serve.deployment(name="prompt_encoder")
class EncoderDeployment:
    def __init__(self, model: str | None = None, device: str = "cpu", torch_threads: int = 1):
        self._encoder = PromptEncoder.from_pretrained(load_model(model, torch_threads), device=device)

    def encode(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        return self._encoder(prompt, negative_prompt)
