"""Figure 9, GPU (only where CUDA is present; skipped otherwise): per-stage latency of the four stages on
randomly initialised SD 1.5-size and SDXL-size components, at 1K, 2K and 4K, in fp16 and bf16, with and without
torch.compile of the UNet.

Random weights draw nothing worth seeing, but they cost what the real ones cost: the architectures, sizes and
steps are the real checkpoints' (SD 1.5 at 512 px, SDXL at 1024 px, 30 base steps at guidance 5). The upscaler is
the embedded default's (the one Flashtile ships), in float32. The tokenizer is the tests' offline CLIP tokenizer
(tests/tiny_models.py). Published figures for the same architectures, beside them: the diffusers tutorial
"Accelerate inference of text-to-image diffusion models" (A100 80 GB, 30 steps, batch 1): SDXL 7.35 s in fp32,
2.52 s in bf16 with SDPA, fused QKV and torch.compile; SD 1.5 1.53 s and 0.49 s
(https://huggingface.co/docs/diffusers/tutorials/fast_diffusion).
"""

import time

from bench.common import PROMPT, Figure, med

PUBLISHED = {"sd15": "A100: 1.53 s fp32, 0.49 s bf16+compile (30 steps, 512 px)",
             "sdxl": "A100: 7.35 s fp32, 2.52 s bf16+compile (30 steps, 1024 px)"}


def _text(hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, max_position_embeddings=77, vocab_size=49408,
                            projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def components(arch: str) -> dict:
    """Randomly initialised components with the real checkpoint's architecture."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024 if arch == "sdxl" else 512, scaling_factor=0.13025 if arch == "sdxl" else 0.18215)
    if arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        texts = [_text(768, 12, 12)]
    else:
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        texts = [_text(768, 12, 12), _text(1280, 32, 20, projection=1280)]
    return {"unet": unet, "vae": vae, "texts": texts, "scheduler": {**EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1).config,
                          "_class_name": "EulerDiscreteScheduler"}}  # the real checkpoints' sampler settings


def pipeline(arch: str, dtype, compile_unet: bool, device: str = "cuda"):
    import torch

    from stages.encode import PromptEncoder
    from stages.generate import BaseGenerator
    from stages.models import resolve_model
    from stages.pipeline import Flashtile, upscaler_location
    from stages.refine import Refiner
    from stages.upscale import Upscaler
    from tests.tiny_models import _tokenizer

    c = components(arch)
    family = "sdxl" if arch == "sdxl" else "sd"
    unet, vae = c["unet"].to(device, dtype), c["vae"].to(device, dtype)
    texts = [t.to(device, dtype) for t in c["texts"]]
    if compile_unet:
        unet = torch.compile(unet)
    return Flashtile(
        PromptEncoder([_tokenizer() for _ in texts], texts, arch, family),
        BaseGenerator(unet, vae, c["scheduler"], arch, family),
        Upscaler.from_pretrained(upscaler_location(resolve_model(None)), device=device),
        Refiner(unet, vae, c["scheduler"], arch, family),
    )


def run(quick: bool, names=()) -> list[Figure]:
    import torch

    fig = Figure("gpu", "Figure 9: per-stage latency on a GPU, SD 1.5-size and SDXL-size components",
                 "random weights of the real architectures, 30 base steps at guidance 5, 1:1, seed 7, one request at "
                 "a time, the embedded default's upscaler (float32)", quick)
    if not torch.cuda.is_available():
        fig.notes.append("skipped: no CUDA device on this machine")
        return [fig]
    runs = 2 if quick else 3
    variants = [(torch.bfloat16, False), (torch.bfloat16, True)] if quick else \
        [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)]
    for arch in ("sd15", "sdxl"):
        for dtype, compiled in variants:
            flashtile = pipeline(arch, dtype, compiled)
            for tier in ("1k", "4k") if quick else ("1k", "2k", "4k"):
                params = flashtile.params(PROMPT, size=tier, mode="quality", steps=30, guidance_scale=5.0, seed=7)
                samples = []
                for i in range(runs + 1):  # the first is a warm-up (and compiles)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    result = flashtile.render(params)
                    torch.cuda.synchronize()
                    if i:
                        samples.append({"wall_s": time.perf_counter() - t0, **result.timings})
                key = f"{arch}/{str(dtype)[6:]}/{'compiled' if compiled else 'eager'}/{tier}"
                fig.samples[key] = samples
                for stage in ("encode+base", "upscale", "refine", "watermark+encode", "wall_s"):
                    fig.table.append({"architecture": arch, "dtype": str(dtype)[6:], "compile": compiled, "tier": tier,
                                      "stage": "total" if stage == "wall_s" else stage, "runs": runs,
                                      "s (median)": med(samples, stage),
                                      "published (base, 30 steps)": PUBLISHED[arch] if stage == "encode+base" else ""})
            del flashtile
            torch.cuda.empty_cache()
    return [fig]
