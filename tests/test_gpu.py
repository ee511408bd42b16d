"""GPU checks (opt-in: the `gpu` marker; skipped without CUDA). The same stages on CUDA as on the CPU."""

import pytest
import torch

from stages.encode import PromptEncoder
from stages.generate import BaseGenerator
from stages.models import ModelDir
from stages.pipeline import Flashtile
from stages.refine import Refiner
from stages.upscale import Upscaler, build_compact_upscaler

pytestmark = pytest.mark.gpu


def _flashtile(path, device: str) -> Flashtile:
    model = ModelDir(path)
    upscaler = build_compact_upscaler(seed=0)
    upscaler.model.to(device)
    return Flashtile(
        PromptEncoder.from_pretrained(model, device=device),
        BaseGenerator.from_pretrained(model, device=device),
        Upscaler(upscaler, tile_size=64, overlap=8),
        Refiner.from_pretrained(model, device=device),
    )


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def model_dir(request, tmp_path_factory):
    from tiny_models import save_tiny_sd, save_tiny_sdxl

    save = save_tiny_sd if request.param == "sd" else save_tiny_sdxl
    return save(tmp_path_factory.mktemp(request.param))


def test_cuda_pipeline_matches_cpu_and_is_deterministic(model_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu, cpu = _flashtile(model_dir, "cuda"), _flashtile(model_dir, "cpu")
    params = gpu.params("a red ring on grey", size="1k", aspect_ratio="16:9", seed=3, steps=3)
    a, b, ref = gpu(params), gpu(params), cpu(params)
    assert a.image.shape == ref.image.shape == (1, 3, 576, 1024)
    assert torch.equal(a.image, b.image)  # same seed on the same GPU: the same pixels
    assert (a.image - ref.image).abs().mean() < 1e-3  # seeded CPU noise: the GPU draws the CPU's composition
    assert a.steps == ref.steps


def test_cuda_batch_of_four(model_dir):
    gen = BaseGenerator.from_pretrained(ModelDir(model_dir), device="cuda")
    enc = PromptEncoder.from_pretrained(ModelDir(model_dir), device="cuda")
    embeds = enc.encode_batch([(f"prompt {i}", "") for i in range(4)])
    images = gen.generate_batch(embeds, [1, 2, 3, 4], width=32, height=32, steps=4, guidance_scale=5.0, scheduler="hybrid")
    assert len(images) == 4 and all(torch.isfinite(i.image).all() for i in images)
    assert len({i.image.sum().item() for i in images}) == 4
