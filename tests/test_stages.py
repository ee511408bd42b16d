"""Each stage with the embedded default's small components: shapes, determinism, tiling, blending."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from stages import tiling
from stages.encode import PromptEncoder
from stages.generate import BaseGenerator
from stages.refine import REFINE_START_SNR, Refiner, detail_map, strength_for_snr
from stages.sizes import SCHEDULERS, output_size
from stages.refine import blend_tiles, crop, select_tiles
from stages.types import Cancelled, TileBox
from stages.upscale import Upscaler, build_compact_upscaler, merge, plan


@pytest.fixture(scope="module")
def encoder(default_model):
    return PromptEncoder.from_pretrained(default_model, cache_size=4)


@pytest.fixture(scope="module")
def generator(default_model):
    return BaseGenerator.from_pretrained(default_model)


@pytest.fixture(scope="module")
def embeds(encoder):
    return encoder("a small red star in the top left corner", "blurry")


# --- prompt encoder -----------------------------------------------------------------------------------------


def test_encoder_shapes_and_cache(encoder):
    first = encoder("two yellow circles on grey")
    assert first.prompt_embeds.shape == (1, 77, 384) and first.negative_embeds.shape == (1, 77, 384)
    assert first.pooled is None and not first.truncated and first.token_limit == 77
    again = encoder("two yellow circles on grey")
    assert again.cache_hit and not first.cache_hit
    assert torch.equal(again.prompt_embeds, first.prompt_embeds)
    other = encoder("a large green triangle")
    assert not torch.allclose(other.prompt_embeds, first.prompt_embeds)


def test_encoder_cache_is_lru_bounded(encoder):
    for i in range(6):
        encoder(f"prompt number {i}")
    assert len(encoder._cache) <= encoder.cache_size
    assert not encoder("prompt number 0").cache_hit  # evicted


def test_encoder_reports_truncation(encoder):
    assert encoder("word " * 100).truncated
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        encoder("  ")


# --- base generator -----------------------------------------------------------------------------------------


def test_base_resolution_comes_from_the_model(generator):
    # 32x32 latents x the autoencoder's factor 8; three UNet levels: sides in multiples of 8 * 2**2 = 32.
    assert generator.base_resolution == 256 and generator.size_multiple == 32
    assert generator.default_scheduler == "ddim"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_generator_shape_determinism_and_progress(generator, embeds, scheduler):
    events = []
    kwargs = dict(seed=7, width=192, height=352, steps=3, guidance_scale=5.0, scheduler=scheduler)
    a = generator(embeds, on_step=events.append, **kwargs)
    b = generator(embeds, **kwargs)
    c = generator(embeds, **{**kwargs, "seed": 8})
    assert a.image.shape == (1, 3, 352, 192) and torch.isfinite(a.image).all()
    assert a.image.min() >= 0 and a.image.max() <= 1
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image)
    assert [e.step for e in events] == [1, 2, 3] and a.steps == 3
    assert all(e.stage == "base" and e.latents.shape == (1, generator.unet.config.out_channels, 44, 24) for e in events)


def test_fast_and_quality_start_from_the_same_noise(generator, embeds):
    seen = {}

    def first_latents(tag):
        def hook(module, args, kwargs):
            seen.setdefault(tag, args[0].clone())

        return hook

    for tag, steps in (("fast", 4), ("quality", 30)):
        # Fast mode runs the model's distilled fast UNet where it ships one.
        unet = generator.fast_unet if tag == "fast" and generator.fast_unet is not None else generator.unet
        handle = unet.register_forward_pre_hook(first_latents(tag), with_kwargs=True)
        try:
            generator(embeds, seed=11, width=256, height=256, steps=steps, guidance_scale=5.0, scheduler="ddim", mode=tag)
        finally:
            handle.remove()
    # Both runs feed their UNet the same seeded noise at their first step.
    assert torch.equal(seen["fast"], seen["quality"])
    assert torch.equal(generator.initial_noise(11, 256, 256), generator.initial_noise(11, 256, 256))


def test_hybrid_differs_from_either_scheduler_alone(generator, embeds):
    run = lambda s: generator(embeds, seed=3, width=256, height=256, steps=6, guidance_scale=5.0, scheduler=s).image
    hybrid, euler, dpm = run("hybrid"), run("euler"), run("dpmpp_2m_karras")
    assert torch.isfinite(hybrid).all()
    assert not torch.equal(hybrid, euler) and not torch.equal(hybrid, dpm)


def test_callback_cancels_within_one_step(generator, embeds):
    calls = []

    def cancel(event):
        calls.append(event.step)
        raise Cancelled()

    with pytest.raises(Cancelled):
        generator(embeds, seed=1, width=256, height=256, steps=30, guidance_scale=5.0, on_step=cancel)
    assert calls == [1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=250), "multiples of 32"),
        (dict(steps=0), "steps must be between 1 and 150"),
        (dict(steps=10000), "steps must be between 1 and 150"),
        (dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
        (dict(scheduler="lms"), "scheduler must be one of euler, dpmpp_2m_karras, hybrid, ddim"),
        (dict(seed=-1), "seed must be between 0"),
    ],
)
def test_generator_refuses_bad_input_before_model_work(generator, embeds, kwargs, message):
    calls = []
    handle = generator.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            generator(embeds, **{**dict(seed=1, width=256, height=256, steps=2, guidance_scale=5.0), **kwargs})
    finally:
        handle.remove()
    assert calls == []


# --- upscaler -----------------------------------------------------------------------------------------------


def _smooth_image(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    return torch.stack([0.5 + 0.4 * torch.sin(3 * x + 2 * y), 0.3 + 0.5 * x * y, 0.6 - 0.3 * y + 0.0 * x])[None]


def _random_compact():
    backend = build_compact_upscaler(seed=5)
    torch.manual_seed(6)
    torch.nn.init.normal_(backend.model.body[-1].weight, std=0.05)  # a net that really computes, not identity
    return backend


# Tiled vs whole-image upscale of a smooth image (values in [0, 1]), overlap 8 px for a 6 px receptive radius:
# at most 1e-2 anywhere (under 3 of 255 grey levels) and 5e-4 on average. Measured: 6.4e-3 and 2.4e-4.
TILED_MAX, TILED_MEAN = 1e-2, 5e-4


def tiled(upscaler: Upscaler, image: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One model pass over the tile grid, as the driver runs it: every tile on its own, merged in grid order."""
    size = (image.shape[-1], image.shape[-2])
    boxes = [TileBox(i, *b) for i, b in enumerate(tiling.boxes(*size, upscaler.tile_size, upscaler.overlap))]
    return merge(upscaler.upscale_tiles(image, boxes), boxes, size, upscaler.scale, upscaler.overlap), len(boxes)


