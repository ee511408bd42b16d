"""k8s/rayservice.yaml: generated from cluster.yaml (no drift), valid against KubeRay's RayService CRD.

No API server runs here: the manifest is checked against the openAPIV3Schema the CRD carries, the way the
API server would with strict field validation (unknown fields are errors, except under
x-kubernetes-preserve-unknown-fields). CEL rules (x-kubernetes-validations) are not evaluated.
The CRDs live in ../shared/kuberay-crds beside the repo (CI clones it there).
"""

import copy
from pathlib import Path

import jsonschema  # a dependency of ray
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

from k8s.render import render, render_text  # noqa: E402

CLUSTER_YAML = ROOT / "cluster.yaml"
MANIFEST = ROOT / "k8s" / "rayservice.yaml"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
RAYSERVICE_CRD = CRD_DIR / "ray.io_rayservices.yaml"
RAYCLUSTER_CRD = CRD_DIR / "ray.io_rayclusters.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


def _load(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return _load(MANIFEST)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


def _served_v1_schema(crd_path: Path) -> tuple[dict, dict]:
    if not crd_path.is_file():
        pytest.skip(f"KubeRay CRD not found at {crd_path} (expected ../shared/kuberay-crds beside the repo)")
    crd = _load(crd_path)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"], f"{crd_path.name}: version v1 is not served"
    return crd, v1["schema"]["openAPIV3Schema"]


def _strict(schema):
    """The schema with unknown fields forbidden wherever Kubernetes would reject them (strict field validation)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_formats = jsonschema.FormatChecker()


@_formats.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@_formats.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


def _validator(schema: dict) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schema objects are a JSON Schema draft-4 dialect; x-kubernetes-* keys are ignored by it.
    strict = _strict(schema)
    jsonschema.Draft4Validator.check_schema(strict)
    return jsonschema.Draft4Validator(strict, format_checker=_formats)


def _errors(validator, instance) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


@pytest.fixture(scope="module")
def rayservice_crd():
    crd, schema = _served_v1_schema(RAYSERVICE_CRD)
    return crd, _validator(schema)


# (a) one config: the manifest is what the generator makes of cluster.yaml


def test_manifest_is_generated_from_cluster_yaml(manifest):
    assert manifest == render(CLUSTER_YAML), "k8s/rayservice.yaml is stale: run `python -m k8s.render`"
    assert MANIFEST.read_text() == render_text(CLUSTER_YAML), (
        "k8s/rayservice.yaml differs from the generator's output (hand-edited?): run `python -m k8s.render`"
    )
    assert "python -m k8s.render" in MANIFEST.read_text().splitlines()[0]


def test_render_follows_cluster_yaml(tmp_path, cluster):
    # A change to cluster.yaml shows up in the render, so the committed manifest would be stale.
    changed = copy.deepcopy(cluster)
    changed["applications"][0]["deployments"][0]["max_ongoing_requests"] += 1
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(changed))
    rendered = yaml.safe_load(render(path)["spec"]["serveConfigV2"])
    ingress = rendered["applications"][0]["deployments"][0]
    assert ingress["name"] == "ingress" and ingress["max_ongoing_requests"] == cluster["applications"][0]["deployments"][0]["max_ongoing_requests"] + 1
    assert rendered != yaml.safe_load(render(CLUSTER_YAML)["spec"]["serveConfigV2"])


# (b) the Serve config inside is cluster.yaml's, apart from the documented Kubernetes overlay


def test_serve_config_equals_cluster_yaml_but_the_overlay(manifest, cluster):
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    assert cluster["http_options"]["host"] != "0.0.0.0"  # else the documented difference is gone
    expected = copy.deepcopy(cluster)
    expected["http_options"]["host"] = "0.0.0.0"
    expected["applications"][0]["args"].update(device="cuda", encoder_device="cpu")
    gpus = {"base_generator": 1.0, "upscaler": 0.25, "refiner": 0.5}
    for deployment in expected["applications"][0]["deployments"]:
        if deployment["name"] in gpus:
            deployment["ray_actor_options"]["num_gpus"] = gpus[deployment["name"]]
    assert serve == expected
    by_name = {d["name"]: d for d in serve["applications"][0]["deployments"]}
    assert "num_gpus" not in by_name["ingress"]["ray_actor_options"]
    assert "num_gpus" not in by_name["prompt_encoder"]["ray_actor_options"]
    assert [d["name"] for d in serve["applications"][0]["deployments"]] == [
        "ingress",
        "prompt_encoder",
        "base_generator",
        "upscaler",
        "refiner",
        "compositor",
    ]


def test_serve_config_is_a_valid_serve_deploy_config(manifest):
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert config.http_options.host == "0.0.0.0"


# (c) valid against KubeRay's CRD, and the check can fail


def test_manifest_matches_crd_identity(manifest, rayservice_crd):
    crd, _ = rayservice_crd
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert manifest["kind"] == crd["spec"]["names"]["kind"] == "RayService"
    assert manifest["metadata"]["name"] == "flashtile"


def test_manifest_validates_against_rayservice_crd(manifest, rayservice_crd):
    _, validator = rayservice_crd
    assert _errors(validator, manifest) == []


def test_ray_cluster_config_validates_against_raycluster_crd(manifest):
    _, schema = _served_v1_schema(RAYCLUSTER_CRD)
    validator = _validator(schema["properties"]["spec"])
    assert _errors(validator, manifest["spec"]["rayClusterConfig"]) == []


def _no_group_name(m):
    del m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["groupName"]


def _replicas_as_word(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"


def _misspelt_field(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1


def _serve_config_as_mapping(m):
    m["spec"]["serveConfigV2"] = yaml.safe_load(m["spec"]["serveConfigV2"])


def _bad_quantity(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = "one"


def _no_head(m):
    del m["spec"]["rayClusterConfig"]["headGroupSpec"]


def _start_param_not_string(m):
    m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _replicas_over_int32(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["maxReplicas"] = 2**31


@pytest.mark.parametrize(
    "breakage, where",
    [
        (_no_group_name, "workerGroupSpecs.1"),
        (_replicas_as_word, "workerGroupSpecs.0.replicas"),
        (_misspelt_field, "workerGroupSpecs.0"),
        (_serve_config_as_mapping, "spec.serveConfigV2"),
        (_bad_quantity, "limits.nvidia.com/gpu"),
        (_no_head, "rayClusterConfig"),
        (_start_param_not_string, "rayStartParams.num-cpus"),
        (_replicas_over_int32, "workerGroupSpecs.1.maxReplicas"),
    ],
    ids=lambda p: p.__name__.lstrip("_") if callable(p) else None,
)
def test_broken_manifest_fails_validation(manifest, rayservice_crd, breakage, where):
    _, validator = rayservice_crd
    broken = copy.deepcopy(manifest)
    breakage(broken)
    errors = _errors(validator, broken)
    assert errors, f"{breakage.__name__} passed validation"
    assert any(where in e.split(":")[0] for e in errors), errors


# (d) placement: GPUs on the gpu group only, nothing schedulable on the head


def _groups(manifest) -> dict:
    return {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _resources(group) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]


def test_gpu_group_requests_a_gpu_and_scales_from_zero(manifest):
    gpu = _groups(manifest)["gpu"]
    assert str(_resources(gpu)["limits"]["nvidia.com/gpu"]) == "1"
    assert gpu["minReplicas"] == 0 <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 1


def test_cpu_group_and_head_have_no_gpu(manifest):
    groups = _groups(manifest)
    assert set(groups) == {"cpu", "gpu"}
    cpu = groups["cpu"]
    assert 1 <= cpu["minReplicas"] <= cpu["replicas"] <= cpu["maxReplicas"]
    for resources in (_resources(cpu), _resources(manifest["spec"]["rayClusterConfig"]["headGroupSpec"])):
        assert {"requests", "limits"} <= set(resources)
        assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]


def test_head_takes_no_replicas_and_autoscaling_is_on(manifest):
    rc = manifest["spec"]["rayClusterConfig"]
    params = rc["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["rayVersion"] == "2.60.0"


def test_one_image_everywhere(manifest):
    rc = manifest["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    assert len(images) == 1, images
