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