def test_tiled_upscale_equals_untiled_on_a_smooth_image():
    backend = _random_compact()
    image = _smooth_image(96, 80)
    whole = backend(image)
    tiled_image, tiles = tiled(Upscaler(backend, tile_size=32, overlap=8), image)
    assert tiles == 12 and tiled_image.shape == whole.shape == (1, 3, 384, 320)
    assert (tiled_image - whole).abs().max().item() < TILED_MAX
    assert (tiled_image - whole).abs().mean().item() < TILED_MEAN
    assert (tiled_image - whole).abs().max().item() > 0  # the tiles really were computed apart


def test_untrained_compact_upscaler_is_exact_nearest_neighbour():
    image = torch.rand(1, 3, 40, 56)
    out, _ = tiled(Upscaler(build_compact_upscaler(seed=2), tile_size=16, overlap=4), image)
    assert torch.allclose(out, torch.nn.functional.interpolate(image, scale_factor=4, mode="nearest"), atol=1e-6)


@pytest.mark.parametrize("tier", ["1k", "2k", "4k"])
@pytest.mark.parametrize("aspect", ["1:1", "16:9", "9:16", "4:3"])
def test_upscale_plan_reaches_every_tier_exactly(tier, aspect):
    from stages.sizes import base_size

    src, dst = base_size(aspect, 256, 32), output_size(tier, aspect, 256)
    passes = plan(4, src, dst)
    assert tuple(passes[-1].size) == dst
    assert [p.kind for p in passes].count("model") == math.ceil(math.log(max(dst[0] / src[0], dst[1] / src[1]), 4) - 1e-9)


