"""The Serve config's checks beyond Serve's own (deployments.app.check_config), before anything starts."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.app import check_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _with(deployment: str, **options) -> dict:
    config = copy.deepcopy(CONFIG)
    for d in config["applications"][0]["deployments"]:
        if d["name"] == deployment:
            d.update(options)
    return config


def test_the_shipped_config_passes():
    check_config(CONFIG)


@pytest.mark.parametrize("deployment,arg", [("base_generator", "generator_max_batch"), ("prompt_encoder", "encoder_max_batch")])
def test_a_batch_larger_than_the_replica_accepts_is_refused_naming_both(deployment, arg):
    config = _with(deployment, max_ongoing_requests=2)
    with pytest.raises(ValueError, match=rf"{deployment} max_ongoing_requests \(2\) must be at least {arg} \("):
        check_config(config)
    config["applications"][0]["args"][arg] = 2
    check_config(config)


def test_serve_refuses_a_bad_config_before_starting_ray(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_with("base_generator", max_ongoing_requests=1)))
    proc = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "base_generator max_ongoing_requests (1) must be at least generator_max_batch (4)" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
