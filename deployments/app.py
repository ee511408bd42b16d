"""build_app(args): the one place that wires Flashtile's DAG of deployments."""

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.encoder import EncoderDeployment
from deployments.generator import GeneratorDeployment
from deployments.ingress import Ingress
from deployments.refiner import RefinerDeployment
from deployments.upscaler import UpscalerDeployment


class AppArgs(BaseModel):
    """Arguments of the Flashtile application (the `args` of cluster.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Model directory; null = the embedded default.")
    device: str = Field(default="cpu", description="torch device of the generator, upscaler and refiner: cpu or cuda.")
    encoder_device: str | None = Field(default=None, description="torch device of the prompt encoder (null: `device`).")
    torch_threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads per model replica.")
    encoder_max_batch: int = Field(default=16, ge=1, le=256, description="Prompts per text-encoder pass, at most.")
    generator_max_batch: int = Field(default=4, ge=1, le=64, description="Images per denoising batch, at most.")
    generator_batch_wait_s: float = Field(
        default=0.05, ge=0.0, le=5.0, description="How long a generator batch waits to fill (bounded wait)."
    )
    output: str | None = Field(
        default=None, description="Where images are stored: a directory or s3://bucket/prefix (null: $FLASHTILE_OUTPUT, "
        "else the cache's outputs/)."
    )
    url_ttl_s: int = Field(default=900, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned output URLs.")
    upscale_tile: int = Field(default=256, ge=32, le=2048, description="Upscaler tile side, input pixels.")
    upscale_overlap: int = Field(default=16, ge=0, le=256, description="Overlap between upscaler tiles, input pixels.")


def build_app(args: dict) -> Application:
    a = AppArgs.model_validate(args or {})
    model = (a.model, a.device, a.torch_threads)
    encoder = EncoderDeployment.bind(a.model, a.encoder_device or a.device, a.torch_threads, a.encoder_max_batch)
    generator = GeneratorDeployment.bind(*model, a.generator_max_batch, a.generator_batch_wait_s)
    upscaler = UpscalerDeployment.bind(*model, a.upscale_tile, a.upscale_overlap)
    refiner = RefinerDeployment.bind(*model)
    return Ingress.bind(encoder, generator, upscaler, refiner, a.torch_threads, a.output, a.url_ttl_s)