def test_upscaler_rejects_overlap_too_large():
    with pytest.raises(ValueError, match="overlap 16 must be less than half the tile size 32"):
        Upscaler(build_compact_upscaler(seed=0), tile_size=32, overlap=16)


# --- refiner ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refiner(default_model):
    return Refiner.from_pretrained(default_model, tile_size=64, overlap=16)


def test_refiner_picks_the_most_detailed_tiles(refiner):
    image = _smooth_image(128, 192)
    image[..., 70:120, 130:180] = (torch.rand(1, 3, 50, 50) > 0.5).float()  # texture in one corner
    tiles = select_tiles(image, refiner.tile_size, refiner.overlap, budget=1)
    assert len(tiles) == 1
    t = tiles[0]
    assert t.x <= 130 and t.x + t.w >= 180 - 16 and t.y <= 70 and t.y + t.h >= 120 - 16
    assert detail_map(image).shape == (1, 1, 128, 192)


def test_refine_blend_is_seam_free(refiner):
    image = _smooth_image(128, 192) * 0.5
    tiles = select_tiles(image, refiner.tile_size, refiner.overlap, budget=3)
    # A refined tile as different from its surroundings as can be: a constant shift.
    out = blend_tiles(image, [crop(image, t) + 0.4 for t in tiles], tiles, refiner.overlap)
    # The feather spreads the shift over `overlap` pixels; where two tiles' ramps meet, at most twice as steep.
    # A hard paste would jump by the whole 0.4.
    step = 2 * 0.4 / refiner.overlap
    base_dx = (image[..., :, 1:] - image[..., :, :-1]).abs().max()
    base_dy = (image[..., 1:, :] - image[..., :-1, :]).abs().max()
    assert (out[..., :, 1:] - out[..., :, :-1]).abs().max() <= base_dx + step + 1e-5
    assert (out[..., 1:, :] - out[..., :-1, :]).abs().max() <= base_dy + step + 1e-5
    changed = (out - image).abs().sum(1)[0] > 1e-6
    assert changed.any()
    covered = torch.zeros_like(changed)
    for t in tiles:
        covered[t.y : t.y + t.h, t.x : t.x + t.w] = True
    assert not (changed & ~covered).any()  # nothing outside the refined tiles moved


def test_refiner_runs_img2img_on_selected_tiles(refiner, embeds):
    image = _smooth_image(128, 128)
    box = select_tiles(image, refiner.tile_size, refiner.overlap, budget=1)[0]
    out = refiner.refine_tile(crop(image, box), box, embeds, seed=4, steps=4, guidance_scale=5.0)
    again = refiner.refine_tile(crop(image, box), box, embeds, seed=4, steps=4, guidance_scale=5.0)
    assert out.shape == crop(image, box).shape and torch.equal(out, again)
    assert (out - crop(image, box)).abs().max() > 0.01
    assert refiner.steps_run(30) == int(30 * refiner.strength) and refiner.steps_run(1) == 1


def test_refiner_strength_is_a_noise_level_not_a_share_of_the_schedule():
    from toyworld.train import scheduler_config

    def start_snr(config, strength):
        alphas = DDIMScheduler(**config).alphas_cumprod
        t = round(strength * len(alphas)) - 1
        return (alphas[t] / (1 - alphas[t])).item()

    plain, shifted = scheduler_config(1.0), scheduler_config(2.0)
    linear = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    # The plain cosine schedule keeps the classic 0.3; a noisier schedule gets a smaller share of it.
    assert strength_for_snr(plain, REFINE_START_SNR) == 0.3
    assert 0.1 < strength_for_snr(shifted, REFINE_START_SNR) < 0.2
    for config in (plain, shifted, linear):
        strength = strength_for_snr(config, REFINE_START_SNR)
        assert start_snr(config, strength) <= REFINE_START_SNR < start_snr(config, strength - 0.001)
    with pytest.raises(ValueError, match="snr"):
        strength_for_snr(plain, 0.0)


