"""Model directories: the embedded default is built deterministically; bad directories are refused early."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from stages.models import ModelDir, build_default_model, resolve_model, weights_digest
from stages.upscale import load_upscaler_backend


def _link_copy(src: Path, dst: Path) -> Path:
    """A cheap copy (hard links): tests only add or remove files in it, never rewrite one."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def test_default_model_is_an_ordinary_safetensors_model_dir(default_model_dir):
    model = ModelDir(default_model_dir)
    assert model.family == "sd"
    assert {p.name for p in default_model_dir.iterdir()} >= {"tokenizer", "text_encoder", "unet", "vae", "scheduler", "upscaler"}
    digests = weights_digest(default_model_dir)
    assert set(digests) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "upscaler/model.safetensors",
        "fast/unet/diffusion_pytorch_model.safetensors",
    }
    assert not [p for p in default_model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]


def test_default_model_build_is_deterministic(default_model_dir, tmp_path):
    again = build_default_model(tmp_path / "again")
    assert weights_digest(again) == weights_digest(default_model_dir)
    assert (again / "model_index.json").read_text() == (default_model_dir / "model_index.json").read_text()


def test_resolve_none_is_the_default(default_model_dir):
    assert resolve_model(None).path == default_model_dir


def test_missing_component_is_named(default_model_dir, tmp_path):
    broken = _link_copy(default_model_dir, tmp_path / "m")
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match=r"missing component\(s\) unet .*needs: tokenizer, text_encoder, unet, vae, scheduler"):
        ModelDir(broken)


def test_pickle_weights_are_refused(default_model_dir, tmp_path):
    broken = _link_copy(default_model_dir, tmp_path / "m")
    torch.save({"w": torch.zeros(1)}, broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin is a pickle .*safetensors only"):
        ModelDir(broken)


def test_pickle_disguised_as_safetensors_is_refused(default_model_dir, tmp_path):
    broken = _link_copy(default_model_dir, tmp_path / "m")
    target = broken / "vae" / "diffusion_pytorch_model.safetensors"
    target.unlink()
    torch.save({"w": torch.zeros(1)}, target)  # a zip/pickle under a safetensors name
    with pytest.raises(ValueError, match="not in safetensors format"):
        ModelDir(broken)


def test_pickle_upscaler_is_refused(tmp_path):
    folder = tmp_path / "upscaler"
    folder.mkdir()
    torch.save({"body.0.weight": torch.zeros(1)}, folder / "RealESRGAN_x4.pth")
    with pytest.raises(ValueError, match="pickle .*safetensors only"):
        load_upscaler_backend(folder)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        ModelDir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")


def test_model_settings_set_each_modes_default_guidance(default_model_dir, tmp_path, shipped_guidance):
    from stages.models import SETTINGS_FILE
    from stages.pipeline import DEFAULT_GUIDANCE, resolve_params

    # The embedded default carries the guidance tuned for it, and a request without guidance gets it per mode.
    shipped = shipped_guidance
    model = ModelDir(default_model_dir)
    assert model.default_guidance == shipped and set(shipped) == {"fast", "quality"}
    for mode in ("fast", "quality"):
        assert resolve_params("a", mode=mode, default_guidance=model.default_guidance).guidance_scale == shipped[mode]
        assert resolve_params("a", mode=mode, default_guidance=model.default_guidance, guidance_scale=7.5).guidance_scale == 7.5

    # A model that names one mode: the other keeps the pipeline's default; no file at all: both do.
    one = _link_copy(default_model_dir, tmp_path / "one")
    (one / SETTINGS_FILE).unlink()
    (one / SETTINGS_FILE).write_text('{"guidance_scale": {"fast": 1.5}}')
    guidance = ModelDir(one).default_guidance
    assert resolve_params("a", mode="fast", default_guidance=guidance).guidance_scale == 1.5
    assert resolve_params("a", mode="quality", default_guidance=guidance).guidance_scale == DEFAULT_GUIDANCE
    (one / SETTINGS_FILE).unlink()
    assert ModelDir(one).default_guidance == {}


@pytest.mark.parametrize("text, message", [
    ('{"guidance_scale": {"slow": 2}}', r"guidance_scale maps modes \(fast, quality\)"),
    ('{"guidance_scale": {"fast": 31}}', r"guidance_scale\['fast'\] must be a number from 0 to 30"),
    ('{"guidance_scale": {"quality": NaN}}', r"guidance_scale\['quality'\] must be a number"),
    ('{"guidance_scale": {"fast": "2"}}', r"guidance_scale\['fast'\] must be a number"),
    ('{"steps": 4}', "may set only guidance_scale and ddim_eta"),
    ('{"ddim_eta": {"quality": 1.5}}', r"ddim_eta\['quality'\] must be a number from 0 to 1; got 1.5"),
    ('{"ddim_eta": {"slow": 1}}', r"ddim_eta maps modes \(fast, quality\)"),
])
def test_bad_model_settings_are_refused_with_the_field_named(default_model_dir, tmp_path, text, message):
    from stages.models import SETTINGS_FILE

    broken = _link_copy(default_model_dir, tmp_path / "m")
    (broken / SETTINGS_FILE).unlink()
    (broken / SETTINGS_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelDir(broken)
