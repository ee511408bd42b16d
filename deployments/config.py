"""Typed per-stage configs: build_app (deployments/app.py) makes them from the application's args, once validated,
and binds each deployment with its own by keyword."""

from pydantic import BaseModel, ConfigDict


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Config):
    """Which weights a model replica loads, onto what, with how many torch threads."""

    model: str | None = None  # a model directory, an s3:// prefix, or None: the embedded default
    device: str = "cpu"
    torch_threads: int = 1


class BatchConfig(_Config):
    """Dynamic batching: requests arriving within `wait_s` share one pass, at most `max_batch` of them."""

    max_batch: int
    wait_s: float


class TileConfig(_Config):
    """A tile stage's grid (None: the stage's own default) and how many tiles one call carries."""

    tile_size: int | None = None
    overlap: int | None = None
    tiles_per_call: int = 1