def test_tiling_covers_the_image():
    for width, height in ((100, 37), (256, 256), (4096, 2304)):
        boxes = tiling.boxes(width, height, 256, 32)
        cover = torch.zeros(height, width, dtype=torch.bool)
        for x, y, w, h in boxes:
            cover[y : y + h, x : x + w] = True
        assert cover.all()


# --- batching (what the cluster's dynamic batching runs) -----------------------------------------------------


def test_encode_batch_runs_one_forward_and_matches_single_encodes(default_model):
    encoder = PromptEncoder.from_pretrained(default_model, cache_size=16)
    forwards = []
    handle = encoder.text_encoders[0].register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    try:
        batch = encoder.encode_batch([("a red ring", "blurry"), ("a blue star", "blurry"), ("a red ring", "")])
    finally:
        handle.remove()
    assert forwards == [4]  # "a red ring", "blurry", "a blue star", "" in one pass
    assert [b.cache_hit for b in batch] == [False, False, False]
    single = PromptEncoder.from_pretrained(default_model)("a blue star", "blurry")
    assert torch.allclose(batch[1].prompt_embeds, single.prompt_embeds, atol=1e-5)
    assert torch.allclose(batch[1].negative_embeds, single.negative_embeds, atol=1e-5)
    assert encoder.encode_batch([("a blue star", "")])[0].cache_hit


def test_generate_batch_matches_single_runs(generator, encoder):
    a, b = encoder("a red ring"), encoder("a blue star")
    shared = dict(width=256, height=256, steps=3, guidance_scale=5.0, scheduler="hybrid")
    batch = generator.generate_batch([a, b], [1, 2], **shared)
    singles = [generator(a, seed=1, **shared), generator(b, seed=2, **shared)]
    for got, want in zip(batch, singles):
        assert got.image.shape == (1, 3, 256, 256) and got.seed == want.seed
        assert torch.allclose(got.image, want.image, atol=1e-4)
    assert not torch.allclose(batch[0].image, batch[1].image)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generator.generate_batch([a, b], [1], **shared)


def test_quality_modes_ddim_noise_comes_from_each_requests_seed(generator, encoder):
    # A model whose flashtile.json gives quality mode eta 1: fresh noise each DDIM step, drawn from the seed.
    stochastic = BaseGenerator(generator.unet, generator.vae, generator.scheduler_config, "m", ddim_eta={"quality": 1.0})
    plain = BaseGenerator(generator.unet, generator.vae, generator.scheduler_config, "m")
    a, b = encoder("a red ring"), encoder("a blue star")
    shared = dict(width=256, height=256, steps=6, guidance_scale=3.0, scheduler="ddim")

    once, again = (stochastic(a, seed=1, mode="quality", **shared).image for _ in range(2))
    assert torch.equal(once, again)  # the same seed, the same noise at every step
    assert not torch.allclose(once, plain(a, seed=1, mode="quality", **shared).image, atol=1e-3)  # eta is applied
    # Each request's noise is its own: a batch gives what each request gives alone.
    batch = stochastic.generate_batch([a, b], [1, 2], mode="quality", **shared)
    assert torch.allclose(batch[0].image, once, atol=1e-4)
    assert torch.allclose(batch[1].image, stochastic(b, seed=2, mode="quality", **shared).image, atol=1e-4)
    # Modes without an eta, and other samplers, stay deterministic samplers.
    assert torch.equal(stochastic(a, seed=1, mode="fast", **shared).image, plain(a, seed=1, mode="fast", **shared).image)
    euler = {**shared, "scheduler": "euler"}
    assert torch.equal(stochastic(a, seed=1, mode="quality", **euler).image, plain(a, seed=1, mode="quality", **euler).image)
