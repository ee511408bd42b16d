"""The monolith figure 3 compares with: all four stages, watermark and PNG in one Ray Serve deployment per request
(the layout of Ray Serve's Stable Diffusion example), answering the native API's `POST /v1/generate` with the PNG
(and `GET /v1/models`, which tells it is up).

    import_path: bench.monolith:build_app
"""

import asyncio

from fastapi import FastAPI
from fastapi.responses import Response
from ray import serve

from deployments.schemas import GenerateRequest

api = FastAPI()


@serve.deployment(name="monolith")
@serve.ingress(api)
class Monolith:
    def __init__(self, torch_threads: int = 1):
        import torch

        from stages.pipeline import Flashtile

        torch.set_num_threads(torch_threads)
        self._flashtile = Flashtile.from_pretrained(None)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self._flashtile.model_id, "object": "model"}]}

    @api.post("/v1/generate")
    async def generate(self, body: GenerateRequest) -> Response:
        png = await asyncio.to_thread(self._render, body)
        return Response(png, media_type="image/png")

    def _render(self, body: GenerateRequest) -> bytes:
        return self._flashtile.render(self._flashtile.params(**body.stage_fields())).output


def build_app(args: dict):
    return Monolith.bind(int((args or {}).get("torch_threads", 1)))
