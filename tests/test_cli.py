"""`flashtile generate`: exact sizes for every tier and aspect, provenance in the PNG, byte-identical reruns."""

import subprocess
import sys

import pytest
from PIL import Image

from deployments import cli
from stages.sizes import ASPECTS, TIERS, base_size, output_size


def _run(tmp_path, *args, name="out.png"):
    out = tmp_path / name
    code = cli.main(["generate", "a lighthouse at dusk", "-q", "-o", str(out), *args])
    return code, out


@pytest.mark.parametrize("tier", TIERS)
def test_cli_writes_the_exact_size_of_every_aspect(tmp_path, default_model_dir, tier):
    for aspect in ASPECTS:
        code, out = _run(tmp_path, "--size", tier, "--aspect", aspect, "--seed", "3", "--mode", "fast", "--steps", "1", name=f"{aspect.replace(':', 'x')}.png")
        assert code == 0
        expected = base_size(aspect, 256, 32) if tier == "preview" else output_size(tier, aspect, 256)
        with Image.open(out) as image:
            assert image.size == expected, (tier, aspect)
            assert image.mode == "RGB"


def test_png_carries_provenance_and_reruns_are_byte_identical(tmp_path, default_model_dir):
    args = ("--size", "2k", "--aspect", "9:16", "--seed", "7", "--mode", "quality", "--steps", "3")
    code_a, a = _run(tmp_path, *args, name="a.png")
    code_b, b = _run(tmp_path, *args, name="b.png")
    assert code_a == code_b == 0
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as image:
        assert image.size == (1152, 2048)
        text = image.text
    assert text["prompt"] == "a lighthouse at dusk" and text["seed"] == "7" and text["mode"] == "quality"
    assert text["model"] == "flashtile-default-v1"
    assert text["steps"].startswith("base=3,")
    assert set(text) == {"prompt", "negative_prompt", "seed", "size", "aspect_ratio", "mode", "steps", "guidance_scale",
                         "scheduler", "model", "software", "request_id"}
    code_c, c = _run(tmp_path, *[("8" if a == "7" else a) for a in args], name="c.png")
    assert code_c == 0 and c.read_bytes() != a.read_bytes()


def test_cli_refuses_bad_input_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import stages.pipeline

    def no_load(*a, **k):
        raise AssertionError("model loaded for a bad request")

    monkeypatch.setattr(stages.pipeline.Flashtile, "from_pretrained", no_load)
    code, out = _run(tmp_path, "--steps", "0")
    assert code == 2 and not out.exists()
    assert "steps: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_cli_rejects_unknown_tier_with_the_allowed_values():
    proc = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "generate", "x", "--size", "8k"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "argument --size: invalid choice: '8k'" in proc.stderr
    assert all(f"{tier}" in proc.stderr.split("choose from")[1] for tier in TIERS)
