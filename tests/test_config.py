"""The Serve config's checks beyond Serve's own (deployments.app.check_config), before anything starts."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.app import check_config
from deployments.regions import DEPLOYMENTS, place, rank

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


# --- regions (deployments/regions.py) ---------------------------------------------------------------------------


def _regional(**args) -> dict:
    config = copy.deepcopy(CONFIG)
    config["applications"][0]["args"].update(args)
    return config


@pytest.mark.parametrize("regions,message", [
    ([], "regions: must name at least one region"),
    (["us-east", "eu-west", "us-east"], "regions: 'us-east' is listed twice"),
    (["US East"], "regions: 'US East' is not a region name"),
])
def test_a_bad_region_list_is_refused_naming_it(regions, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(_regional(regions=regions))


def test_a_floor_above_max_replicas_is_refused_naming_the_deployment():
    # cluster.yaml: the refiner scales to 3 at most; 2 per region in 2 regions needs 4.
    config = _regional(regions=["us-east", "eu-west"], region_floors={"refiner": 2})
    with pytest.raises(ValueError, match=re.escape("refiner: region_floors.refiner (2) x 2 regions = 4 replicas, "
                                                   "above its max_replicas (3)")):
        check_config(config)
    with pytest.raises(ValueError, match="region_floors: 'upscalers' is not a deployment; allowed: ingress, "):
        check_config(_regional(regions=["us-east"], region_floors={"upscalers": 1}))


def test_place_gives_every_deployment_the_selector_router_and_floor():
    placed = place(_regional(regions=["us-east", "eu-west"], region_floors={"upscaler": 1, "ingress": 0}))
    deployments = {d["name"]: d for d in placed["applications"][0]["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    for name, d in deployments.items():
        assert d["ray_actor_options"]["label_selector"] == {"ray.io/availability-region": "in(us-east,eu-west)"}, name
        assert d["request_router_config"] == {"request_router_class": "deployments.regions:RegionRouter"}
        assert d["ray_actor_options"]["num_cpus"] > 0  # cluster.yaml's own options kept
    assert deployments["upscaler"]["autoscaling_config"]["min_replicas"] == 2  # cluster.yaml's 2 = 1 x 2 regions
    assert deployments["base_generator"]["autoscaling_config"]["min_replicas"] == 2  # default floor 1 x 2
    assert deployments["ingress"]["autoscaling_config"]["min_replicas"] == 1  # floor 0: cluster.yaml's own
    assert place(copy.deepcopy(placed)) == placed  # placing twice changes nothing
    assert place(copy.deepcopy(CONFIG)) == CONFIG  # no regions: untouched


class _Replica:
    def __init__(self, name, region, max_ongoing=4):
        self.replica_id, self.replica_metadata, self.max_ongoing_requests = name, {"region": region}, max_ongoing


def test_the_router_offers_the_requests_region_first_then_the_least_loaded_other():
    replicas = [_Replica("a1", "us-east"), _Replica("b1", "eu-west"), _Replica("c1", "ap-south"),
                _Replica("a2", "us-east"), _Replica("new", None)]
    load = {"b1": 4, "c1": 1}
    ranks = rank(replicas, "us-east", lambda r: load.get(r.replica_id, 0))
    assert [[r.replica_id for r in group] for group in ranks] == [["a1", "a2"], ["new"], ["c1"], ["b1"]]
    # A region with no replicas (lost, or none yet): every other region, least loaded first.
    assert [[r.replica_id for r in g] for g in rank(replicas[1:3], "us-east", lambda r: load[r.replica_id])] == [
        ["c1"], ["b1"]]
