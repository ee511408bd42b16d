"""Tiny, randomly initialised diffusers-format model directories for tests (no hub, safetensors only).

Each `save_tiny_*` writes a complete directory in the layout Flashtile loads (see stages/models.py) and returns
its path. Weights come from fixed seeds, so a directory is the same on every run; components are sized like the
`get_dummy_components` of diffusers' own pipeline tests, so loading and a few denoising steps take well under a
second on a CPU. Tokenizers are built offline from a written character-level vocab.json and a merges.txt that
holds only its header: every character is one token, which makes token counts easy to reason about in tests.
"""

from stages import _torchvision_compat  # noqa: F401  (first: transformers and diffusers import torchvision)
import json
import string
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKEN_LIMIT = 77
TEXT_HIDDEN = 32  # each CLIP encoder's hidden size
SDXL_PROJECTION = 32  # SDXL's pooled embedding (text_encoder_2's projection)
UNET_SAMPLE_SIZE = 16  # latent side; x VAE factor 2 -> base resolution 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _vocab() -> dict[str, int]:
    """Special tokens, then every printable ASCII character alone and as a word end (`</w>`)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = [BOS, EOS] + list(chars) + [c + "</w>" for c in chars]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer built offline from a written vocab.json + merges.txt (no merges: one token per char)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(_vocab()))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=TOKEN_LIMIT)


def _save_tokenizer(folder: Path) -> None:
    _tokenizer().save_pretrained(folder)


def _text_config(**overrides) -> CLIPTextConfig:
    vocab = _vocab()
    config = dict(
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],  # != 2: CLIP pools at the first EOS token, not at argmax(input_ids)
        pad_token_id=vocab[EOS],
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=TOKEN_LIMIT,
        hidden_act="gelu",
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def _vae(seed: int, blocks: int = 2, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(32, 64) if blocks == 2 else (32, 32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        layers_per_block=1,
        sample_size=UNET_SAMPLE_SIZE * 2 ** (blocks - 1),
    )
    config.update(overrides)
    return AutoencoderKL(**config)


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def _write_index(path: Path, class_name: str, components: dict) -> None:
    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tiny_sd(path) -> Path:
    """An SD 1.x-style directory: one CLIP encoder (hidden 32), a 2-block UNet, a 2-block VAE, Euler."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(path / "tokenizer")

    torch.manual_seed(0)
    CLIPTextModel(_text_config()).save_pretrained(path / "text_encoder", safe_serialization=True)

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    _vae(seed=2).save_pretrained(path / "vae", safe_serialization=True)
    _scheduler().save_pretrained(path / "scheduler")

    _write_index(
        path,
        "StableDiffusionPipeline",
        {
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
    return path


def save_tiny_sdxl(path) -> Path:
    """An SDXL-style directory: two CLIP encoders (32 + 32 -> cross-attention 64, pooled 32), text_time UNet."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(path / "tokenizer")
    _save_tokenizer(path / "tokenizer_2")

    torch.manual_seed(0)
    CLIPTextModel(_text_config()).save_pretrained(path / "text_encoder", safe_serialization=True)
    torch.manual_seed(1)
    CLIPTextModelWithProjection(_text_config(projection_dim=SDXL_PROJECTION)).save_pretrained(
        path / "text_encoder_2", safe_serialization=True
    )

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=6 * 8 + SDXL_PROJECTION,  # 6 time ids x 8 + pooled 32 = 80
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' penultimate states, concatenated
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    _vae(seed=3, scaling_factor=0.13025).save_pretrained(path / "vae", safe_serialization=True)
    _scheduler().save_pretrained(path / "scheduler")

    _write_index(
        path,
        "StableDiffusionXLPipeline",
        {
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "force_zeros_for_empty_prompt": True,
        },
    )
    return path


def save_tiny_x4_upscaler(path) -> Path:
    """A tiny diffusers StableDiffusionUpscalePipeline (x4: 3-block VAE), saved by the pipeline itself."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config())
    max_noise_level = 350
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=7,  # 4 latent channels + the 3-channel low-resolution image
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        use_linear_projection=True,
        num_class_embeds=max_noise_level + 1,  # the noise level is the class label
    )
    vae = _vae(seed=2, blocks=3, scaling_factor=0.08333)
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=max_noise_level,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path
