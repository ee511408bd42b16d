"""build_app(args): the one place that wires Flashtile's DAG of deployments."""

import copy
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from deployments.compositor import CompositorDeployment
from deployments.config import BatchConfig, ModelConfig, TileConfig
from deployments.encoder import EncoderDeployment
from deployments.generator import GeneratorDeployment
from deployments.ingress import Ingress
from deployments.refiner import RefinerDeployment
from deployments.regions import check_floors, check_regions, place
from deployments.security import Limits, compile_entry
from deployments.upscaler import UpscalerDeployment


class AppArgs(BaseModel):
    """Arguments of the Flashtile application (the `args` of cluster.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Model directory; null = the embedded default.")
    device: str = Field(default="cpu", description="torch device of the generator, upscaler and refiner: cpu or cuda.")
    encoder_device: str | None = Field(default=None, description="torch device of the prompt encoder (null: `device`).")
    torch_threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads per model replica.")
    compositor_threads: int = Field(
        default=2, ge=1, le=256, description="torch CPU threads per compositor replica: its merge, blend and encode "
        "are on every request's critical path and run between the models' work.",
    )
    encoder_max_batch: int = Field(default=16, ge=1, le=256, description="Prompts per text-encoder pass, at most.")
    encoder_batch_wait_s: float = Field(
        default=0.005, ge=0.0, le=5.0, description="How long a text-encoder batch waits to fill (bounded wait)."
    )
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
    upscale_tiles_per_call: int = Field(default=4, ge=1, le=256, description="Upscaler tiles per call to a replica.")
    refine_tiles_per_call: int = Field(default=1, ge=1, le=64, description="Refiner tiles per call to a replica.")
    # Security and limits (docs/operations.md).
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted API keys, best as `sha256:<hex>` digests; FLASHTILE_API_KEYS adds "
        "more. None at all: loopback clients only.",
    )
    limits: Limits = Field(default_factory=Limits, description="Per-request caps, checked before any model work.")
    prompt_blocklist: list[str] = Field(
        default_factory=list, description="Words or phrases (whole-word, case-insensitive) and `re:` regular "
        "expressions; a matching prompt gets 400 content_policy_violation.",
    )
    max_in_flight: int = Field(
        default=24, ge=1, le=4096, description="Images in progress per ingress replica; beyond it, 503 with Retry-After.",
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, le=3600, description="Longest a request may run (a request's timeout_s may shorten it): 408.",
    )
    retry_after_s: int = Field(default=5, ge=1, le=600, description="Retry-After sent with a 503.")
    # Regions (docs/operations.md#regions).
    regions: list[str] | None = Field(
        default=None, description="Regions the replicas run in, by the nodes' ray.io/availability-region label; "
        "requests are served in their own region and spill to the others at peak. null: regions off.",
    )
    region_floors: dict[str, int] = Field(
        default_factory=dict, description="Replicas per region each deployment keeps at least (default 1): "
        "min_replicas = floor x regions, within its max_replicas.",
    )

    @field_validator("prompt_blocklist")
    @classmethod
    def _patterns_compile(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            try:
                compile_entry(entry)
            except re.error as err:
                raise ValueError(f"prompt_blocklist entry {entry!r} is not a valid regular expression: {err}") from None
        return entries

    @field_validator("regions")
    @classmethod
    def _regions_named_once(cls, regions: list[str] | None) -> list[str] | None:
        return check_regions(regions)

    @field_validator("region_floors")
    @classmethod
    def _floors_of_deployments(cls, floors: dict[str, int]) -> dict[str, int]:
        return check_floors(floors)


# A deployment's batch can hold no more requests than the replica accepts at once: the batched deployments and
# the arg that sets each one's batch size.
BATCHED = [(GeneratorDeployment, "generator_max_batch"), (EncoderDeployment, "encoder_max_batch")]


def check_config(config: dict) -> None:
    """Check a Serve config's Flashtile applications beyond what Serve checks, before anything starts: their args,
    and that each batched deployment's max_ongoing_requests is at least its batch size (else batches never fill).
    Raises ValueError naming both fields."""
    for app in config.get("applications") or []:
        if app.get("import_path") != "deployments.app:build_app":
            continue
        args = AppArgs.model_validate(app.get("args") or {})
        place(copy.deepcopy({"applications": [app]}))  # each deployment's floor x regions within its max_replicas
        options = {d.get("name"): d for d in app.get("deployments") or []}
        for deployment, arg in BATCHED:
            ongoing = options.get(deployment.name, {}).get("max_ongoing_requests", deployment.max_ongoing_requests)
            if ongoing < getattr(args, arg):
                raise ValueError(
                    f"application {app.get('name')!r}: {deployment.name} max_ongoing_requests ({ongoing}) must be at least "
                    f"{arg} ({getattr(args, arg)}): a replica never holds more requests than that, so larger batches "
                    "never fill")


def build_app(args: dict) -> Application:
    a = AppArgs.model_validate(args or {})
    model = ModelConfig(model=a.model, device=a.device, torch_threads=a.torch_threads)
    guard = a.model_dump(include={"api_keys", "limits", "prompt_blocklist", "max_in_flight", "request_timeout_s", "retry_after_s"})
    return Ingress.bind(
        encoder=EncoderDeployment.bind(model=model.model_copy(update={"device": a.encoder_device or a.device}),
                                       batch=BatchConfig(max_batch=a.encoder_max_batch, wait_s=a.encoder_batch_wait_s)),
        generator=GeneratorDeployment.bind(model=model, batch=BatchConfig(max_batch=a.generator_max_batch,
                                                                          wait_s=a.generator_batch_wait_s)),
        upscaler=UpscalerDeployment.bind(model=model, tiles=TileConfig(tile_size=a.upscale_tile, overlap=a.upscale_overlap,
                                                                       tiles_per_call=a.upscale_tiles_per_call)),
        refiner=RefinerDeployment.bind(model=model, tiles=TileConfig(tiles_per_call=a.refine_tiles_per_call)),
        compositor=CompositorDeployment.bind(torch_threads=a.compositor_threads),
        output=a.output, url_ttl_s=a.url_ttl_s, guard=guard, regions=a.regions,
        region_floors=a.region_floors,
    )
