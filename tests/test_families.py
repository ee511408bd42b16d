"""SD 1.x and SDXL model directories, and a diffusers x4 upscaler, load and run through every stage.

The directories are tiny random models written by tests/tiny_models.py (offline, safetensors only), so these
tests check wiring, shapes and determinism, not image quality.
"""

import os

import pytest
import torch

from tiny_models import save_tiny_sd, save_tiny_sdxl, save_tiny_x4_upscaler

from stages.encode import PromptEncoder
from stages.generate import BaseGenerator
from stages.models import ModelDir
from stages.pipeline import Flashtile
from stages.refine import Refiner
from stages.sizes import SCHEDULERS
from stages import tiling
from stages.types import TileBox
from stages.upscale import DiffusersX4Upscaler, Upscaler, build_compact_upscaler, load_upscaler_backend, merge

SAVERS = {"sd": save_tiny_sd, "sdxl": save_tiny_sdxl}
TEXT_DIM = {"sd": 32, "sdxl": 64}  # SDXL: both encoders' penultimate states (32 + 32), concatenated
LONG_PROMPT = " ".join(["lighthouse"] * 12)  # one token per character: far past 77 tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are too small to gain from intra-op threads, and on a shared 2-core machine OpenMP's
    # barriers make every op ~30x slower whenever another process holds a core.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family, tmp_path_factory) -> ModelDir:
    return ModelDir(SAVERS[family](tmp_path_factory.mktemp(f"tiny-{family}")))


@pytest.fixture(scope="module")
def encoder(model) -> PromptEncoder:
    return PromptEncoder.from_pretrained(model)


@pytest.fixture(scope="module")
def generator(model) -> BaseGenerator:
    return BaseGenerator.from_pretrained(model)


@pytest.fixture(scope="module")
def refiner(model) -> Refiner:
    return Refiner.from_pretrained(model)


@pytest.fixture(scope="module")
def x4_dir(tmp_path_factory):
    return save_tiny_x4_upscaler(tmp_path_factory.mktemp("tiny-x4-upscaler"))


@pytest.fixture(scope="module")
def x4_backend(x4_dir) -> DiffusersX4Upscaler:
    backend = load_upscaler_backend(x4_dir)
    backend.steps = 2
    return backend


# --- loading ---------------------------------------------------------------------------------------------------


def test_model_dir_detects_the_family_and_loads_every_stage(family, model, encoder, generator, refiner):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by `import stages`: every load is from local files
    assert model.family == family
    assert model.model_id == model.path.name
    assert not list(model.path.rglob("*.bin"))  # safetensors only
    assert encoder.family == generator.family == refiner.family == family
    assert len(encoder.text_encoders) == (2 if family == "sdxl" else 1)
    assert encoder.token_limit == 77
    assert generator.default_scheduler == "euler"  # the directory's own EulerDiscreteScheduler
    assert generator.base_resolution == 32  # UNet sample size 16 x VAE factor 2
    assert refiner.tile_size == generator.base_resolution  # refines at the UNet's native resolution
    # Weights really came from the directory: a second load gives bit-identical parameters.
    again = model.load("unet")
    assert all(torch.equal(a, b) for a, b in zip(generator.unet.state_dict().values(), again.state_dict().values()))


# --- prompt encoder --------------------------------------------------------------------------------------------


def test_prompt_encoder_shapes(family, encoder):
    out = encoder("a red fox in the snow")
    dim = TEXT_DIM[family]
    assert out.prompt_embeds.shape == (1, 77, dim)
    assert out.negative_embeds.shape == (1, 77, dim)
    assert out.truncated is False
    assert out.token_limit == 77
    assert torch.isfinite(out.prompt_embeds).all()
    if family == "sd":
        assert out.pooled is None and out.negative_pooled is None
        assert out.negative_embeds.abs().sum() > 0  # SD encodes the empty negative prompt
    else:
        assert out.pooled.shape == (1, 32)
        assert out.negative_pooled.shape == (1, 32)
        assert out.pooled.abs().sum() > 0
        # force_zeros_for_empty_prompt: an empty negative is all zeros.
        assert torch.count_nonzero(out.negative_embeds) == 0
        assert torch.count_nonzero(out.negative_pooled) == 0
        with_negative = encoder("a red fox in the snow", "blurry")
        assert with_negative.negative_pooled.abs().sum() > 0
    other = encoder("a blue whale")
    assert not torch.equal(other.prompt_embeds, out.prompt_embeds)


def test_prompt_longer_than_the_token_limit_is_flagged_truncated(family, encoder):
    out = encoder(LONG_PROMPT)
    assert out.truncated is True
    assert out.prompt_embeds.shape == (1, 77, TEXT_DIM[family])


# --- base generator --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_base_generator_every_scheduler_is_seeded(family, encoder, generator, scheduler):
    embeds = encoder("a red fox in the snow")
    side = generator.base_resolution

    def run(seed):
        return generator(embeds, seed=seed, width=side, height=side, steps=2, guidance_scale=5.0, scheduler=scheduler)

    first, again, other = run(7), run(7), run(8)
    assert first.image.shape == (1, 3, side, side)
    assert first.steps == 2
    assert torch.isfinite(first.image).all()
    assert 0.0 <= first.image.min() and first.image.max() <= 1.0
    assert torch.equal(first.image, again.image)
    assert not torch.equal(first.image, other.image)


# --- the whole pipeline ----------------------------------------------------------------------------------------


def test_flashtile_1k_16_9_is_exactly_1024x576(family, encoder, generator, refiner):
    flashtile = Flashtile(encoder, generator, Upscaler(build_compact_upscaler(seed=0)), refiner)
    params = flashtile.params("a lighthouse at dusk", size="1k", aspect_ratio="16:9", steps=2, seed=3)
    events = []
    result = flashtile(params, on_progress=events.append)
    assert (result.width, result.height) == (1024, 576)
    assert result.image.shape == (1, 3, 576, 1024)
    assert torch.isfinite(result.image).all()
    assert 0.0 <= result.image.min() and result.image.max() <= 1.0
    assert result.model_id == generator.model_id
    assert result.steps["base"] == 2
    assert result.steps["upscale_tiles"] > 0
    assert result.steps["refine_tiles"] == 2  # the 1k budget
    assert {e.stage for e in events} == {"base", "upscale", "refine"}


# --- diffusers x4 upscaler -------------------------------------------------------------------------------------


def test_x4_upscaler_directory_loads_as_a_diffusers_backend(x4_dir, x4_backend):
    assert (x4_dir / "model_index.json").is_file()
    assert isinstance(x4_backend, DiffusersX4Upscaler)
    assert x4_backend.scale == 4
    assert x4_backend.pipeline.unet.config.in_channels == 7
    assert not list(x4_dir.rglob("*.bin"))


def test_x4_upscaler_upscales_16_to_64(x4_backend):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = x4_backend(image)
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(out, x4_backend(image))  # a fixed generator per call: same tile, same pixels


def test_tiled_x4_upscaler_reaches_the_exact_size(x4_backend):
    upscaler = Upscaler(x4_backend, tile_size=16, overlap=4)
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    boxes = [TileBox(i, *b) for i, b in enumerate(tiling.boxes(24, 24, 16, 4))]
    out, tiles = merge(upscaler.upscale_tiles(image, boxes), boxes, (24, 24), 4, 4), len(boxes)
    assert out.shape == (1, 3, 96, 96)
    assert tiles == 4  # a 2 x 2 grid of 16-pixel tiles over 24 pixels
    assert torch.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0
